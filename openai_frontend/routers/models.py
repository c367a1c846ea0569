"""`/v1/models` with vLLM's lineage format (adapters as models with `root` = adapter path, `parent` = base model)
and base-model lifecycle through Triton's model control (explicit mode)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from openai_frontend.auth import require_api_key, require_model_admin
from openai_frontend.errors import error_responses, model_not_found

router = APIRouter()
_CREATED = int(time.time())


def _card(model_id: str, root: str, parent: str | None, kind: str) -> dict:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "multilora", "root": root,
            "parent": parent, "kind": kind, "permission": []}


async def _cards(request: Request) -> list[dict]:
    catalog = request.app.state.catalog
    bases = await catalog.bases()
    cards = [_card(b.name, b.root, None, b.kind) for b in bases.values()]
    for name, (entry, base) in sorted((await catalog.adapters()).items()):
        cards.append(_card(catalog.listed_name(name, base), entry.path, base, f"{bases[base].kind}-lora"))
    return cards


@router.get("/v1/models", dependencies=[Depends(require_api_key)], responses=error_responses(401, 503))
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": await _cards(request)}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 404, 503))
async def get_model(model_id: str, request: Request) -> dict:
    for card in await _cards(request):
        if card["id"] == model_id:
            return card
    raise model_not_found(model_id)


async def _lifecycle(request: Request, name: str, load: bool) -> dict:
    gateway = request.app.state.gateway
    if name not in {m.name for m in await gateway.index()}:
        raise model_not_found(name)
    supervisor = request.app.state.supervisor
    if load and supervisor is not None and supervisor.state(name) != "ok":
        await gateway.unload(name)  # Triton treats loading a loaded model as a no-op, even with a dead process
    await (gateway.load(name) if load else gateway.unload(name))
    if supervisor is not None:
        supervisor.reset(name)  # an operator's reload gives the model a fresh restart budget
    await request.app.state.catalog.bases(fresh=True)
    return {"id": name, "object": "model", "state": "READY" if load else "UNAVAILABLE"}


# 400 and 503: Triton refuses the model-control request or is unavailable.
_LIFECYCLE_ERRORS = error_responses(400, 401, 403, 404, 503)


@router.post("/v1/models/{name}/load", dependencies=[Depends(require_model_admin)], responses=_LIFECYCLE_ERRORS)
async def load_model(name: str, request: Request) -> dict:
    return await _lifecycle(request, name, load=True)


@router.post("/v1/models/{name}/unload", dependencies=[Depends(require_model_admin)], responses=_LIFECYCLE_ERRORS)
async def unload_model(name: str, request: Request) -> dict:
    return await _lifecycle(request, name, load=False)
