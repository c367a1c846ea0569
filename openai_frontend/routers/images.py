"""`/v1/images/generations` on diffusion models (OpenAI's body plus vLLM-Omni's extras; see engine/images.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from openai_frontend.auth import require_api_key
from openai_frontend.disconnect import unless_disconnected
from openai_frontend.errors import error_responses
from openai_frontend.schemas import ImageGenerationRequest

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 404, 413, 503))


@router.post("/v1/images/generations")
async def generate_images(body: ImageGenerationRequest, request: Request) -> dict:
    return await unless_disconnected(request, request.app.state.engine.images.generations(body))
