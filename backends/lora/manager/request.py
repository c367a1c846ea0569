"""The request contract shared by every model that serves adapters, and what a request's adapters become.

A request names a LoRA stack: several adapters, each with its own scale, whose deltas a row sums (diffusers'
`set_adapters([...], adapter_weights=[...])`, ComfyUI/A1111 LoRA stacks), without merging any weights. Per field
the contract is a list: `lora_name` / `lora_path` / `lora_scale` / `lora_int_id` tensors of dims [-1], or request
parameters whose value is one value or a JSON array in a string (`lora_name: '["a", "b"]'`, `lora_scale:
'[0.7, 0.3]'`). Entry i of each list describes adapter i; names and paths, when both are given, pair up one to
one; scales and ids, when given, have one entry per adapter (a `null` id in a JSON array: derive that one). One
adapter is the single-value form.

On the way down: the lists -> one `LoRAFields` per adapter (`fields_from_lists`) -> one `LoRASelection` per
adapter, validated and in host memory (`AdapterSelector.select_stack`) -> the row's (slot, scale) pairs once its
slots are held (`backends.lora.ops.batch.RowLoRA`). Torch-free.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from backends.errors import InvalidArgument

DEFAULT_MAX_LORAS_PER_REQUEST = 4


@dataclass(frozen=True)
class LoRAFields:
    """One adapter of a request, as sent (None = not given)."""

    name: str | None = None
    path: str | None = None
    scale: float | None = None
    int_id: int | None = None

    @property
    def empty(self) -> bool:
        return self.name is None and self.path is None and self.int_id is None


@dataclass(frozen=True)
class AdapterRef:
    """What a request names, resolved: a stable id plus where the adapter lives (and a name for messages)."""

    int_id: int
    name: str
    path: str
    version: int = 0  # the files' signature for adapters that may change on disk; 0 = fixed (static)

    @property
    def key(self) -> int:
        """The cache key: the id alone, or id + files version, so a rewritten adapter is a new cache entry while
        batches still running on the old weights keep their slot."""
        if not self.version:
            return self.int_id
        return (hash((self.int_id, self.version)) & ((1 << 63) - 1)) or 1  # ints hash the same in every process


@dataclass(frozen=True)
class LoRASelection:
    """One adapter of a request with its scale: validated and in host memory, or being read (`ready`, see
    `AdapterSelector.select`)."""

    ref: AdapterRef
    scale: float
    ready: Future | None = field(default=None, compare=False, repr=False)  # of a prefetch.Loaded (torch-free here)


def parameter_list(params: dict[str, Any], name: str, kind: type, nullable: bool = False) -> list | None:
    """A request parameter as a list: a JSON array in a string, or one value; None when absent. `nullable`: a
    JSON array may hold null entries (None)."""
    if name not in params:
        return None
    value = params[name]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidArgument(f"request parameter '{name}' is not a valid JSON array: {value!r}") from None
        if nullable and isinstance(value, list):
            return [None if v is None else _convert(v, name, kind) for v in value]
    return [_convert(v, name, kind) for v in (value if isinstance(value, list) else [value])]


def _convert(value: Any, name: str, kind: type) -> Any:
    if kind is str and not isinstance(value, str):
        raise InvalidArgument(f"request parameter '{name}' must hold strings, got {value!r}")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"request parameter '{name}' must be {kind.__name__}, got {value!r}") from None
    if kind is int and isinstance(value, float) and not (math.isfinite(value) and value == converted):
        raise InvalidArgument(f"request parameter '{name}' must be an integer, got {value!r}")
    return converted


def fields_from_lists(names: Sequence[str] | None, paths: Sequence[str] | None, scales: Sequence[float] | None,
                      int_ids: Sequence[int | None] | None) -> list[LoRAFields]:
    """The request's adapters, in order ([] = base model); lists whose lengths disagree are refused."""
    names = [n or None for n in names or []]
    paths = [p or None for p in paths or []]
    count = max(len(names), len(paths))
    if names and paths and len(names) != len(paths):
        raise InvalidArgument(f"lora_name has {len(names)} entries but lora_path has {len(paths)}: give one of "
                              f"each per adapter")
    for what, values in (("lora_scale", scales), ("lora_int_id", int_ids)):
        if values and count and len(values) != count:
            raise InvalidArgument(f"{what} has {len(values)} entries for {count} LoRA adapters: give one per "
                                  f"adapter")
    if count == 0:  # a scale or id without an adapter: the selector names the mistake
        if int_ids and int_ids[0] is None:
            raise InvalidArgument("lora_int_id was given without lora_name or lora_path")
        if scales or int_ids:
            return [LoRAFields(scale=scales[0] if scales else None, int_id=int_ids[0] if int_ids else None)]
        return []
    return [LoRAFields(name=names[i] if names else None, path=paths[i] if paths else None,
                       scale=scales[i] if scales else None, int_id=int_ids[i] if int_ids else None)
            for i in range(count)]
