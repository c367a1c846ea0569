"""Build a model's LoRA stack (registry, cache, resolver) from its config.pbtxt parameters.

Every model that serves adapters uses the same parameters, defaults and environment variables, so the LLM and the
diffusion models behave alike and the frontend can share their registry file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable


from backends.lora.adapter import LoRAAdapter, load_adapter
from backends.model_params import param_int
from backends.lora.cache import AdapterRef, LoRACache
from backends.lora.object_store import is_s3, location, split_locations
from backends.lora.patch import LoRAContext
from backends.lora.registry import AdapterEntry, LoRARegistry, parse_lora_modules
from backends.lora.resolver import DEFAULT_MAX_LORAS_PER_REQUEST, AdapterResolver
from backends.settings import (
    ALLOWED_LORA_ROOTS_ENV, LORA_RESOLVER_DIRS_ENV, adapters_dir, cache_dir, env_locations, lora_registry_file,
)

log = logging.getLogger(__name__)


def _locations(params: dict[str, str], key: str) -> list[str | Path]:
    return split_locations(params.get(key) or "", ",")


@dataclass(frozen=True)
class LoRAServingConfig:
    max_loras: int = 16  # device slots: distinct adapters in one batch; 0 disables LoRA
    max_lora_rank: int = 16
    max_loras_per_request: int = DEFAULT_MAX_LORAS_PER_REQUEST  # adapters in one request's LoRA stack
    max_cpu_loras: int = 64
    max_cpu_lora_bytes: int | None = None
    static: tuple[AdapterEntry, ...] = ()
    registry_file: str | Path | None = field(default_factory=lora_registry_file)  # None: no dynamic registry
    allowed_roots: tuple[str | Path, ...] = ()  # folders and s3:// buckets or prefixes
    resolver_dirs: tuple[str | Path, ...] = ()  # folders or s3:// prefixes

    @property
    def enabled(self) -> bool:
        return self.max_loras > 0

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "LoRAServingConfig":
        """Model parameters: lora_modules (vLLM --lora-modules forms; relative paths are under the project cache),
        max_loras, max_lora_rank, max_loras_per_request, max_cpu_loras, max_cpu_lora_bytes, lora_registry_file ("none": no dynamic
        registry), allowed_lora_roots and
        lora_resolver_dirs (comma-separated; the env lists MULTILORA_ALLOWED_LORA_ROOTS and
        MULTILORA_LORA_RESOLVER_DIRS add to them). The adapters folder of the project cache is always allowed."""
        static = tuple(
            replace(e, path=e.path if is_s3(e.path) else
                    str(p if (p := Path(e.path).expanduser()).is_absolute() else cache_dir() / p))
            for e in parse_lora_modules(params.get("lora_modules") or "")
        )
        max_loras = param_int(params, "max_loras", cls.max_loras)
        max_cpu = param_int(params, "max_cpu_loras", cls.max_cpu_loras)
        registry = (params.get("lora_registry_file") or "").strip()
        return cls(
            max_loras=max_loras,
            max_lora_rank=param_int(params, "max_lora_rank", cls.max_lora_rank),
            max_loras_per_request=param_int(params, "max_loras_per_request", cls.max_loras_per_request),
            max_cpu_loras=max(max_cpu, max_loras),
            max_cpu_lora_bytes=param_int(params, "max_cpu_lora_bytes", None),
            static=static,
            registry_file=(None if registry.lower() == "none" else location(registry) if registry
                           else lora_registry_file()),
            allowed_roots=(adapters_dir(), *_locations(params, "allowed_lora_roots"),
                           *env_locations(ALLOWED_LORA_ROOTS_ENV)),
            resolver_dirs=(*_locations(params, "lora_resolver_dirs"), *env_locations(LORA_RESOLVER_DIRS_ENV)),
        )


def build_resolver(context: LoRAContext, config: LoRAServingConfig,
                   run: Callable[[Callable], object] = lambda fn: fn(),
                   load: Callable[[str], LoRAAdapter] | None = None) -> AdapterResolver:
    """Registry + cache + resolver over a patched model's context; static adapters are loaded and pinned.

    `run` executes adapter loads for the resolver: models that keep all torch work on one thread pass its
    hand-over. `load` reads one adapter (path -> validated adapter); default: a PEFT folder for `context`."""
    spec = context.spec
    load = load or (lambda path: load_adapter(path, spec, config.max_lora_rank, dtype=context.dtype))

    def loader(ref: AdapterRef) -> LoRAAdapter:
        return load(ref.path)

    registry = LoRARegistry(config.static, config.registry_file, config.resolver_dirs, config.allowed_roots)
    cache = LoRACache(context, loader, config.max_cpu_loras, config.max_cpu_lora_bytes)
    resolver = AdapterResolver(registry, cache, run=run, max_per_request=config.max_loras_per_request)
    resolver.pin_static()
    log.info("LoRA: %d slots, max rank %d, host cache %d adapters; registry %s; allowed roots %s",
             config.max_loras, config.max_lora_rank, config.max_cpu_loras, config.registry_file,
             registry.paths.roots)
    return resolver
