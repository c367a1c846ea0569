"""What `model` names mean: Triton's READY models (base models, kind from their inputs) and every adapter as its own
model with lineage (static ones from each model's config, dynamic ones from the shared registry file)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from backends.errors import BackendError
from backends.lora.registry import AdapterEntry, LoRARegistry
from backends.lora.serving import LoRAServingConfig
from backends.settings import default_diffusion_model_path, default_llm_model_path
from openai_frontend.errors import OpenAIError, model_not_found
from openai_frontend.schemas import LoRARequest
from openai_frontend.triton import TritonGateway

LLM, DIFFUSION = "llm", "diffusion"


@dataclass(frozen=True)
class BaseModel:
    name: str
    kind: str  # LLM | DIFFUSION
    root: str  # model path (tokenizer for chat templates) or pipeline
    static_adapters: dict[str, AdapterEntry] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """A request's destination: a base model and, optionally, its adapter (sent to the backend as LoRA fields)."""

    base: BaseModel
    lora_name: str | None = None
    lora_path: str | None = None
    lora_scale: float | None = None
    lora_int_id: int | None = None

    def lora_parameters(self) -> dict:
        fields = {"lora_name": self.lora_name, "lora_path": self.lora_path, "lora_scale": self.lora_scale,
                  "lora_int_id": self.lora_int_id}
        return {k: v for k, v in fields.items() if v is not None}


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
                    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
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
        _, dynamic = self.registry.file.read() if self.registry.file else (0, {})
        default = self.default_base(bases, LLM)
        for name, entry in dynamic.items():
            base = entry.base_model if entry.base_model in bases else default
            if base is not None:
                out.setdefault(name, (entry, base))
        return out

    @staticmethod
    def default_base(bases: dict[str, BaseModel], kind: str) -> str | None:
        return next((b.name for b in bases.values() if b.kind == kind), None)

    async def resolve(self, model: str, lora: LoRARequest | None = None, scale: float | None = None) -> Target:
        """`model` = base name (optionally + `lora` object) or adapter name (vLLM/lmdeploy style); 503 while its
        base model is restarting."""
        target = await self._resolve(model, lora, scale)
        if self.supervisor is not None and (error := self.supervisor.unavailable(target.base.name)):
            raise error
        return target

    async def _resolve(self, model: str, lora: LoRARequest | None, scale: float | None) -> Target:
        bases = await self.bases()
        if model in bases:
            if lora is None:
                if scale is not None:
                    raise OpenAIError(400, "lora_scale was given without an adapter", "lora_scale")
                return Target(bases[model])
            try:
                path = str(self.registry.paths.check(lora.path))  # absolute, under an allowed root
            except BackendError as exc:
                raise OpenAIError(400, str(exc), "lora.path") from None
            return Target(bases[model], lora.name, path, lora.scale if lora.scale is not None else scale,
                          lora.int_id)
        adapters = await self.adapters()
        if self.separator and self.separator in model and model not in adapters:
            base, _, adapter = model.partition(self.separator)
            if base in bases and adapters.get(adapter, (None, None))[1] == base:
                return await self._resolve(adapter, lora, scale)
            raise model_not_found(model)
        if model in adapters:
            if lora is not None:
                raise OpenAIError(400, f"model '{model}' is already an adapter; send a lora object only with a "
                                       f"base model", "lora")
            entry, base = adapters[model]
            return Target(bases[base], lora_name=entry.name, lora_scale=scale)
        raise model_not_found(model)
