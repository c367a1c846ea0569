"""The FastAPI app: routers, OpenAI-shaped errors, body-size limit, request metrics, shared state."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from backends.errors import BackendError
from backends.lora.store.entries import AdapterEntry, parse_lora_modules
from backends.lora.store.registry import LoRARegistry
from openai_frontend.auth import require_metrics_key
from openai_frontend.catalog import Catalog
from openai_frontend.config import FrontendConfig
from openai_frontend.body_limit import BodyLimit
from openai_frontend.errors import error_responses, install_handlers, install_openapi
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.routers import health, images, lora, models, text, tokenize
from openai_frontend.supervisor import Supervisor, SupervisorConfig
from openai_frontend.triton import TritonGateway

log = logging.getLogger(__name__)


class PrometheusText(Response):
    media_type = "text/plain; version=0.0.4"


def _register_static(registry: LoRARegistry, spec: str) -> None:
    """--lora-modules: written to the shared registry (replacing same-named entries) so the backends serve them."""
    for entry in parse_lora_modules(spec):
        registry.add(AdapterEntry(entry.name, entry.path, base_model=entry.base_model, pinned=True),
                     replace_existing=True)
        log.info("registered LoRA adapter '%s' -> %s", entry.name, entry.path)


def create_app(config: FrontendConfig) -> FastAPI:
    registry = LoRARegistry(registry_file=config.registry_file, allowed_roots=config.roots)
    try:
        _register_static(registry, config.lora_modules)
    except BackendError as exc:
        raise SystemExit(f"--lora-modules: {exc}") from None
    gateway = TritonGateway(config.triton_grpc_url, admin_key=config.admin_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        supervisor = app.state.supervisor
        if supervisor is not None:
            supervisor.start()
        yield
        if supervisor is not None:
            await supervisor.stop()
        await gateway.close()

    # Any route can fail internally (500); each route documents its other error statuses.
    app = FastAPI(title="multi-LoRA OpenAI-compatible frontend", lifespan=lifespan, docs_url=None, redoc_url=None,
                  responses=error_responses(500))
    app.state.config = config
    app.state.gateway = gateway
    app.state.catalog = Catalog(gateway, registry, config.catalog_ttl_s, config.lora_separator)
    app.state.metrics = FrontendMetrics(config.triton_metrics_url)
    app.state.supervisor = Supervisor(gateway, app.state.catalog, app.state.metrics, SupervisorConfig(
        interval_s=config.probe_interval_s, max_restarts=config.max_model_restarts,
        window_s=config.restart_window_s)) if config.supervise else None
    install_handlers(app)
    install_openapi(app)

    # Innermost (added first): FastAPI's body parsing then sees the 413 raised while it reads the body.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.middleware("http")
    async def route_metrics(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        # Label by route template (bounded), never by the raw path a client chose.
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        metrics = app.state.metrics
        metrics.requests.labels(template, str(response.status_code)).inc()
        metrics.latency.labels(template).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics", dependencies=[Depends(require_metrics_key)], response_class=PrometheusText,
             responses=error_responses(401))
    async def metrics_endpoint() -> PrometheusText:
        return PrometheusText(await app.state.metrics.render())

    for router in (health.router, models.router, lora.router, text.router, images.router, tokenize.router):
        app.include_router(router)
    return app
