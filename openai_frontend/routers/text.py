"""`/v1/chat/completions` and `/v1/completions` on the decoupled `llm` models over Triton gRPC streams, plain or SSE
(`data: {...}` chunks, `data: [DONE]`, usage with `stream_options.include_usage`)."""

from __future__ import annotations

import json
import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from backends.llm.chat import apply_chat_template, load_tokenizer
from openai_frontend.auth import require_api_key
from openai_frontend.catalog import LLM, Target
from openai_frontend.disconnect import unless_disconnected
from openai_frontend.errors import OpenAIError, bad_request
from openai_frontend.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from openai_frontend.triton import TextChunk

router = APIRouter(dependencies=[Depends(require_api_key)])


def _fields(body: _Sampling, prompt: str, max_tokens: int | None, limit: int) -> dict:
    if body.n != 1:
        raise bad_request("n > 1 is not supported: send one request per completion", "n")
    if max_tokens is not None and max_tokens > limit:
        raise bad_request(f"max_tokens must be <= {limit}, got {max_tokens}", "max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {"text_input": prompt, "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "seed": body.seed, "stop": stop or None, "stream": body.stream}


async def _target(request: Request, body: _Sampling) -> Target:
    target = await request.app.state.catalog.resolve(body.model, body.lora, body.lora_scale)
    if target.base.kind != LLM:
        raise bad_request(f"model '{body.model}' generates images: use /v1/images/generations", "model")
    return target


def _usage(last: TextChunk | None) -> dict:
    prompt = last.num_input_tokens if last else 0
    completion = last.num_output_tokens if last else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _generate(request: Request, body: _Sampling, target: Target, fields: dict,
                    render: Callable[[str, str | None, bool], dict], kind: str):
    """Non-streaming: one JSON body. Streaming: SSE chunks built by `render(text, finish_reason, first)`."""
    app = request.app.state
    adapter = target.lora_name
    chunks = app.gateway.generate(target.base.name, fields, target.lora_parameters())
    base = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": body.model}
    app.metrics.activity.start(adapter)

    def record(last: TextChunk | None) -> None:
        if last is not None:
            app.metrics.prompt_tokens.labels(body.model).inc(last.num_input_tokens)
            app.metrics.completion_tokens.labels(body.model).inc(last.num_output_tokens)

    if not body.stream:
        text, last, started = [], None, False

        async def collect() -> None:
            nonlocal last, started
            async for chunk in chunks:
                if not started:
                    app.metrics.activity.first_output(adapter)
                    started = True
                text.append(chunk.text)
                last = chunk

        try:
            await unless_disconnected(request, collect())
        finally:
            app.metrics.activity.finish(adapter, started)
        record(last)
        choice = render("".join(text), last.finish_reason if last else "stop", False)
        return {**base, "object": "chat.completion" if kind == "chat" else "text_completion", "choices": [choice],
                "usage": _usage(last)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    try:  # errors before the first token still get a proper status code
        first = await unless_disconnected(request, _first(chunks))
    except BaseException:
        app.metrics.activity.finish(adapter, False)
        raise

    async def events() -> AsyncIterator[bytes]:
        last, started = None, False
        try:
            if kind == "chat":  # OpenAI sends the role first, on its own
                yield _sse({**base, "object": obj, "choices": [render("", None, True)]})
            async for chunk in _prepend(first, chunks):
                if not started:
                    app.metrics.activity.first_output(adapter)
                    started = True
                last = chunk
                if chunk.text or chunk.finish_reason:
                    payload = {**base, "object": obj, "choices": [render(chunk.text, chunk.finish_reason, False)]}
                    if include_usage:
                        payload["usage"] = None
                    yield _sse(payload)
            if include_usage:
                yield _sse({**base, "object": obj, "choices": [], "usage": _usage(last)})
        except OpenAIError as exc:
            yield _sse(exc.body())
        finally:
            app.metrics.activity.finish(adapter, started)
            record(last)
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
    target = await _target(request, body)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    if sum(len(m["content"]) for m in messages) > config.max_prompt_chars:
        raise bad_request(f"messages exceed {config.max_prompt_chars} characters", "messages")
    try:
        prompt = apply_chat_template(messages, tokenizer=load_tokenizer(target.base.root))
    except Exception as exc:  # template errors (e.g. role order) are the request's fault
        raise bad_request(f"cannot apply the chat template of {target.base.name}: {exc}", "messages") from None
    fields = _fields(body, prompt, body.max_completion_tokens or body.max_tokens, config.max_tokens_limit)

    def render(text: str, finish: str | None, role_only: bool) -> dict:
        if body.stream:
            delta = {"role": "assistant", "content": ""} if role_only else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}

    return await _generate(request, body, target, fields, render, "chat")


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    config = request.app.state.config
    target = await _target(request, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise bad_request("exactly one prompt per request is supported", "prompt")
    if body.echo or body.suffix:
        raise bad_request("echo and suffix are not supported", "echo" if body.echo else "suffix")
    if not prompts[0]:
        raise bad_request("prompt must be a non-empty string", "prompt")
    if len(prompts[0]) > config.max_prompt_chars:
        raise bad_request(f"prompt exceeds {config.max_prompt_chars} characters", "prompt")
    fields = _fields(body, prompts[0], body.max_tokens, config.max_tokens_limit)

    def render(text: str, finish: str | None, _role_only: bool) -> dict:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

    return await _generate(request, body, target, fields, render, "completion")
