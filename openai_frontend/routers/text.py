"""`/v1/chat/completions` and `/v1/completions`: the body in, the engine's answer out as JSON or as server-sent
events (`data: {...}` chunks, `data: [DONE]`)."""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from openai_frontend.auth import require_api_key
from openai_frontend.disconnect import unless_disconnected
from openai_frontend.engine.text import Stream
from openai_frontend.errors import error_responses
from openai_frontend.schemas import ChatCompletionRequest, CompletionRequest

# With stream: true the 200 is a server-sent event stream; `schema` describes one event (OpenAPI 3.1).
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "A JSON chunk, or an OpenAI error object if generation fails; then [DONE]"}}}
_STREAM = {200: {"description": "The completion (JSON), or its chunks as server-sent events with stream: true",
                 "content": {"application/json": {}, "text/event-stream": {"schema": _EVENT}}}}
router = APIRouter(dependencies=[Depends(require_api_key)],
                   responses={**_STREAM, **error_responses(400, 401, 404, 413, 503)})


async def _events(stream: Stream) -> AsyncIterator[bytes]:
    async for payload in stream:
        yield f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
    yield b"data: [DONE]\n\n"


def _answer(result: dict | Stream):
    if isinstance(result, Stream):
        return StreamingResponse(_events(result), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return result


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    return _answer(await unless_disconnected(request, request.app.state.engine.text.chat(body)))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    return _answer(await unless_disconnected(request, request.app.state.engine.text.completion(body)))
