"""The part every LoRA-wrapped layer shares: the base layer, the context, and the stacked per-slot weights."""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import nn

from backends.lora.layers.context import LoRAContext
from backends.lora.layers.dora import DoraSlots
from backends.lora.ops.base import LoRAOps


class SlotLayer(nn.Module):
    """Wraps `base`; `lora_A` [slots, max_rank, in_features] and `lora_B` [slots, max_rank, out_features] hold each
    slot's adapter (B transposed, so a run of slots is one contiguous [slots * rank, out] matrix). A conv layer
    passes its flattened kernel size as `in_features`."""

    def __init__(self, base: nn.Module, context: LoRAContext, name: str, in_features: int, out_features: int):
        super().__init__()
        self.base = base
        self.name = name
        self._context = [context]  # a list, so nn.Module does not register the context as a child
        self.in_features, self.out_features = in_features, out_features
        kw = dict(dtype=context.dtype, device=context.device)
        # Not persistent: the model's state_dict stays the base model's.
        self.register_buffer("lora_A", torch.zeros(context.max_loras, context.max_rank, in_features, **kw),
                             persistent=False)
        self.register_buffer("lora_B", torch.zeros(context.max_loras, context.max_rank, out_features, **kw),
                             persistent=False)
        # Slots holding weights for this layer: a batch whose adapters all skip it costs nothing here (adapters
        # usually target a subset, e.g. only attention, of the patched layers).
        self.loaded_slots: set[int] = set()
        self.dora: DoraSlots | None = None  # made when a DoRA adapter first lands here (linear layers only)

    @property
    def ops(self) -> LoRAOps:
        return self._context[0].ops

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def extra_repr(self) -> str:
        return f"{self.name}, slots={self.lora_A.shape[0]}, max_rank={self.lora_A.shape[1]}"


def wrap_matching(model: nn.Module, context: LoRAContext, kind: Callable[[nn.Module], bool],
                  targets: str | Callable[[str, nn.Module], bool],
                  wrapper: Callable[[nn.Module, LoRAContext, str], SlotLayer]) -> list[str]:
    """Replace in place every module of `model` of the right `kind` whose name matches `targets` (regex, full
    match, or predicate) with `wrapper(module, context, name)`, registered in `context.layers`; returns the names."""
    match = targets if callable(targets) else (lambda name, _m, rx=re.compile(targets): rx.fullmatch(name))
    chosen = [(n, m) for n, m in model.named_modules() if kind(m) and match(n, m)]
    for name, module in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = wrapper(module, context, name)
        setattr(parent, attr, layer)
        context.layers[name] = layer
    return [n for n, _ in chosen]
