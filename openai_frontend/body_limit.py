"""Request bodies are capped whether or not the client sends Content-Length: a declared size over the limit is
refused before anything is read, and a chunked upload is counted as it arrives and cut off at the limit, both with
413 in OpenAI's shape. (Starlette's own limit answers a declared oversize in plain text, which OpenAI clients cannot
parse.)"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_frontend.errors import OpenAIError, error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"").decode()
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(OpenAIError(413, f"request body of {length} bytes exceeds the limit of "
                                                  f"{self.max_bytes} bytes (--max-body-bytes)"))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes HTTPException through to our handler (413 JSON)
                    raise HTTPException(413, "request body too large")
            return message

        await self.app(scope, limited_receive, send)
