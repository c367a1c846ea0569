"""Models as clients see them: `/v1/models` cards with vLLM's lineage (adapters as models, `root` = adapter path,
`parent` = base model), base-model lifecycle through Triton's model control (explicit mode), and readiness."""

from __future__ import annotations

import time

from openai_frontend.engine.catalog import Catalog
from openai_frontend.engine.gateway import TritonGateway
from openai_frontend.engine.supervisor import Supervisor
from openai_frontend.errors import OpenAIError, model_not_found

_CREATED = int(time.time())


def _card(model_id: str, root: str, parent: str | None, kind: str) -> dict:
    return {"id": model_id, "object": "model", "created": _CREATED, "owned_by": "multilora", "root": root,
            "parent": parent, "kind": kind, "permission": []}


class ModelService:
    def __init__(self, gateway: TritonGateway, catalog: Catalog, supervisor: Supervisor | None):
        self.gateway, self.catalog, self.supervisor = gateway, catalog, supervisor

    async def cards(self) -> list[dict]:
        catalog = self.catalog
        bases = await catalog.bases()
        cards = [_card(b.name, b.root, None, b.kind) for b in bases.values()]
        for name, (entry, base) in sorted((await catalog.adapters()).items()):
            cards.append(_card(catalog.listed_name(name, base), entry.path, base, f"{bases[base].kind}-lora"))
        return cards

    async def card(self, model_id: str) -> dict:
        for card in await self.cards():
            if card["id"] == model_id:
                return card
        raise model_not_found(model_id)

    async def lifecycle(self, name: str, load: bool) -> dict:
        gateway, supervisor = self.gateway, self.supervisor
        if name not in {m.name for m in await gateway.index()}:
            raise model_not_found(name)
        if load and supervisor is not None and supervisor.state(name) != "ok":
            await gateway.unload(name)  # Triton treats loading a loaded model as a no-op, even with a dead process
        await (gateway.load(name) if load else gateway.unload(name))
        if supervisor is not None:
            supervisor.reset(name)  # an operator's reload gives the model a fresh restart budget
        await self.catalog.bases(fresh=True)
        return {"id": name, "object": "model", "state": "READY" if load else "UNAVAILABLE"}

    async def readiness(self) -> tuple[bool, dict]:
        """(ready, the answer's body): Triton ready and a model READY, none restarting or given up on."""
        if not await self.gateway.ready():
            return False, {"status": "unavailable", "reason": "Triton is not ready"}
        try:
            bases = await self.catalog.bases(fresh=True)
        except OpenAIError as exc:  # the index call failed: same answer as Triton down
            return False, {"status": "unavailable", "reason": exc.message}
        down = self.supervisor.snapshot() if self.supervisor is not None else {}
        if any(down.values()):  # a model is restarting after its process died, or was given up on
            return False, {"status": "unavailable", "reason": "a model is restarting or down",
                           "models": sorted(n for n in bases if n not in down["restarting"] + down["failed"]),
                           **down}
        if not bases:
            return False, {"status": "unavailable", "reason": "no model is ready"}
        return True, {"status": "ready", "models": sorted(bases)}
