"""The FastAPI app: the engine, its routers, OpenAI-shaped errors, body-size limit, request metrics."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from openai_frontend.auth import require_metrics_key
from openai_frontend.body_limit import BodyLimit
from openai_frontend.config import FrontendConfig
from openai_frontend.engine.engine import Engine
from openai_frontend.errors import error_responses, install_handlers, install_openapi
from openai_frontend.routers import health, images, lora, models, text, tokenize


class PrometheusText(Response):
    media_type = "text/plain; version=0.0.4"


def create_app(config: FrontendConfig) -> FastAPI:
    engine = Engine(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.stop()

    # Any route can fail internally (500); each route documents its other error statuses.
    app = FastAPI(title="multi-LoRA OpenAI-compatible frontend", lifespan=lifespan, docs_url=None, redoc_url=None,
                  responses=error_responses(500))
    app.state.config = config
    app.state.engine = engine
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
        metrics = engine.metrics
        metrics.requests.labels(template, str(response.status_code)).inc()
        metrics.latency.labels(template).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics", dependencies=[Depends(require_metrics_key)], response_class=PrometheusText,
             responses=error_responses(401))
    async def metrics_endpoint() -> PrometheusText:
        return PrometheusText(await engine.metrics.render())

    for router in (health.router, models.router, lora.router, text.router, images.router, tokenize.router):
        app.include_router(router)
    return app
