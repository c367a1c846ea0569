"""`Engine`: the frontend's protocol, one service per endpoint family, built once per app from its config (in the
spirit of Triton's own OpenAI frontend, whose routers call an engine and only speak HTTP)."""

from __future__ import annotations

import logging

from backends.errors import BackendError
from backends.lora.store.entries import AdapterEntry, parse_lora_modules
from backends.lora.store.registry import LoRARegistry
from openai_frontend.config import FrontendConfig
from openai_frontend.engine.adapters import AdapterService
from openai_frontend.engine.catalog import Catalog
from openai_frontend.engine.gateway import TritonGateway
from openai_frontend.engine.images import ImageService
from openai_frontend.engine.models import ModelService
from openai_frontend.engine.supervisor import Supervisor, SupervisorConfig
from openai_frontend.engine.text import TextService
from openai_frontend.engine.tokenizers import TokenizerService
from openai_frontend.metrics import FrontendMetrics

log = logging.getLogger(__name__)


def _register_static(registry: LoRARegistry, spec: str) -> None:
    """--lora-modules: written to the shared registry (replacing same-named entries) so the backends serve them."""
    for entry in parse_lora_modules(spec):
        registry.add(AdapterEntry(entry.name, entry.path, base_model=entry.base_model, pinned=True),
                     replace_existing=True)
        log.info("registered LoRA adapter '%s' -> %s", entry.name, entry.path)


class Engine:
    def __init__(self, config: FrontendConfig):
        registry = LoRARegistry(registry_file=config.registry_file, allowed_roots=config.roots)
        try:
            _register_static(registry, config.lora_modules)
        except BackendError as exc:
            raise SystemExit(f"--lora-modules: {exc}") from None
        self.config = config
        self.gateway = TritonGateway(config.triton_grpc_url, admin_key=config.admin_key)
        self.catalog = Catalog(self.gateway, registry, config.catalog_ttl_s, config.lora_separator)
        self.metrics = FrontendMetrics(config.triton_metrics_url)
        self.supervisor = Supervisor(self.gateway, self.catalog, self.metrics, SupervisorConfig(
            interval_s=config.probe_interval_s, max_restarts=config.max_model_restarts,
            window_s=config.restart_window_s)) if config.supervise else None
        self.images = ImageService(config, self.gateway, self.catalog, self.metrics)
        self.text = TextService(config, self.gateway, self.catalog, self.metrics, self.images)
        self.adapters = AdapterService(config, self.gateway, self.catalog)
        self.models = ModelService(self.gateway, self.catalog, self.supervisor)
        self.tokenizers = TokenizerService(config, self.catalog)

    def start(self) -> None:
        if self.supervisor is not None:
            self.supervisor.start()

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.gateway.close()
