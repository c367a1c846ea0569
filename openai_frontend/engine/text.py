"""Chat completions and completions on the decoupled text models: prompts (chat template, the completions API's
prompt forms), the limits, n choices, logprobs, streaming as payload chunks, collecting, usage. Chat completions
on an image model go to `ImageService.chat`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from backends.llm.chat import apply_chat_template, renders_tools
from openai_frontend.config import FrontendConfig
from openai_frontend.engine.catalog import DIFFUSION, LLM, Catalog, Target
from openai_frontend.engine.gateway import Logprobs, TextChunk, TritonGateway
from openai_frontend.engine.images import ImageService
from openai_frontend.engine.logprobs import chat_logprobs, legacy_logprobs
from openai_frontend.engine.responses import response_base
from openai_frontend.engine.structured import (
    Plan,
    RequiredCallsStream,
    plan_chat,
    plan_completion,
    tool_calls,
    whole_json,
)
from openai_frontend.engine.tokenizers import cached_tokenizer, chat_messages
from openai_frontend.errors import OpenAIError, bad_request
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.schemas import ChatCompletionRequest, CompletionRequest, _Sampling

# One /v1/completions request may carry a list of prompts (one choice each): at most this many, and this many
# token ids in all (lm-eval sends batches of a few dozen).
MAX_PROMPTS = 256
MAX_N = 16  # choices per prompt
MAX_PROMPT_TOKENS = 262_144
T = TypeVar("T")


@dataclass
class Collected:
    """One finished (non-streamed) generation."""

    text: str
    last: TextChunk | None
    logprobs: Logprobs | None
    prompt_logprobs: Logprobs | None


class Stream:
    """A streamed answer whose first chunk has arrived (so errors before it kept their status): iterating it yields
    the response's JSON payloads, an error payload if generation fails later; the SSE framing is the router's."""

    def __init__(self, payloads: AsyncIterator[dict]):
        self.payloads = payloads

    def __aiter__(self) -> AsyncIterator[dict]:
        return self.payloads


def usage(lasts: list[TextChunk | None], n: int = 1) -> dict:
    """Usage of n choices per prompt: OpenAI counts each prompt once and every choice's completion."""
    prompt = sum(last.num_input_tokens for last in lasts[::n] if last)
    completion = sum(last.num_output_tokens for last in lasts if last)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _choices(fields: dict, n: int) -> list[dict]:
    """n generations of one prompt; with a seed, choice i samples with seed + i (the same seed would give n
    identical samples)."""
    seed = fields.get("seed")
    return [{**fields, "seed": None if seed is None else seed + i} for i in range(n)]


def prompts_of(prompt, max_chars: int) -> list[str | list[int]]:
    """Every OpenAI prompt form -> a list of prompts (text or token ids), within the limits."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}", "prompt")
    tokens = sum(len(p) for p in prompt if not isinstance(p, str))
    if tokens > MAX_PROMPT_TOKENS:
        raise bad_request(f"at most {MAX_PROMPT_TOKENS} prompt tokens per request, got {tokens}", "prompt")
    if any(not 0 <= t < 2**31 for p in prompt if not isinstance(p, str) for t in p):
        raise bad_request("token ids must be non-negative 32-bit integers", "prompt")
    for p in prompt:
        if not p:
            raise bad_request("every prompt must be a non-empty string or token list", "prompt")
        if isinstance(p, str) and len(p) > max_chars:
            raise bad_request(f"prompt exceeds {max_chars} characters", "prompt")
    return prompt


class TextService:
    def __init__(self, config: FrontendConfig, gateway: TritonGateway, catalog: Catalog, metrics: FrontendMetrics,
                 images: ImageService):
        self.config, self.gateway, self.catalog, self.metrics, self.images = config, gateway, catalog, metrics, images

    # -- the routes ------------------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest) -> dict | Stream:
        config = self.config
        options = body.image_options()
        body.model = await self.catalog.resolve(body.model, DIFFUSION if options else LLM, either=not options)
        target = await self.catalog.target(body.model, body.lora, body.lora_scale)
        if target.base.kind == DIFFUSION:
            return await self.images.chat(body, target)
        if options:
            name = next(iter(options))
            raise bad_request(f"{name} is an image option; model '{body.model}' is a text model", name)
        tokenizer = cached_tokenizer(target.base.root)
        with_tools = renders_tools(tokenizer)
        messages = chat_messages(body.messages, inline_tool_calls=not with_tools)
        if sum(len(m["content"]) for m in messages) > config.max_prompt_chars:
            raise bad_request(f"messages exceed {config.max_prompt_chars} characters", "messages")
        plan = plan_chat(body, with_tools)
        try:
            prompt = apply_chat_template(messages, tokenizer=tokenizer, tools=plan.tools or None)
        except Exception as exc:  # template errors (e.g. role order) are the request's fault
            raise bad_request(f"cannot apply the chat template of {target.base.name}: {exc}", "messages") from None
        fields = self._fields(body, prompt, body.max_completion_tokens or body.max_tokens, plan)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if body.logprobs and body.stream:
            raise bad_request("logprobs are returned without stream; send stream: false", "logprobs")

        if body.stream:
            return await self._constrained(plan, self._stream(body, target, fields, _chat_render(plan), "chat"))

        if body.logprobs:
            fields["logprobs"] = body.top_logprobs or 0
        done = await self._constrained(plan, self._collect_all(body, target, _choices(fields, body.n)))
        choices = []
        for i, result in enumerate(done):
            finish = result.last.finish_reason if result.last else "stop"
            message = {"role": "assistant", "content": result.text}
            if plan.tool_calls:
                message["content"], calls = tool_calls(plan, result.text)
                if calls:
                    message["tool_calls"] = calls
                    if finish == "stop" and (plan.forced != "named" or whole_json(result.text)):
                        finish = "tool_calls"
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(tokenizer, result.logprobs) if body.logprobs else None})
        return {**response_base(body.model, "chat"), "object": "chat.completion", "choices": choices,
                "usage": usage([r.last for r in done], body.n)}

    async def completion(self, body: CompletionRequest) -> dict | Stream:
        config = self.config
        body.model = await self.catalog.resolve(body.model, LLM)
        target = await self.catalog.target(body.model, body.lora, body.lora_scale)
        if target.base.kind != LLM:
            raise bad_request(f"model '{body.model}' generates images: use /v1/images/generations or "
                              "/v1/chat/completions", "model")
        prompts = prompts_of(body.prompt, config.max_prompt_chars)
        plan = plan_completion(body)
        if body.stream and (len(prompts) > 1 or body.echo or body.logprobs is not None):
            raise bad_request("stream is supported for one prompt without echo or logprobs; send stream: false",
                              "stream")
        if body.max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens 0 needs echo: true (to score the prompt)", "max_tokens")
        score = body.echo and (body.logprobs is not None or body.max_tokens == 0)

        def fields_for(prompt: str | list[int]) -> dict:
            fields = self._fields(body, prompt if isinstance(prompt, str) else None, body.max_tokens, plan)
            if not isinstance(prompt, str):
                fields["input_ids"] = prompt
            fields["logprobs"] = body.logprobs
            fields["prompt_logprobs"] = (body.logprobs or 0) if score else None
            return fields

        if body.stream:
            def render(text: str, finish: str | None, _role_only: bool) -> dict:
                return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

            return await self._constrained(plan, self._stream(body, target, fields_for(prompts[0]), render,
                                                              "completion"))

        tokenizer = cached_tokenizer(target.base.root)
        if body.max_tokens == 0 and body.logprobs is None:  # echo only: nothing to compute
            done = [Collected("", TextChunk("", "length", len(p) if not isinstance(p, str) else
                                            len(tokenizer(p, add_special_tokens=False).input_ids), 0), None, None)
                    for p in prompts]
        else:
            done = await self._constrained(plan, self._collect_all(
                body, target, [f for p in prompts for f in _choices(fields_for(p), body.n)]))
        choices = []
        for index, (prompt, result) in enumerate(zip([p for p in prompts for _ in range(body.n)], done)):
            echoed = ""
            if body.echo:
                echoed = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
            logprobs = None
            if body.logprobs is not None:
                entries = [e for e in (result.prompt_logprobs, result.logprobs) if e is not None]
                logprobs = legacy_logprobs(tokenizer, sum(entries[1:], entries[0]) if entries else None)
            choices.append({"index": index, "text": echoed + result.text, "logprobs": logprobs,
                            "finish_reason": result.last.finish_reason if result.last else "stop"})
        return {**response_base(body.model, "completion"), "object": "text_completion", "choices": choices,
                "usage": usage([r.last for r in done], body.n)}

    # -- generation ------------------------------------------------------------------------------------------
    @staticmethod
    async def _constrained(plan: Plan, work: Awaitable[T]) -> T:
        """`work`'s result; a constraint the backend could not compile is a 400 naming the field it came from."""
        try:
            return await work
        except OpenAIError as exc:
            if plan.param and exc.status == 400 and exc.param is None and "structured output:" in exc.message:
                exc.param = plan.param
            raise

    def _fields(self, body: _Sampling, prompt: str | None, max_tokens: int | None, plan: Plan) -> dict:
        if body.n > MAX_N:
            raise bad_request(f"n must be <= {MAX_N}, got {body.n}", "n")
        if body.n > 1 and body.stream:
            raise bad_request("n > 1 is supported without stream; send stream: false", "n")
        limit = self.config.max_tokens_limit
        if max_tokens is not None and max_tokens > limit:
            raise bad_request(f"max_tokens must be <= {limit}, got {max_tokens}", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop
        return {"text_input": prompt, "max_tokens": max_tokens, "temperature": body.temperature,
                "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed, "stop": stop or None,
                "stream": body.stream, "ignore_eos": body.ignore_eos or None,
                "structured_output": plan.constraint.to_json() if plan.constraint else None}

    def _record(self, model: str, last: TextChunk | None) -> None:
        """Counted per base model, as vLLM's model_name: a label per adapter would grow with every adapter seen."""
        if last is not None:
            self.metrics.prompt_tokens.labels(model).inc(last.num_input_tokens)
            self.metrics.completion_tokens.labels(model).inc(last.num_output_tokens)

    async def _collect(self, body: _Sampling, target: Target, fields: dict) -> Collected:
        """One generation to its end."""
        out = Collected("", None, None, None)
        text: list[str] = []
        async for chunk in self.gateway.generate(target.base.name, fields, target.lora_parameters()):
            text.append(chunk.text)
            out.last = chunk
            if chunk.logprobs is not None:
                out.logprobs = chunk.logprobs if out.logprobs is None else out.logprobs + chunk.logprobs
            out.prompt_logprobs = chunk.prompt_logprobs or out.prompt_logprobs
        self._record(target.base.name, out.last)
        out.text = "".join(text)
        return out

    async def _collect_all(self, body: _Sampling, target: Target, fields: list[dict]) -> list[Collected]:
        """Several generations at once (the engine batches them); the first failure cancels the others and is
        raised."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._collect(body, target, f)) for f in fields]
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return [t.result() for t in tasks]

    async def _stream(self, body: _Sampling, target: Target, fields: dict,
                      render: Callable[[str, str | None, bool], dict | None], kind: str) -> Stream:
        """One generation as chunk payloads built by `render(text, finish_reason, role_only)` (None: no chunk)."""
        base = response_base(body.model, kind)
        chunks = self.gateway.generate(target.base.name, fields, target.lora_parameters())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        first = await anext(chunks, None)  # errors before the first token still get a proper status code

        async def payloads() -> AsyncIterator[dict]:
            last = None
            try:
                if kind == "chat":  # OpenAI sends the role first, on its own
                    yield {**base, "object": obj, "choices": [render("", None, True)]}
                if first is not None:
                    async for chunk in _prepend(first, chunks):
                        last = chunk
                        if chunk.text or chunk.finish_reason:
                            choice = render(chunk.text, chunk.finish_reason, False)
                            if choice is None:  # held back (a tool call is parsed once whole)
                                continue
                            payload = {**base, "object": obj, "choices": [choice]}
                            if include_usage:
                                payload["usage"] = None
                            yield payload
                if include_usage:
                    yield {**base, "object": obj, "choices": [], "usage": usage([last])}
            except OpenAIError as exc:
                yield exc.body()
            finally:
                self._record(target.base.name, last)

        return Stream(payloads())


_TAG = "<tool_call>"


def _held_back(text: str) -> int:
    """How many trailing characters of `text` could start a `<tool_call>` tag."""
    return next((n for n in range(min(len(text), len(_TAG) - 1), 0, -1) if _TAG.startswith(text[-n:])), 0)


def _chat_render(plan: Plan) -> Callable[[str, str | None, bool], dict | None]:
    """Streamed chat choices. A named function's arguments stream as `delta.tool_calls` argument fragments (the
    first one with the call's id, type and name), as vLLM streams them, and so do a `required` answer's calls (see
    RequiredCallsStream); `auto` streams content until a `<tool_call>` tag starts, then sends the calls whole when
    the answer ends."""
    text_so_far: list[str] = []
    sent = 0  # characters of content already streamed (auto)
    started = False
    calls_stream = RequiredCallsStream() if plan.forced == "required" else None

    def render(text: str, finish: str | None, role_only: bool) -> dict | None:
        nonlocal started, sent
        if role_only:
            return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                    "logprobs": None}
        delta: dict = {"content": text}
        text_so_far.append(text)
        if plan.forced == "named":
            call: dict = {"index": 0, "function": {"arguments": text}}
            if not started:
                call = {"index": 0, "id": tool_calls(plan, "")[1][0]["id"], "type": "function",
                        "function": {"name": plan.function, "arguments": text}}
                started = True
            delta = {"tool_calls": [call]}
            if finish == "stop" and whole_json("".join(text_so_far)):
                finish = "tool_calls"
        elif calls_stream is not None and (calls_stream.streamed or finish is None):
            deltas = calls_stream.feed(text)
            if finish is None and not deltas:
                return None
            delta = {"tool_calls": deltas} if deltas else {}
            if finish == "stop" and whole_json("".join(text_so_far)):
                finish = "tool_calls"
        elif plan.tool_calls:
            whole = "".join(text_so_far)
            if finish is None:
                if _TAG in whole:
                    return None
                safe = len(whole) - _held_back(whole)
                if safe <= sent:
                    return None
                delta, sent = {"content": whole[sent:safe]}, safe
            else:
                content, calls = tool_calls(plan, whole)
                if calls:
                    rest = (content or "")[sent:] if plan.parse_calls else None
                    delta = {"content": rest or None,
                             "tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                    finish = "tool_calls" if finish == "stop" else finish
                else:
                    delta = {"content": whole[sent:]}
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

    return render


async def _prepend(first: TextChunk, rest: AsyncIterator[TextChunk]) -> AsyncIterator[TextChunk]:
    yield first
    async for chunk in rest:  # always to the end: the stream closes itself after Triton's final response
        yield chunk
