"""Batched mixed-adapter LoRA: y[i] += scale_i * (x[i] A_s^T) B_s^T for every row i whose slot s is not -1.

Slot buffers are stacked and zero-padded: A [max_loras, max_rank, in], B [max_loras, out, max_rank], with alpha/r
already in B, so mixed ranks share one batch. Two paths over the same buffers:

- `lora_apply` (CPU, and GPU prefill): rows are grouped by adapter once per forward (`LoRABatch`), then each module
  costs one gather, two batched matmuls over the k active adapters and one index_add, whatever k is. No Python loop
  per row or per adapter.
- `lora_apply_rows` (GPU decode under CUDA graphs): fixed shapes only, driven by per-row slot/scale buffers of a
  fixed size that are overwritten in place before each replay.

Rows without an adapter, or with scale 0, are left out of the grouped path entirely, so their outputs are
bit-identical to the base layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

NO_LORA = -1


@dataclass(frozen=True)
class LoRABatch:
    """Row -> adapter mapping for one forward, shared by every patched module."""

    num_rows: int
    active: torch.Tensor  # [k] slot ids in use
    gather_idx: torch.Tensor  # [k * max_n] row of each grouped position (padding -> row 0 with scale 0)
    scales: torch.Tensor  # [k, max_n, 1] scale per grouped position (0 for padding)
    max_n: int
    identity: bool  # one adapter, every row, in order: no gather/scatter needed
    active_is_prefix: bool  # active == 0..k-1: slice the slot buffers instead of gathering them

    @property
    def empty(self) -> bool:
        return self.active.numel() == 0

    @classmethod
    def build(
        cls,
        slot_ids: Sequence[int] | torch.Tensor,
        scales: Sequence[float] | torch.Tensor,
        tokens_per_row: int = 1,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "LoRABatch":
        """slot_ids/scales per sequence; each sequence owns `tokens_per_row` consecutive rows of the flattened input."""
        slots = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1)
        scale = torch.as_tensor(scales, dtype=torch.float64).reshape(-1)
        if slots.shape != scale.shape:
            raise ValueError(f"{slots.numel()} slot ids but {scale.numel()} scales")
        if tokens_per_row > 1:
            slots = slots.repeat_interleave(tokens_per_row)
            scale = scale.repeat_interleave(tokens_per_row)
        n = slots.numel()
        live = (slots != NO_LORA) & (scale != 0)
        rows = torch.nonzero(live).reshape(-1)
        active, counts = torch.unique(slots[rows], sorted=True, return_counts=True)
        k = active.numel()
        if k == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return cls(n, empty, empty, torch.empty(0, 0, 1, dtype=dtype, device=device), 0, False, True)
        max_n = int(counts.max())
        # Stable sort by slot keeps each adapter's rows in order; position within the group via cumulative counts.
        order = rows[torch.argsort(slots[rows], stable=True)]
        group = torch.repeat_interleave(torch.arange(k), counts)
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(order.numel()) - starts[group]
        gather = torch.zeros(k, max_n, dtype=torch.long)
        grouped_scale = torch.zeros(k, max_n, 1, dtype=torch.float64)
        gather[group, pos] = order
        grouped_scale[group, pos, 0] = scale[order]
        identity = k == 1 and order.numel() == n
        return cls(
            num_rows=n,
            active=active.to(device),
            gather_idx=gather.reshape(-1).to(device),
            scales=grouped_scale.to(device=device, dtype=dtype),
            max_n=max_n,
            identity=identity,
            active_is_prefix=bool(torch.equal(active, torch.arange(k))),
        )


def _active(stack: torch.Tensor, batch: LoRABatch) -> torch.Tensor:
    k = batch.active.numel()
    return stack[:k] if batch.active_is_prefix else stack.index_select(0, batch.active)


def lora_apply(y: torch.Tensor, x: torch.Tensor, batch: LoRABatch, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """In place on y [N, out] for x [N, in]; A [K, R, in], B [K, out, R]. Returns y."""
    if batch.empty:
        return y
    if x.shape[0] != batch.num_rows:
        raise ValueError(f"LoRA batch maps {batch.num_rows} rows but the layer input has {x.shape[0]}")
    k, max_n = batch.active.numel(), batch.max_n
    a = _active(A, batch)
    b = _active(B, batch)
    if batch.identity:
        h = torch.mm(x, a[0].t()).mul_(batch.scales[0])
        return y.addmm_(h, b[0].t())
    xg = x.index_select(0, batch.gather_idx).view(k, max_n, x.shape[1])
    h = torch.bmm(xg, a.transpose(1, 2)).mul_(batch.scales)
    delta = torch.bmm(h, b.transpose(1, 2))
    return y.index_add_(0, batch.gather_idx, delta.view(k * max_n, -1))


def lora_apply_rows(
    y: torch.Tensor, x: torch.Tensor, slot_per_row: torch.Tensor, scale_per_row: torch.Tensor,
    A: torch.Tensor, B: torch.Tensor,
) -> torch.Tensor:
    """Fixed-shape variant for CUDA graphs: slot_per_row [N] (>= 0; rows without LoRA use any slot with scale 0)."""
    a = A.index_select(0, slot_per_row)  # [N, R, in]
    b = B.index_select(0, slot_per_row)  # [N, out, R]
    h = torch.bmm(a, x.unsqueeze(-1)) * scale_per_row.view(-1, 1, 1).to(x.dtype)  # [N, R, 1]
    return y.add_(torch.bmm(b, h).squeeze(-1))
