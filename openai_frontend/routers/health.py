"""Liveness (the frontend answers) and readiness (Triton is ready and serves at least one base model)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from openai_frontend.errors import OpenAIError

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
    gateway = request.app.state.gateway
    if not await gateway.ready():
        return JSONResponse({"status": "unavailable", "reason": "Triton is not ready"}, status_code=503)
    try:
        bases = await request.app.state.catalog.bases(fresh=True)
    except OpenAIError as exc:  # the index call failed: same answer as Triton down
        return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
    supervisor = request.app.state.supervisor
    down = supervisor.snapshot() if supervisor is not None else {}
    if any(down.values()):  # a model is restarting after its process died, or was given up on
        return JSONResponse({"status": "unavailable", "reason": "a model is restarting or down",
                             "models": sorted(n for n in bases if n not in down["restarting"] + down["failed"]),
                             **down}, status_code=503)
    if not bases:
        return JSONResponse({"status": "unavailable", "reason": "no model is ready"}, status_code=503)
    return {"status": "ready", "models": sorted(bases)}
