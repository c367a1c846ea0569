"""Stop work for clients that have gone: a non-streaming request whose client disconnects is cancelled at once,
which cancels its Triton request (the gRPC call or stream) and frees what the frontend tracks for it.
(Streaming responses get the same from Starlette, which cancels the body iterator on disconnect.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, TypeVar

from fastapi import Request

from openai_frontend.errors import OpenAIError

log = logging.getLogger(__name__)
T = TypeVar("T")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled and 499 is raised (nobody reads it,
    but the access log and metrics show what happened)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    log.info("client disconnected from %s; its request was cancelled", request.url.path)
    raise OpenAIError(499, "client disconnected; request cancelled")
