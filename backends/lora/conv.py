"""LoCon: per-row LoRA on `nn.Conv2d` layers, sharing a `LoRAContext` (slots, batch mapping) with the linears.

For a row i with slot s and scale c: y_i += c * conv1x1(conv2d(x_i, A_s, stride, padding, dilation), B_s) (summed
over the row's stack of adapters), A_s
[r, in, kh, kw] (the layer's own kernel), B_s [out, r]. The slot buffers hold A flattened to [r, in * kh * kw] and
B transposed to [r, out], the layout of a `LoRALinear`'s, so `LoRAContext.load_slot`/`clear_slot` and the adapter
cache move conv weights like any others.

One forward runs one down conv over the rows that use them against the run of slots [lo, hi) that the batch
touches and that hold weights for this layer (out channels (hi - lo) * R), zeroes each row's other adapters'
channels with a per-row scale mask, and one 1x1 conv up: the "dense" idea of `backends.lora.ops`. Rows without
an adapter for the layer get nothing (or exactly +0).

There is no fixed-shape (CUDA-graph) variant: only diffusion pipelines patch convolutions, and they do not
capture graphs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from backends.lora.layer import SlotLayer, wrap_matching
from backends.lora.ops import LoRABatch

if TYPE_CHECKING:
    from backends.lora.patch import LoRAContext


class LoRAConv2d(SlotLayer):
    def __init__(self, base: nn.Conv2d, context: "LoRAContext", name: str):
        kh, kw = base.kernel_size
        # Slot buffers hold the kernel flattened: A [r, in * kh * kw], as for a linear of the same weights.
        super().__init__(base, context, name, base.in_channels * kh * kw, base.out_channels)
        self.kernel = (base.in_channels, kh, kw)  # what an adapter's down weight [r, in, kh, kw] must match

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self._context[0].batch
        if batch is None or batch.empty:
            return y
        # Only the slots with weights here: a LoCon row next to linear-only adapters convolves with its own slot.
        live = self.loaded_slots & batch.live_slots
        if live:
            conv_lora_apply(y, x, batch, self.lora_A, self.lora_B, self.base, min(live), max(live) + 1)
        return y


def conv_lora_apply(y: torch.Tensor, x: torch.Tensor, batch: LoRABatch, A: torch.Tensor, Bt: torch.Tensor,
                    base: nn.Conv2d, lo: int, hi: int) -> torch.Tensor:
    """In place on y [N, out, H', W'] for x [N, in, H, W] (N = the batch's rows); A [K, R, in*kh*kw],
    Bt [K, R, out]; rows whose slot is outside [lo, hi) get nothing. Returns y."""
    n = x.shape[0]
    if n != batch.num_seqs:
        raise ValueError(f"LoRA batch maps {batch.num_seqs} rows but the conv input has {n}")
    rank = A.shape[1]
    # Row i keeps only its own adapters' R channels, each times its scale (dead pairs: slot 0 with scale 0).
    owner = batch.seq_slots.unsqueeze(-1) == torch.arange(lo, hi, device=x.device).view(1, 1, -1)  # [n, M, K]
    scale = (owner.to(x.dtype) * batch.seq_scales.unsqueeze(-1).to(x.dtype)).sum(1)
    # Convolve only the rows that use these slots (a LoCon row among base or linear-only rows): the activation
    # copy is small next to the k x k convolution it saves.
    rows = scale.any(1).nonzero().view(-1)
    subset = rows.numel() < n
    if subset:
        x, scale = x.index_select(0, rows), scale.index_select(0, rows)
    down = A[lo:hi].view((hi - lo) * rank, base.in_channels, *base.kernel_size)  # a view: slots are contiguous
    h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation)
    h.view(h.shape[0], hi - lo, rank, *h.shape[2:]).mul_(scale.view(-1, hi - lo, 1, 1, 1))
    up = Bt[lo:hi].reshape((hi - lo) * rank, base.out_channels).t()
    delta = F.conv2d(h, up.unsqueeze(-1).unsqueeze(-1))
    return y.index_add_(0, rows, delta) if subset else y.add_(delta)


def lora_convertible(module: nn.Module) -> bool:
    """Plain 2-D convolutions (PEFT's LoCon layers: groups 1, zero padding)."""
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def patch_convs(model: nn.Module, context: "LoRAContext",
                targets: str | Callable[[str, nn.Module], bool]) -> list[str]:
    """Wrap every plain `nn.Conv2d` of `model` whose name matches `targets` (regex, full match, or predicate) with
    `LoRAConv2d`, registered in `context.layers` under its name; returns the names."""
    return wrap_matching(model, context, lora_convertible, targets, LoRAConv2d)
