"""vLLM's runtime LoRA API: `/v1/load_lora_adapter`, `/v1/unload_lora_adapter` (see engine/adapters.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from openai_frontend.auth import require_admin_key
from openai_frontend.errors import error_responses
from openai_frontend.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

# Success is vLLM's plain-text sentence; errors are JSON like everywhere else.
router = APIRouter(dependencies=[Depends(require_admin_key)], default_response_class=PlainTextResponse,
                   responses=error_responses(400, 401, 404, 413))


@router.post("/v1/load_lora_adapter", responses=error_responses(503))  # warming the adapter needs its model
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
    return PlainTextResponse(await request.app.state.engine.adapters.load(body))


@router.post("/v1/unload_lora_adapter", responses=error_responses(503))  # a shared registry may be unreachable
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
    return PlainTextResponse(await request.app.state.engine.adapters.unload(body))
