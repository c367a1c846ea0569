"""Liveness (the frontend answers) and readiness (Triton is ready and serves at least one base model)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

router = APIRouter()


class Readiness(BaseModel):
    """Both answers of /health/ready (probes read the status code; people read the reason)."""

    status: Literal["ready", "unavailable"]
    reason: str | None = None
    models: list[str] | None = None  # ready: the served base models; a model down: those still serving
    restarting: list[str] | None = None
    failed: list[str] | None = None


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


# The 503 is a probe's answer, not an OpenAI error: documented with its own body.
@router.get("/health/ready", responses={200: {"model": Readiness},
                                        503: {"model": Readiness, "description": "Not ready, with the reason"}})
async def ready(request: Request):
    is_ready, answer = await request.app.state.engine.models.readiness()
    return answer if is_ready else JSONResponse(answer, status_code=503)
