"""`/v1/chat/completions` and `/v1/completions` on the decoupled `llm` models over Triton gRPC streams, plain or SSE
(`data: {...}` chunks, `data: [DONE]`, usage with `stream_options.include_usage`)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from backends.llm.chat import apply_chat_template
from openai_frontend.auth import require_api_key
from openai_frontend.catalog import DIFFUSION, LLM, Target
from openai_frontend.disconnect import unless_disconnected
from openai_frontend.errors import OpenAIError, bad_request, error_responses
from openai_frontend.routers import images
from openai_frontend.schemas import (ChatCompletionRequest, CompletionRequest, ImageChatOptions,
                                     ImageGenerationRequest, _Sampling)
from openai_frontend.tokenizers import cached_tokenizer
from openai_frontend.logprobs import chat_logprobs, legacy_logprobs
from openai_frontend.triton import Logprobs, TextChunk

# With stream: true the 200 is a server-sent event stream; `schema` describes one event (OpenAPI 3.1).
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "A JSON chunk, or an OpenAI error object if generation fails; then [DONE]"}}}
_STREAM = {200: {"description": "The completion (JSON), or its chunks as server-sent events with stream: true",
                 "content": {"application/json": {}, "text/event-stream": {"schema": _EVENT}}}}
router = APIRouter(dependencies=[Depends(require_api_key)],
                   responses={**_STREAM, **error_responses(400, 401, 404, 413, 503)})

# One /v1/completions request may carry a list of prompts (one choice each): at most this many, and this many
# token ids in all (lm-eval sends batches of a few dozen).
MAX_PROMPTS = 256
MAX_N = 16  # choices per prompt
MAX_PROMPT_TOKENS = 262_144


def _fields(body: _Sampling, prompt: str, max_tokens: int | None, limit: int) -> dict:
    if body.n > MAX_N:
        raise bad_request(f"n must be <= {MAX_N}, got {body.n}", "n")
    if body.n > 1 and body.stream:
        raise bad_request("n > 1 is supported without stream; send stream: false", "n")
    if max_tokens is not None and max_tokens > limit:
        raise bad_request(f"max_tokens must be <= {limit}, got {max_tokens}", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {"text_input": prompt, "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "seed": body.seed, "stop": stop or None, "stream": body.stream}


async def _target(request: Request, body: _Sampling) -> Target:
    target = await request.app.state.catalog.resolve(body.model, body.lora, body.lora_scale)
    if target.base.kind != LLM:
        raise bad_request(f"model '{body.model}' generates images: use /v1/images/generations or "
                          "/v1/chat/completions", "model")
    return target


def _usage_n(lasts: list[TextChunk | None], n: int) -> dict:
    """Usage of n choices per prompt: OpenAI counts each prompt once and every choice's completion."""
    usage = _usage(lasts)
    prompt = sum(last.num_input_tokens for last in lasts[::n] if last)
    return {**usage, "prompt_tokens": prompt, "total_tokens": prompt + usage["completion_tokens"]}


def _usage(lasts: list[TextChunk | None]) -> dict:
    prompt = sum(last.num_input_tokens for last in lasts if last)
    completion = sum(last.num_output_tokens for last in lasts if last)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class _Collected:
    """One finished (non-streamed) generation."""

    text: str
    last: TextChunk | None
    logprobs: Logprobs | None
    prompt_logprobs: Logprobs | None


def _record(app, model: str, last: TextChunk | None) -> None:
    if last is not None:
        app.metrics.prompt_tokens.labels(model).inc(last.num_input_tokens)
        app.metrics.completion_tokens.labels(model).inc(last.num_output_tokens)


async def _collect(request: Request, body: _Sampling, target: Target, fields: dict) -> _Collected:
    """One generation to its end (callers watch for the client disconnecting, once around all of them)."""
    app = request.app.state
    chunks = app.gateway.generate(target.base.name, fields, target.lora_parameters())
    out = _Collected("", None, None, None)
    text: list[str] = []
    async for chunk in chunks:
        text.append(chunk.text)
        out.last = chunk
        if chunk.logprobs is not None:
            out.logprobs = chunk.logprobs if out.logprobs is None else out.logprobs + chunk.logprobs
        out.prompt_logprobs = chunk.prompt_logprobs or out.prompt_logprobs
    _record(app, body.model, out.last)
    out.text = "".join(text)
    return out


def _response_base(body: _Sampling, kind: str) -> dict:
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model}


async def _stream(request: Request, body: _Sampling, target: Target, fields: dict,
                  render: Callable[[str, str | None, bool], dict], kind: str):
    """One generation as SSE chunks built by `render(text, finish_reason, first)`."""
    app = request.app.state
    base = _response_base(body, kind)
    chunks = app.gateway.generate(target.base.name, fields, target.lora_parameters())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    # errors before the first token still get a proper status code
    first = await unless_disconnected(request, _first(chunks))

    async def events() -> AsyncIterator[bytes]:
        last = None
        try:
            if kind == "chat":  # OpenAI sends the role first, on its own
                yield _sse({**base, "object": obj, "choices": [render("", None, True)]})
            async for chunk in _prepend(first, chunks):
                last = chunk
                if chunk.text or chunk.finish_reason:
                    payload = {**base, "object": obj, "choices": [render(chunk.text, chunk.finish_reason, False)]}
                    if include_usage:
                        payload["usage"] = None
                    yield _sse(payload)
            if include_usage:
                yield _sse({**base, "object": obj, "choices": [], "usage": _usage([last])})
        except OpenAIError as exc:
            yield _sse(exc.body())
        finally:
            _record(app, body.model, last)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _first(chunks: AsyncIterator[TextChunk]) -> TextChunk | None:
    async for chunk in chunks:
        return chunk
    return None


async def _prepend(first: TextChunk | None, rest: AsyncIterator[TextChunk]) -> AsyncIterator[TextChunk]:
    if first is None:
        return
    yield first
    async for chunk in rest:  # always to the end: the stream closes itself after Triton's final response
        yield chunk


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    config = request.app.state.config
    target = await request.app.state.catalog.resolve(body.model, body.lora, body.lora_scale)
    if target.base.kind == DIFFUSION:
        return await _chat_images(request, body, target)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if sum(len(m["content"]) for m in messages) > config.max_prompt_chars:
        raise bad_request(f"messages exceed {config.max_prompt_chars} characters", "messages")
    try:
        prompt = apply_chat_template(messages, tokenizer=cached_tokenizer(target.base.root))
    except Exception as exc:  # template errors (e.g. role order) are the request's fault
        raise bad_request(f"cannot apply the chat template of {target.base.name}: {exc}", "messages") from None
    fields = _fields(body, prompt, body.max_completion_tokens or body.max_tokens, config.max_tokens_limit)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if body.logprobs and body.stream:
        raise bad_request("logprobs are returned without stream; send stream: false", "logprobs")

    if body.stream:
        def render(text: str, finish: str | None, role_only: bool) -> dict:
            delta = {"role": "assistant", "content": ""} if role_only else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}

        return await _stream(request, body, target, fields, render, "chat")

    if body.logprobs:
        fields["logprobs"] = body.top_logprobs or 0
    done = await unless_disconnected(request, _collect_all(request, body, target, _choices(fields, body.n)))
    tokenizer = cached_tokenizer(target.base.root) if body.logprobs else None
    choices = [{"index": i, "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.last.finish_reason if result.last else "stop",
                "logprobs": chat_logprobs(tokenizer, result.logprobs) if body.logprobs else None}
               for i, result in enumerate(done)]
    return {**_response_base(body, "chat"), "object": "chat.completion", "choices": choices,
            "usage": _usage_n([r.last for r in done], body.n)}


async def _chat_images(request: Request, body: ChatCompletionRequest, target: Target) -> dict:
    """vLLM-Omni's chat completions on an image model: the user messages' text is the prompt, and each choice's
    message carries its images as `image_url` parts holding PNG data URLs. All of them share one denoising batch."""
    if body.stream:
        raise bad_request(f"model '{body.model}' generates images: send stream: false", "stream")
    if body.logprobs:
        raise bad_request(f"model '{body.model}' generates images and has no logprobs", "logprobs")
    try:
        options = ImageChatOptions.model_validate(await request.json())
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise bad_request(f"{field}: {error['msg']}", field) from None
    per_choice = options.num_outputs_per_prompt
    prompt = " ".join(m.text() for m in body.messages if m.role == "user").strip()
    job = ImageGenerationRequest(model=body.model, prompt=prompt, n=body.n * per_choice, size=options.size,
                                 seed=body.seed, num_inference_steps=options.num_inference_steps,
                                 guidance_scale=options.guidance_scale, negative_prompt=options.negative_prompt)
    done = await images.generate(request, target, job)
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
             for png in done.pngs]
    choices = [{"index": i, "message": {"role": "assistant", "content": parts[i * per_choice:(i + 1) * per_choice]},
                "finish_reason": "stop", "logprobs": None} for i in range(body.n)]
    return {**_response_base(body, "chat"), "object": "chat.completion", "choices": choices, "seed": done.seed}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    config = request.app.state.config
    target = await _target(request, body)
    prompts = _prompts(body.prompt, config.max_prompt_chars)
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.stream and (len(prompts) > 1 or body.echo or body.logprobs is not None):
        raise bad_request("stream is supported for one prompt without echo or logprobs; send stream: false",
                          "stream")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens 0 needs echo: true (to score the prompt)", "max_tokens")
    score = body.echo and (body.logprobs is not None or body.max_tokens == 0)

    def fields_for(prompt: str | list[int]) -> dict:
        fields = _fields(body, prompt if isinstance(prompt, str) else None, body.max_tokens, config.max_tokens_limit)
        if not isinstance(prompt, str):
            fields["input_ids"] = prompt
        fields["logprobs"] = body.logprobs
        fields["prompt_logprobs"] = (body.logprobs or 0) if score else None
        return fields

    if body.stream:
        def render(text: str, finish: str | None, _role_only: bool) -> dict:
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        return await _stream(request, body, target, fields_for(prompts[0]), render, "completion")

    tokenizer = cached_tokenizer(target.base.root)
    if body.max_tokens == 0 and body.logprobs is None:  # echo only: nothing to compute
        done = [_Collected("", TextChunk("", "length", len(p) if not isinstance(p, str) else
                                         len(tokenizer(p, add_special_tokens=False).input_ids), 0), None, None)
                for p in prompts]
    else:
        done = await unless_disconnected(request, _collect_all(
            request, body, target, [f for p in prompts for f in _choices(fields_for(p), body.n)]))
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
    return {**_response_base(body, "completion"), "object": "text_completion", "choices": choices,
            "usage": _usage_n([r.last for r in done], body.n)}


def _choices(fields: dict, n: int) -> list[dict]:
    """n generations of one prompt; with a seed, choice i samples with seed + i (the same seed would give n
    identical samples)."""
    seed = fields.get("seed")
    return [{**fields, "seed": None if seed is None else seed + i} for i in range(n)]


async def _collect_all(request: Request, body: _Sampling, target: Target, fields) -> list[_Collected]:
    """Several generations at once (the engine batches them); the first failure cancels the others and is
    raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_collect(request, body, target, f)) for f in fields]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


def _prompts(prompt, max_chars: int) -> list[str | list[int]]:
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
