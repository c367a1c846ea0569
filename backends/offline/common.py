"""What the offline generators share: the per-request adapter and the parameter dict the services take."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from backends.lora.resolver import LoRAFields


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


def service_params(model_path, preload: dict[str, str] | None, settings: dict) -> dict[str, str]:
    """The model parameters (config.pbtxt names) for an in-process service. Adapter paths may lie anywhere: the
    allowed-roots policy guards a server against its clients, and here the caller is the only client."""
    params = {k: "" if v is None else str(v) for k, v in settings.items()}
    if model_path is not None:
        params["model_path"] = str(model_path)
    # Absolute: the server reads relative lora_modules paths under its cache dir, a caller means its own cwd.
    params["lora_modules"] = " ".join(f"{name}={Path(path).expanduser().resolve()}"
                                      for name, path in (preload or {}).items())
    params.setdefault("allowed_lora_roots", "/")
    return params
