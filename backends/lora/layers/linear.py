"""`LoRALinear` and `patch_model`: wrap a model's target `nn.Linear` layers in place, sharing one `LoRAContext`."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from backends.lora.adapters.targets import llm_targets
from backends.lora.layers.base import SlotLayer, wrap_matching
from backends.lora.layers.context import LoRAContext


class LoRALinear(SlotLayer):
    def __init__(self, base: nn.Linear, context: LoRAContext, name: str):
        super().__init__(base, context, name, base.in_features, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.add_linear(self.base(x), x, self)
        return y if self.dora is None else self.ops.rescale_dora(y, self)


def patch_model(
    model: nn.Module,
    max_loras: int,
    max_rank: int,
    targets: str | Callable[[str, nn.Module], bool] | None = None,
    dtype: torch.dtype | None = None,
    model_name: str | None = None,
) -> LoRAContext:
    """Replace every `nn.Linear` whose name matches `targets` (regex, full match, or predicate; default: every
    linear of the decoder blocks, see `backends.lora.adapters.targets`) with `LoRALinear`."""
    first = next(model.parameters())
    model_name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or None
    context = LoRAContext(max_loras, max_rank, dtype or first.dtype, first.device, model_name)
    if targets is None:
        targets = llm_targets(model)
    if not wrap_matching(model, context, lambda m: isinstance(m, nn.Linear), targets, LoRALinear):
        raise ValueError(f"no nn.Linear of {type(model).__name__} matches the LoRA targets {targets!r}")
    return context
