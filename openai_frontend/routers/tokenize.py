"""vLLM's tokenizer routes: `/tokenize`, `/detokenize` and `/tokenizer_info` (lm-eval's remote tokenizer uses all
three). Per model: an adapter uses its base model's tokenizer; `model` may be left out when one LLM is served."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from backends.llm.chat import apply_chat_template
from openai_frontend.auth import require_api_key
from openai_frontend.catalog import LLM, BaseModel
from openai_frontend.errors import bad_request, error_responses, model_not_found
from openai_frontend.schemas import DetokenizeRequest, TokenizeRequest
from openai_frontend.tokenizers import cached_tokenizer

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 404, 503))


async def _base(request: Request, model: str | None) -> BaseModel:
    catalog = request.app.state.catalog
    if model is None:
        model = catalog.default_base(await catalog.bases(), LLM)
        if model is None:
            raise model_not_found("(default LLM)")
    base = (await catalog.resolve(model)).base
    if base.kind != LLM:
        raise bad_request(f"model '{model}' generates images and has no tokenizer", "model")
    return base


@router.post("/tokenize", responses=error_responses(413))
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    base = await _base(request, body.model)
    tokenizer = cached_tokenizer(base.root)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = apply_chat_template(messages, tokenizer=tokenizer,
                                       add_generation_prompt=body.add_generation_prompt)
        except Exception as exc:  # template errors (e.g. role order) are the request's fault
            raise bad_request(f"cannot apply the chat template of {base.name}: {exc}", "messages") from None
        tokens = tokenizer(text, add_special_tokens=False).input_ids  # the template carries the special tokens
    else:
        if len(body.prompt) > request.app.state.config.max_prompt_chars:
            raise bad_request(f"prompt exceeds {request.app.state.config.max_prompt_chars} characters", "prompt")
        tokens = tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
    out = {"count": len(tokens), "max_model_len": tokenizer.model_max_length, "tokens": tokens}
    if body.return_token_strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(tokens)
    return out


@router.post("/detokenize", responses=error_responses(413))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    base = await _base(request, body.model)
    tokenizer = cached_tokenizer(base.root)
    vocab = len(tokenizer)
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens")
    return {"prompt": tokenizer.decode(body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None) -> dict:
    base = await _base(request, model)
    tokenizer = cached_tokenizer(base.root)
    return {"tokenizer_class": type(tokenizer).__name__, "model": base.name, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token,
            "chat_template": tokenizer.chat_template, "model_max_length": tokenizer.model_max_length}
