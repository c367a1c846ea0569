"""vLLM's runtime LoRA API behind `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` (same bodies, statuses,
texts).

Only with --allow-runtime-lora-updating (else 404, like vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING). Load checks
the path, then warms the adapter into its base model with a one-token (or one-step) request naming it by path, so
a bad adapter is refused now with the backend's reason, and only then writes the shared registry (atomic), where
the backends find it by name and which survives a frontend restart.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from backends.errors import BackendError
from backends.lora.adapters.files import CONFIG_FILE
from backends.lora.store.downloads import downloads
from backends.lora.store.entries import AdapterEntry
from backends.lora.store.locations import is_s3
from openai_frontend.config import FrontendConfig
from openai_frontend.engine.catalog import DIFFUSION, LLM, Adapter, Catalog, Target
from openai_frontend.engine.gateway import TritonGateway
from openai_frontend.errors import OpenAIError, status_of
from openai_frontend.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest


class AdapterService:
    def __init__(self, config: FrontendConfig, gateway: TritonGateway, catalog: Catalog):
        self.config, self.gateway, self.catalog = config, gateway, catalog

    def _enabled(self) -> None:
        if not self.config.allow_runtime_lora_updating:
            raise OpenAIError(404, "Not found: runtime LoRA updating is disabled (start the frontend with "
                                   "--allow-runtime-lora-updating)")

    async def _warm(self, target: Target) -> None:
        params = target.lora_parameters()
        if target.base.kind == LLM:
            async for _ in self.gateway.generate(target.base.name, {"text_input": "Hi", "max_tokens": 1}, params):
                pass
        else:
            await self.gateway.images(target.base.name, {"prompt": "warm-up", "num_inference_steps": 1}, params)

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        """vLLM's success text; a PEFT folder goes to the text model, a single diffusers/kohya file to the image
        model, unless `base_model_name` says otherwise."""
        self._enabled()
        if not body.lora_name or not body.lora_path:
            raise OpenAIError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        catalog = self.catalog
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
        else:
            kind = LLM if (local / CONFIG_FILE).is_file() else DIFFUSION
            base = catalog.default_base(bases, kind)
            if base is None:
                raise OpenAIError(400, f"no ready {kind} model to load this adapter on; give base_model_name",
                                  "base_model_name")
        await self._warm(Target(bases[base], (Adapter(body.lora_name, path),)))
        try:  # a shared registry in object storage is a network round trip: off the event loop
            await asyncio.to_thread(registry.add, AdapterEntry(body.lora_name, path, base_model=base,
                                                               pinned=body.pinned),
                                    replace_existing=body.load_inplace)
        except BackendError as exc:
            raise OpenAIError(status_of(exc), str(exc)) from None
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        self._enabled()
        if not body.lora_name:
            raise OpenAIError(400, "'lora_name' must be provided.")
        try:
            await asyncio.to_thread(self.catalog.registry.remove, body.lora_name)
        except BackendError as exc:
            raise OpenAIError(status_of(exc), str(exc)) from None
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
