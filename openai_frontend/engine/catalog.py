"""What `model` names mean: Triton's READY models (base models, kind from their inputs) and every adapter as its own
model with lineage (static ones from each model's config, dynamic ones from the shared registry file)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from backends.errors import BackendError
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.store.entries import AdapterEntry
from backends.lora.store.registry import LoRARegistry
from backends.model_params import model_parameters
from backends.settings import default_diffusion_model_path, default_llm_model_path
from openai_frontend.engine.gateway import TritonGateway
from openai_frontend.errors import OpenAIError, bad_request, model_not_found
from openai_frontend.schemas import LoRAField, LoRARequest

LLM, DIFFUSION = "llm", "diffusion"


@dataclass(frozen=True)
class BaseModel:
    name: str
    kind: str  # LLM | DIFFUSION
    root: str  # model path (tokenizer for chat templates) or pipeline
    static_adapters: dict[str, AdapterEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class Adapter:
    """One adapter of a request: by name (path None: the backend resolves it, static ones stay pinned) or by name
    and path (checked against the allowed roots)."""

    name: str
    path: str | None = None
    scale: float | None = None
    int_id: int | None = None


@dataclass(frozen=True)
class Target:
    """A request's destination: a base model and its LoRA stack (none, one adapter, or several whose deltas add
    up), sent to the backend as the LoRA fields."""

    base: BaseModel
    adapters: tuple[Adapter, ...] = ()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.adapters)

    @property
    def lora_name(self) -> str | None:
        """A label for the whole stack ("a+b"), None for the base model."""
        return "+".join(self.adapter_names) or None

    def lora_parameters(self) -> dict:
        """One adapter: plain values, exactly as before stacks. A stack: each field a JSON array (the backends'
        list form), sent when some adapter has it; a list has no gaps, so the others get what the backend would
        use for them anyway (empty path = resolve by name, scale 1.0, id null = derived by the backend)."""
        if len(self.adapters) == 1:
            (a,) = self.adapters
            fields = {"lora_name": a.name, "lora_path": a.path, "lora_scale": a.scale, "lora_int_id": a.int_id}
            return {k: v for k, v in fields.items() if v is not None}
        if not self.adapters:
            return {}
        params = {"lora_name": json.dumps(self.adapter_names)}
        if any(a.path for a in self.adapters):
            params["lora_path"] = json.dumps([a.path or "" for a in self.adapters])
        if any(a.scale is not None for a in self.adapters):
            params["lora_scale"] = json.dumps([1.0 if a.scale is None else a.scale for a in self.adapters])
        if any(a.int_id is not None for a in self.adapters):
            params["lora_int_id"] = json.dumps([a.int_id for a in self.adapters])
        return params


def _kind(config: dict) -> str | None:
    inputs = {i["name"] for i in config.get("input", [])}
    outputs = {o["name"] for o in config.get("output", [])}
    if "text_input" in inputs and "text_output" in outputs:
        return LLM
    if "prompt" in inputs and "images" in outputs:
        return DIFFUSION
    return None


class Catalog:
    def __init__(self, gateway: TritonGateway, registry: LoRARegistry, ttl_s: float = 2.0,
                 separator: str | None = None):
        self.gateway = gateway
        self.registry = registry
        self.ttl_s = ttl_s
        self._bases: dict[str, BaseModel] = {}
        self._fetched = 0.0
        self._lock = asyncio.Lock()
        self.supervisor = None  # set by the supervisor: models it restarts stay known (answered with 503)
        self.separator = separator  # Triton-frontend naming "<base><sep><adapter>", when set

    async def bases(self, fresh: bool = False) -> dict[str, BaseModel]:
        """READY base models, re-read from Triton at most every ttl_s seconds (503 when Triton is down)."""
        async with self._lock:
            if fresh or time.monotonic() - self._fetched > self.ttl_s:
                bases = {}
                for state in await self.gateway.index():
                    if state.state != "READY":
                        continue
                    config = await self.gateway.config(state.name)
                    kind = _kind(config)
                    if kind is None:
                        continue
                    params = model_parameters(config)
                    root = params.get("model_path") or (str(default_llm_model_path()) if kind == LLM else
                                                        default_diffusion_model_path())
                    try:
                        static = {e.name: e for e in LoRAServingConfig.from_parameters(params).static}
                    except (BackendError, ValueError):
                        static = {}
                    bases[state.name] = BaseModel(state.name, kind, root, static)
                if self.supervisor is not None:  # restarting or down: still the same model, answered with 503
                    for name, base in self._bases.items():
                        if name not in bases and self.supervisor.state(name) != "ok":
                            bases[name] = base
                self._bases, self._fetched = bases, time.monotonic()
            return self._bases

    def listed_name(self, adapter: str, base: str) -> str:
        """How /v1/models names an adapter: as is, or `<base><sep><adapter>` with a separator."""
        return f"{base}{self.separator}{adapter}" if self.separator else adapter

    async def adapters(self) -> dict[str, tuple[AdapterEntry, str]]:
        """Every adapter name -> (entry, base model name): static ones of READY models, then the registry's."""
        bases = await self.bases()
        out: dict[str, tuple[AdapterEntry, str]] = {}
        for base in bases.values():
            for name, entry in base.static_adapters.items():
                out.setdefault(name, (entry, base.name))
        # A registry in object storage is a network round trip (a connect timeout while the store is down): off
        # the event loop.
        _, dynamic = await asyncio.to_thread(self.registry.file.read) if self.registry.file else (0, {})
        default = self.default_base(bases, LLM)
        for name, entry in dynamic.items():
            base = entry.base_model if entry.base_model in bases else default
            if base is not None:
                out.setdefault(name, (entry, base))
        return out

    async def resolve(self, model: str | None, kind: str, either: bool = False) -> str:
        """`model` as sent or, as vLLM makes it optional, the one served base model of `kind` that a request without
        it means; `either`: with no model of that kind, the one served model of any kind (chat on a server of one
        image model). Several candidates: a 400 naming them."""
        if model is not None:
            return model
        bases = await self.bases()
        names = sorted(b.name for b in bases.values() if b.kind == kind)
        what = "text" if kind == LLM else "image"
        if not names and either:
            names, what = sorted(bases), "base"
        if len(names) == 1:
            return names[0]
        if not names:
            raise bad_request(f"model is required: no {what} model is served", "model")
        raise bad_request(f"model is required: {len(names)} {what} models are served ({', '.join(names)}); "
                          f"name one", "model")

    @staticmethod
    def default_base(bases: dict[str, BaseModel], kind: str) -> str | None:
        return next((b.name for b in bases.values() if b.kind == kind), None)

    async def target(self, model: str, lora: LoRAField | None = None, scale: float | None = None) -> Target:
        """`model` = base name or adapter name (vLLM/lmdeploy style); `lora` (an object or a list of them) adds
        adapters to it, after the one `model` names. 503 while the base model is restarting."""
        requested = [lora] if isinstance(lora, LoRARequest) else list(lora or [])
        target = await self._find(model, requested, scale, "lora" if isinstance(lora, LoRARequest) else None)
        if self.supervisor is not None and (error := self.supervisor.unavailable(target.base.name)):
            raise error
        return target

    async def _find(self, model: str, lora: list[LoRARequest], scale: float | None, single: str | None) -> Target:
        bases = await self.bases()
        if model in bases:
            if not lora and scale is not None:
                raise OpenAIError(400, "lora_scale was given without an adapter", "lora_scale")
            # With a base model, lora_scale is the default scale of the `lora` adapters (as before stacks).
            return Target(bases[model], tuple(self._checked(lora, scale, single)))
        adapters = await self.adapters()
        if self.separator and self.separator in model and model not in adapters:
            base, _, adapter = model.partition(self.separator)
            if base in bases and adapters.get(adapter, (None, None))[1] == base:
                return await self._find(adapter, lora, scale, single)
            raise model_not_found(model)
        if model in adapters:
            entry, base = adapters[model]
            return Target(bases[base], (Adapter(entry.name, scale=scale), *self._checked(lora, None, single)))
        raise model_not_found(model)

    def _checked(self, lora: list[LoRARequest], scale: float | None, single: str | None) -> list[Adapter]:
        out = []
        for i, request in enumerate(lora):
            try:
                path = str(self.registry.paths.check(request.path))  # absolute, under an allowed root
            except BackendError as exc:
                raise OpenAIError(400, str(exc), f"{single or f'lora.{i}'}.path") from None
            out.append(Adapter(request.name, path, request.scale if request.scale is not None else scale,
                               request.int_id))
        return out
