"""Adapter file names and the errors that name an adapter's files; torch-free (the frontend and the store use it)."""

from __future__ import annotations

from pathlib import Path

from backends.errors import InvalidArgument, NotFound

CONFIG_FILE = "adapter_config.json"  # PEFT's
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
DIFFUSERS_WEIGHT_FILE = "pytorch_lora_weights.safetensors"
_MAX_LISTED = 6


class AdapterError(InvalidArgument):
    """The adapter exists but cannot be served; `problems` lists everything wrong with it."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        super().__init__(f"invalid LoRA adapter at {path}: " + "; ".join(problems))


class AdapterNotFoundError(NotFound):
    def __init__(self, path: str | Path, detail: str = "no such folder"):
        self.path = str(path)
        super().__init__(f"LoRA adapter not found at {path}: {detail}")


def listed(names: list[str] | set[str]) -> str:
    """A few names for a message, then how many more."""
    names = sorted(names)
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more
