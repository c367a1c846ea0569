"""One tokenizer per served model folder, loaded on first use and kept (chat templates, logprob tokens), and vLLM's
tokenizer routes over it (`/tokenize`, `/detokenize`, `/tokenizer_info`; lm-eval's remote tokenizer uses all three):
an adapter uses its base model's tokenizer, `model` may be left out when one LLM is served.

The frontend's request handlers run on the event loop thread, so a fast tokenizer is never shared between threads
here (which can fail with "Already borrowed")."""

from __future__ import annotations

import json
from functools import lru_cache

from backends.llm.chat import apply_chat_template, load_tokenizer
from openai_frontend.config import FrontendConfig
from openai_frontend.engine.catalog import LLM, BaseModel, Catalog
from openai_frontend.errors import bad_request, model_not_found
from openai_frontend.schemas import DetokenizeRequest, TokenizeRequest


def _arguments(text: str):
    try:
        return json.loads(text)  # templates render a call's arguments as an object (Hermes, Llama, Qwen)
    except json.JSONDecodeError:
        return text


def chat_messages(messages, inline_tool_calls: bool = False) -> list[dict]:
    """OpenAI chat messages as chat templates take them (a developer message is a system message; an assistant's
    tool calls and a tool's answer keep their fields). `inline_tool_calls`: for a template that renders no tool
    calls, an assistant's calls join its content as Hermes-style `<tool_call>` blocks instead of vanishing."""
    out = []
    for m in messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls and inline_tool_calls:
            blocks = [json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                                 ensure_ascii=False) for c in m.tool_calls]
            message["content"] = "\n".join([message["content"], *(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)]
                                           ).strip()
        elif m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(m, key) is not None:
                message[key] = getattr(m, key)
        out.append(message)
    return out


@lru_cache(maxsize=16)
def cached_tokenizer(model_path: str):
    return load_tokenizer(model_path)


class TokenizerService:
    def __init__(self, config: FrontendConfig, catalog: Catalog):
        self.config, self.catalog = config, catalog

    async def _base(self, model: str | None) -> BaseModel:
        catalog = self.catalog
        if model is None:
            model = catalog.default_base(await catalog.bases(), LLM)
            if model is None:
                raise model_not_found("(default LLM)")
        base = (await catalog.target(model)).base
        if base.kind != LLM:
            raise bad_request(f"model '{model}' generates images and has no tokenizer", "model")
        return base

    async def tokenize(self, body: TokenizeRequest) -> dict:
        base = await self._base(body.model)
        tokenizer = cached_tokenizer(base.root)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("send exactly one of prompt and messages", "prompt")
        if body.messages is not None:
            try:
                text = apply_chat_template(chat_messages(body.messages), tokenizer=tokenizer,
                                           add_generation_prompt=body.add_generation_prompt)
            except Exception as exc:  # template errors (e.g. role order) are the request's fault
                raise bad_request(f"cannot apply the chat template of {base.name}: {exc}", "messages") from None
            tokens = tokenizer(text, add_special_tokens=False).input_ids  # the template carries the special tokens
        else:
            if len(body.prompt) > self.config.max_prompt_chars:
                raise bad_request(f"prompt exceeds {self.config.max_prompt_chars} characters", "prompt")
            tokens = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        out = {"count": len(tokens), "max_model_len": tokenizer.model_max_length, "tokens": tokens}
        if body.return_token_strs:
            out["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
        return out

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        tokenizer = cached_tokenizer((await self._base(body.model)).root)
        vocab = len(tokenizer)
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    async def info(self, model: str | None) -> dict:
        base = await self._base(model)
        tokenizer = cached_tokenizer(base.root)
        return {"tokenizer_class": type(tokenizer).__name__, "model": base.name, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
                "chat_template": tokenizer.chat_template, "model_max_length": tokenizer.model_max_length}
