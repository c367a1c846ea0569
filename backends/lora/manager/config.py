"""A model's LoRA settings from its config.pbtxt parameters (`LoRAServingConfig`), torch-free: the frontend reads
a model's static adapters with it.

Every model that serves adapters uses the same parameters, defaults and environment variables, so the LLM and the
diffusion models behave alike and the frontend can share their registry file. `AdapterSelector.build` turns a
config into a model's registry, cache and selector.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from backends.lora.manager.request import DEFAULT_MAX_LORAS_PER_REQUEST
from backends.lora.store.entries import AdapterEntry, parse_lora_modules
from backends.lora.store.locations import is_s3, location, split_locations
from backends.model_params import param_int, param_str
from backends.settings import (
    ALLOWED_LORA_ROOTS_ENV,
    LORA_RESOLVER_DIRS_ENV,
    adapters_dir,
    cache_dir,
    env_locations,
    lora_registry_file,
)


def _locations(params: dict[str, str], key: str) -> list[str | Path]:
    return split_locations(param_str(params, key, ""), ",")


@dataclass(frozen=True)
class LoRAServingConfig:
    max_loras: int = 16  # device slots: distinct adapters in one batch; 0 disables LoRA
    max_lora_rank: int = 16
    max_loras_per_request: int = DEFAULT_MAX_LORAS_PER_REQUEST  # adapters in one request's LoRA stack
    # `lora_target_modules`: which layers take LoRA (None = the model kind's default; LLM: PEFT's forms, see
    # backends.lora.adapters.targets.parse_target_modules; diffusion: a regex over pipeline module names)
    target_modules: str | None = None
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
        max_loras, max_lora_rank, max_loras_per_request, lora_target_modules, max_cpu_loras, max_cpu_lora_bytes,
        lora_registry_file ("none": no dynamic registry), allowed_lora_roots and lora_resolver_dirs
        (comma-separated; the env lists MULTILORA_ALLOWED_LORA_ROOTS and MULTILORA_LORA_RESOLVER_DIRS add to them).
        The adapters folder of the project cache is always allowed."""
        static = tuple(
            replace(e, path=e.path if is_s3(e.path) else
                    str(p if (p := Path(e.path).expanduser()).is_absolute() else cache_dir() / p))
            for e in parse_lora_modules(param_str(params, "lora_modules", ""))
        )
        max_loras = param_int(params, "max_loras", cls.max_loras)
        max_cpu = param_int(params, "max_cpu_loras", cls.max_cpu_loras)
        registry = param_str(params, "lora_registry_file", "")
        return cls(
            max_loras=max_loras,
            max_lora_rank=param_int(params, "max_lora_rank", cls.max_lora_rank),
            max_loras_per_request=param_int(params, "max_loras_per_request", cls.max_loras_per_request),
            target_modules=param_str(params, "lora_target_modules", None),
            max_cpu_loras=max(max_cpu, max_loras),
            max_cpu_lora_bytes=param_int(params, "max_cpu_lora_bytes", None),
            static=static,
            registry_file=(None if registry.lower() == "none" else location(registry) if registry
                           else lora_registry_file()),
            allowed_roots=(adapters_dir(), *_locations(params, "allowed_lora_roots"),
                           *env_locations(ALLOWED_LORA_ROOTS_ENV)),
            resolver_dirs=(*_locations(params, "lora_resolver_dirs"), *env_locations(LORA_RESOLVER_DIRS_ENV)),
        )
