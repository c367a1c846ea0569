"""API keys: `Authorization: Bearer KEY` (or `x-api-key`) on /v1 routes and /metrics (unless --public-metrics); a separate admin key on the
adapter load/unload routes (the API key when no admin key is set) and on base-model load/unload, which are off
unless an admin key is configured (they restart models for every user). Compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from openai_frontend.errors import OpenAIError


def _presented(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def _check(request: Request, key: str | None, what: str) -> None:
    if key is None:
        return
    presented = _presented(request)
    if presented is None:
        raise OpenAIError(401, f"missing {what}: send 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not hmac.compare_digest(presented.encode(), key.encode()):
        raise OpenAIError(401, f"incorrect {what}", code="invalid_api_key")


async def require_api_key(request: Request) -> None:
    _check(request, request.app.state.config.api_key, "API key")


async def require_metrics_key(request: Request) -> None:
    """/metrics takes the API key unless --public-metrics: the inference gateway's endpoint picker scrapes it and
    cannot send a bearer token. Public, it shows queue sizes, adapter names and Triton's own metrics; no prompts or
    outputs."""
    config = request.app.state.config
    if not config.public_metrics:
        _check(request, config.api_key, "API key")


async def require_admin_key(request: Request) -> None:
    config = request.app.state.config
    _check(request, config.admin_key or config.api_key, "admin key")


async def require_model_admin(request: Request) -> None:
    config = request.app.state.config
    if config.admin_key is None:
        raise OpenAIError(403, "model load/unload is disabled: start the frontend with --admin-key "
                               "(MULTILORA_ADMIN_KEY) to enable it", code="model_control_disabled")
    _check(request, config.admin_key, "admin key")
