"""Liveness (the frontend answers) and readiness (Triton is ready and serves at least one base model)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from openai_frontend.errors import OpenAIError

router = APIRouter()


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/health/ready")
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
