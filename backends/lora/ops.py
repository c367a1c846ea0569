"""Batched mixed-adapter LoRA: y[i] += scale_i * (x[i] A_s^T) B_s^T for every row i whose slot s is not -1.

Slot buffers are stacked and zero-padded: `A` [max_loras, max_rank, in] and `Bt` [max_loras, max_rank, out]
(B transposed, alpha/r folded in), so mixed ranks share one batch and any run of slots is a plain view.

`LoRABatch.build` looks at the batch once per forward; each patched module then runs one of:

- "dense" (decode, few rows): one shrink against the run of slots the batch touches, a row x rank mask holding
  each row's scale in its own adapter's columns, one addmm expand. Three ops per module, no gather, no scatter.
- "segments" (inputs of T tokens per sequence: prefill, diffusion): each sequence's A/B gathered once (tiny),
  one batched matmul over the sequence blocks and a baddbmm straight into y. Activations are never copied.
- "grouped" (many single-token rows): rows grouped by adapter, two batched matmuls over the k adapters.

`lora_apply_rows` is the fixed-shape variant for CUDA graphs: per-row slot/scale buffers of a fixed size.
Rows without an adapter or with scale 0 get exactly +0 (or nothing), so their outputs equal the base layer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

NO_LORA = -1
# Up to this many rows x slots, a dense shrink over the touched slots beats gathering (decode steps).
DENSE_MAX_ROW_SLOTS = 512


@dataclass(frozen=True)
class LoRABatch:
    """Sequence -> adapter mapping for one forward, shared by every patched module.

    A layer input of S rows (one token per sequence: decode) runs the row path chosen at build time ("dense" or
    "grouped"); an input of S * T rows (T tokens per sequence, any T: prefill, image and text tokens of a
    diffusion transformer) runs "segments".
    """

    num_seqs: int
    row_mode: str  # "empty" | "dense" | "grouped"
    seq_slots: torch.Tensor  # [S], clamped to >= 0 (rows without LoRA have scale 0)
    seq_scales: torch.Tensor  # [S, 1, 1]
    lo: int = 0  # the live rows use slots [lo, hi)
    live_slots: frozenset = frozenset()  # slots of rows with an adapter and a non-zero scale
    hi: int = 0
    # dense: mask [S, (hi - lo) * R], each row's scale in its own adapter's columns
    mask: torch.Tensor | None = None
    # grouped: active slots [k], gather index [k * max_n], scales [k, max_n, 1]
    active: torch.Tensor | None = None
    gather_idx: torch.Tensor | None = None
    group_scales: torch.Tensor | None = None
    max_n: int = 0

    @property
    def empty(self) -> bool:
        return self.row_mode == "empty"

    @classmethod
    def build(
        cls,
        slot_ids: Sequence[int] | torch.Tensor,
        scales: Sequence[float] | torch.Tensor,
        max_rank: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "LoRABatch":
        """One slot id (-1 = none) and one scale per sequence of the batch."""
        slots = torch.as_tensor(slot_ids, dtype=torch.long).reshape(-1)
        scale = torch.as_tensor(scales, dtype=torch.float64).reshape(-1)
        if slots.shape != scale.shape:
            raise ValueError(f"{slots.numel()} slot ids but {scale.numel()} scales")
        live = (slots != NO_LORA) & (scale != 0)
        scale = torch.where(live, scale, torch.zeros_like(scale))
        slots = torch.where(live, slots, torch.zeros_like(slots))
        common = dict(num_seqs=slots.numel(), seq_slots=slots.to(device),
                      seq_scales=scale.view(-1, 1, 1).to(device=device, dtype=dtype))
        if not bool(live.any()):
            return cls(row_mode="empty", **common)
        rows = torch.nonzero(live).reshape(-1)
        lo, hi = int(slots[rows].min()), int(slots[rows].max()) + 1
        common.update(lo=lo, hi=hi, live_slots=frozenset(slots[rows].tolist()))
        n = slots.numel()
        if n * (hi - lo) <= DENSE_MAX_ROW_SLOTS:
            mask = torch.zeros(n, hi - lo, max_rank, dtype=torch.float64)
            mask[rows, slots[rows] - lo] = scale[rows].unsqueeze(-1)
            return cls(row_mode="dense", mask=mask.view(n, -1).to(device=device, dtype=dtype), **common)
        active, counts = torch.unique(slots[rows], sorted=True, return_counts=True)
        k, max_n = active.numel(), int(counts.max())
        # Stable sort keeps each adapter's rows in order; position in the group from cumulative counts.
        order = rows[torch.argsort(slots[rows], stable=True)]
        group = torch.repeat_interleave(torch.arange(k), counts)
        pos = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[group]
        gather = torch.zeros(k, max_n, dtype=torch.long)
        grouped_scale = torch.zeros(k, max_n, 1, dtype=torch.float64)
        gather[group, pos] = order
        grouped_scale[group, pos, 0] = scale[order]
        return cls(row_mode="grouped", active=active.to(device), gather_idx=gather.reshape(-1).to(device),
                   group_scales=grouped_scale.to(device=device, dtype=dtype), max_n=max_n, **common)


def lora_apply(y: torch.Tensor, x: torch.Tensor, batch: LoRABatch, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """In place on y [N, out] for x [N, in] (N = S rows, or S * T); A [K, R, in], Bt [K, R, out]. Returns y."""
    if batch.row_mode == "empty":
        return y
    n, s = x.shape[0], batch.num_seqs
    if n != s:
        if n % s:
            raise ValueError(f"LoRA batch maps {s} sequences but the layer input has {n} rows")
        if batch.hi - batch.lo == 1:  # one adapter for the whole batch: two plain GEMMs, nothing gathered
            h = torch.mm(x, A[batch.lo].t())
            h.view(s, -1, h.shape[1]).mul_(batch.seq_scales)
            return y.addmm_(h, Bt[batch.lo])
        a = A.index_select(0, batch.seq_slots)  # [S, R, in]: weights are small, activations are not copied
        b = Bt.index_select(0, batch.seq_slots)  # [S, R, out]
        h = torch.bmm(x.view(s, -1, x.shape[1]), a.transpose(1, 2)).mul_(batch.seq_scales)
        y.view(s, -1, y.shape[1]).baddbmm_(h, b)
        return y
    if batch.row_mode == "dense":
        a = A[batch.lo : batch.hi].reshape(-1, A.shape[2])  # views: slots are contiguous in the stack
        b = Bt[batch.lo : batch.hi].reshape(-1, Bt.shape[2])
        return y.addmm_(torch.mm(x, a.t()).mul_(batch.mask), b)
    k, max_n = batch.active.numel(), batch.max_n
    a = A.index_select(0, batch.active)
    b = Bt.index_select(0, batch.active)
    xg = x.index_select(0, batch.gather_idx).view(k, max_n, x.shape[1])
    h = torch.bmm(xg, a.transpose(1, 2)).mul_(batch.group_scales)
    return y.index_add_(0, batch.gather_idx, torch.bmm(h, b).view(k * max_n, -1))


def lora_apply_rows(
    y: torch.Tensor, x: torch.Tensor, slot_per_row: torch.Tensor, scale_per_row: torch.Tensor,
    A: torch.Tensor, Bt: torch.Tensor,
) -> torch.Tensor:
    """Fixed-shape variant for CUDA graphs: slot_per_row [N] (>= 0; rows without LoRA use any slot, scale 0)."""
    a = A.index_select(0, slot_per_row)  # [N, R, in]
    b = Bt.index_select(0, slot_per_row)  # [N, R, out]
    h = torch.bmm(a, x.unsqueeze(-1)).mul_(scale_per_row.view(-1, 1, 1).to(x.dtype))  # [N, R, 1]
    return y.add_(torch.bmm(h.transpose(1, 2), b).squeeze(1))
