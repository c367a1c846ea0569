"""`/v1/images/generations` on diffusion models (OpenAI's body plus vLLM-Omni's extras: seed, steps, guidance,
negative prompt, `lora` object). `n` images come from one request, so they share one denoising batch. Chat
completions on an image model render through `generate` too."""

from __future__ import annotations

import base64
import re
import time

from fastapi import APIRouter, Depends, Request

from openai_frontend.auth import require_api_key
from openai_frontend.catalog import DIFFUSION, Target
from openai_frontend.disconnect import unless_disconnected
from openai_frontend.errors import bad_request, error_responses
from openai_frontend.schemas import ImageGenerationRequest
from openai_frontend.triton import Images

router = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(400, 401, 404, 413, 503))
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


@router.post("/v1/images/generations")
async def generate_images(body: ImageGenerationRequest, request: Request) -> dict:
    target = await request.app.state.catalog.resolve(body.model, body.lora, body.lora_scale)
    if target.base.kind != DIFFUSION:
        raise bad_request(f"model '{body.model}' is a text model: use /v1/chat/completions", "model")
    if body.response_format != "b64_json":
        raise bad_request("response_format 'url' is not supported: use 'b64_json'", "response_format")
    images = await generate(request, target, body)
    return {"created": int(time.time()), "model": body.model, "pipeline": images.pipeline, "seed": images.seed,
            "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None} for png in images.pngs]}


async def generate(request: Request, target: Target, body: ImageGenerationRequest) -> Images:
    """Checks an image request against the frontend's limits and renders it: shared by this route and chat
    completions on an image model."""
    app = request.app.state
    config = app.config
    if body.n > config.max_images:
        raise bad_request(f"n must be <= {config.max_images}, got {body.n}", "n")
    if not body.prompt.strip():
        raise bad_request("prompt must be a non-empty string", "prompt")
    if len(body.prompt) > config.max_prompt_chars:
        raise bad_request(f"prompt exceeds {config.max_prompt_chars} characters", "prompt")
    width = height = None
    if body.size and body.size != "auto":
        match = _SIZE.match(body.size)
        if not match:
            raise bad_request(f"size must look like '512x512', got {body.size!r}", "size")
        width, height = int(match[1]), int(match[2])
        if max(width, height) > config.max_image_size:
            raise bad_request(f"size {body.size} exceeds {config.max_image_size} pixels per side", "size")
    fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt or "", "height": height,
              "width": width, "num_inference_steps": body.num_inference_steps,
              "guidance_scale": body.guidance_scale, "seed": body.seed, "num_images": body.n}
    images = await unless_disconnected(
        request, app.gateway.images(target.base.name, fields, target.lora_parameters()))
    app.metrics.images.labels(body.model).inc(len(images.pngs))
    return images
