"""LoCon: per-row LoRA on `nn.Conv2d` layers, sharing a `LoRAContext` (slots, batch) with the linears.

For a row i with slot s and scale c: y_i += c * conv1x1(conv2d(x_i, A_s, stride, padding, dilation), B_s) (summed
over the row's stack of adapters), A_s [r, in, kh, kw] (the layer's own kernel), B_s [out, r]. The slot buffers
hold A flattened to [r, in * kh * kw] and B transposed to [r, out], the layout of a `LoRALinear`'s, so
`LoRAContext.load_slot`/`clear_slot` and the adapter cache move conv weights like any others; the math is the ops
backend's `add_conv` (`backends.lora.ops.torch_ops.conv_lora_apply`).

There is no fixed-shape (CUDA-graph) variant: only diffusion pipelines patch convolutions, and they do not
capture graphs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from backends.lora.layers.base import SlotLayer, wrap_matching
from backends.lora.layers.context import LoRAContext


class LoRAConv2d(SlotLayer):
    def __init__(self, base: nn.Conv2d, context: LoRAContext, name: str):
        kh, kw = base.kernel_size
        # Slot buffers hold the kernel flattened: A [r, in * kh * kw], as for a linear of the same weights.
        super().__init__(base, context, name, base.in_channels * kh * kw, base.out_channels)
        self.kernel = (base.in_channels, kh, kw)  # what an adapter's down weight [r, in, kh, kw] must match

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.add_conv(self.base(x), x, self, self.base)


def lora_convertible(module: nn.Module) -> bool:
    """Plain 2-D convolutions (PEFT's LoCon layers: groups 1, zero padding)."""
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def patch_convs(model: nn.Module, context: LoRAContext,
                targets: str | Callable[[str, nn.Module], bool]) -> list[str]:
    """Wrap every plain `nn.Conv2d` of `model` whose name matches `targets` (regex, full match, or predicate) with
    `LoRAConv2d`, registered in `context.layers` under its name; returns the names."""
    return wrap_matching(model, context, lora_convertible, targets, LoRAConv2d)
