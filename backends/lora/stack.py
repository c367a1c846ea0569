"""A request's LoRA stack: several adapters, each with its own scale, whose deltas a row sums (diffusers'
`set_adapters([...], adapter_weights=[...])`, ComfyUI/A1111 LoRA stacks), without merging any weights.

The contract, per field, is a list: `lora_name` / `lora_path` / `lora_scale` / `lora_int_id` tensors of dims [-1],
or request parameters whose value is one value or a JSON array in a string (`lora_name: '["a", "b"]'`,
`lora_scale: '[0.7, 0.3]'`). Entry i of each list describes adapter i; names and paths, when both are given,
pair up one to one; scales and ids, when given, have one entry per adapter. One adapter is exactly the
single-value form of before.
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

from backends.errors import InvalidArgument
from backends.lora.resolver import LoRAFields


def parameter_list(params: dict[str, Any], name: str, kind: type) -> list | None:
    """A request parameter as a list: a JSON array in a string, or one value; None when absent."""
    if name not in params:
        return None
    value = params[name]
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidArgument(f"request parameter '{name}' is not a valid JSON array: {value!r}") from None
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


def lora_stack(names: Sequence[str] | None, paths: Sequence[str] | None, scales: Sequence[float] | None,
               int_ids: Sequence[int] | None) -> list[LoRAFields]:
    """The request's adapters, in order ([] = base model); lists whose lengths disagree are refused."""
    names = [n or None for n in names or []]
    paths = [p or None for p in paths or []]
    count = max(len(names), len(paths))
    if names and paths and len(names) != len(paths):
        raise InvalidArgument(f"lora_name has {len(names)} entries but lora_path has {len(paths)}: give one of "
                              f"each per adapter")
    for field, values in (("lora_scale", scales), ("lora_int_id", int_ids)):
        if values and count and len(values) != count:
            raise InvalidArgument(f"{field} has {len(values)} entries for {count} LoRA adapters: give one per "
                                  f"adapter")
    if count == 0:  # a scale or id without an adapter: `select` names the mistake
        if scales or int_ids:
            return [LoRAFields(scale=scales[0] if scales else None, int_id=int_ids[0] if int_ids else None)]
        return []
    return [LoRAFields(name=names[i] if names else None, path=paths[i] if paths else None,
                       scale=scales[i] if scales else None, int_id=int_ids[i] if int_ids else None)
            for i in range(count)]
