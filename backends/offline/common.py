"""What the offline generators share: the per-request adapter and the parameter dict the services take."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

from backends.errors import InvalidArgument
from backends.lora.manager.request import LoRAFields
from backends.settings import REPO_ROOT


@dataclass(frozen=True)
class LoRA:
    """One request's adapter, like vLLM's LoRARequest: a name (pre-loaded, registered or in a resolver dir) and/or
    a path (loaded on first use), a scale (default 1.0) and an optional stable id."""

    name: str | None = None
    path: str | None = None
    scale: float | None = None
    int_id: int | None = None

    def fields(self) -> LoRAFields:
        return LoRAFields(self.name, str(self.path) if self.path is not None else None, self.scale, self.int_id)


# One request's adapters: none, one, or a LoRA stack (several, each with its scale; their deltas add up).
LoRASpec = Union[LoRA, Sequence[LoRA], None]


def stack_fields(lora: LoRASpec) -> list[LoRAFields]:
    if lora is None:
        return []
    if isinstance(lora, LoRA):
        return [lora.fields()]
    if not lora or not all(isinstance(item, LoRA) for item in lora):
        raise InvalidArgument(f"a LoRA stack is a non-empty tuple of LoRA(...) entries (None: the base model), got "
                              f"{list(lora)!r}")
    return [item.fields() for item in lora]


def per_prompt(lora: LoRASpec | list[LoRASpec], prompts: int) -> list[LoRASpec]:
    """`lora` for each of `prompts` prompts: one spec for all, or a list with one spec per prompt (a spec that is
    itself a list is a LoRA stack)."""
    loras = list(lora) if isinstance(lora, list) else [lora] * prompts
    if len(loras) != prompts:
        raise ValueError(f"{prompts} prompts but {len(loras)} adapters")
    return loras


def config_defaults(model: str) -> dict[str, str]:
    """The parameters of model_repository/<model>/config.pbtxt: offline runs start from the served settings (slot
    rank, context length, limits), so an adapter the server takes is taken here too."""
    text = (REPO_ROOT / "model_repository" / model / "config.pbtxt").read_text()
    return dict(re.findall(r'key: "([^"]+)", value: \{ string_value: "([^"]*)" \}', text))


def service_params(model: str, model_path, preload: dict[str, str] | None, settings: dict) -> dict[str, str]:
    """The model parameters (config.pbtxt names) for an in-process service: the served model's, then `settings`.
    Adapter paths may lie anywhere (the allowed-roots policy guards a server against its clients; here the caller
    is the only client), and the server's dynamic registry file is not consulted: only `preload` names exist."""
    params = {**config_defaults(model), "lora_registry_file": "none", "allowed_lora_roots": "/",
              **{k: "" if v is None else str(v) for k, v in settings.items()}}
    params["model_path"] = "" if model_path is None else str(model_path)
    # Absolute (the server reads relative lora_modules paths under its cache dir; a caller means its own cwd), and
    # JSON, which takes any character in a path.
    params["lora_modules"] = json.dumps([{"name": name, "path": str(Path(path).expanduser().resolve())}
                                         for name, path in (preload or {}).items()]) if preload else ""
    return params
