"""`/v1/models` (vLLM's lineage format) and base-model load/unload (see engine/models.py)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from openai_frontend.auth import require_api_key, require_model_admin
from openai_frontend.errors import error_responses

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(require_api_key)], responses=error_responses(401, 503))
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": await request.app.state.engine.models.cards()}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 404, 503))
async def get_model(model_id: str, request: Request) -> dict:
    return await request.app.state.engine.models.card(model_id)


# 400 and 503: Triton refuses the model-control request or is unavailable.
_LIFECYCLE_ERRORS = error_responses(400, 401, 403, 404, 503)


@router.post("/v1/models/{name}/load", dependencies=[Depends(require_model_admin)], responses=_LIFECYCLE_ERRORS)
async def load_model(name: str, request: Request) -> dict:
    return await request.app.state.engine.models.lifecycle(name, load=True)


@router.post("/v1/models/{name}/unload", dependencies=[Depends(require_model_admin)], responses=_LIFECYCLE_ERRORS)
async def unload_model(name: str, request: Request) -> dict:
    return await request.app.state.engine.models.lifecycle(name, load=False)
