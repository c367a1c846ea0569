"""What every chat completion and completion answer starts with, whichever model kind produced it."""

from __future__ import annotations

import time
import uuid


def response_base(model: str, kind: str) -> dict:
    """`id`, `created`, `model` of a chat completion (`kind` "chat") or a completion."""
    return {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": model}
