"""vLLM's runtime LoRA API: `/v1/load_lora_adapter`, `/v1/unload_lora_adapter` (same bodies, statuses, texts).

Only with --allow-runtime-lora-updating (else 404, like vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING). Load checks
the path, then warms the adapter into its base model with a one-token (or one-step) request naming it by path, so
a bad adapter is refused now with the backend's reason, and only then writes the shared registry file (atomic),
where the backends find it by name and which survives a frontend restart.
"""

from __future__ import annotations


import asyncio
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from backends.errors import BackendError
from backends.lora.adapters.files import CONFIG_FILE
from backends.lora.store.downloads import downloads
from backends.lora.store.locations import is_s3
from backends.lora.store.entries import AdapterEntry
from openai_frontend.auth import require_admin_key
from openai_frontend.catalog import DIFFUSION, LLM, Adapter, Target
from openai_frontend.errors import OpenAIError, error_responses, status_of
from openai_frontend.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

# Success is vLLM's plain-text sentence; errors are JSON like everywhere else.
router = APIRouter(dependencies=[Depends(require_admin_key)], default_response_class=PlainTextResponse,
                   responses=error_responses(400, 401, 404, 413))


def _enabled(request: Request) -> None:
    if not request.app.state.config.allow_runtime_lora_updating:
        raise OpenAIError(404, "Not found: runtime LoRA updating is disabled (start the frontend with "
                               "--allow-runtime-lora-updating)")


async def _warm(request: Request, target: Target) -> None:
    gateway = request.app.state.gateway
    params = target.lora_parameters()
    if target.base.kind == LLM:
        async for _ in gateway.generate(target.base.name, {"text_input": "Hi", "max_tokens": 1}, params):
            pass
    else:
        await gateway.images(target.base.name, {"prompt": "warm-up", "num_inference_steps": 1}, params)


@router.post("/v1/load_lora_adapter", responses=error_responses(503))  # warming the adapter needs its model
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
    _enabled(request)
    if not body.lora_name or not body.lora_path:
        raise OpenAIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
    catalog = request.app.state.catalog
    registry = catalog.registry
    bases = await catalog.bases()
    if (body.lora_name in await catalog.adapters() or body.lora_name in bases) and not body.load_inplace:
        raise OpenAIError(400, f"The lora adapter '{body.lora_name}' has already been loaded.")
    try:
        path = registry.paths.check(body.lora_path)
        local = Path(await asyncio.to_thread(downloads().fetch, path) if is_s3(path) else path)
    except BackendError as exc:
        raise OpenAIError(status_of(exc), str(exc), "lora_path") from None
    if not local.exists():
        raise OpenAIError(404, f"LoRA adapter path '{body.lora_path}' not found", "lora_path")
    if body.base_model_name:
        if body.base_model_name not in bases:
            raise OpenAIError(404, f"The model '{body.base_model_name}' does not exist.", "base_model_name")
        base = body.base_model_name
    else:  # a PEFT folder is a text adapter by default, a single diffusers/kohya file an image one
        kind = LLM if (local / CONFIG_FILE).is_file() else DIFFUSION
        base = catalog.default_base(bases, kind)
        if base is None:
            raise OpenAIError(400, f"no ready {kind} model to load this adapter on; give base_model_name",
                              "base_model_name")
    await _warm(request, Target(bases[base], (Adapter(body.lora_name, path),)))
    try:  # a shared registry in object storage is a network round trip: off the event loop
        await asyncio.to_thread(registry.add, AdapterEntry(body.lora_name, path, base_model=base, pinned=body.pinned),
                                replace_existing=body.load_inplace)
    except BackendError as exc:
        raise OpenAIError(status_of(exc), str(exc)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", responses=error_responses(503))  # a shared registry may be unreachable
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
    _enabled(request)
    if not body.lora_name:
        raise OpenAIError(400, "'lora_name' must be provided.")
    try:
        await asyncio.to_thread(request.app.state.catalog.registry.remove, body.lora_name)
    except BackendError as exc:
        raise OpenAIError(status_of(exc), str(exc)) from None
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
