"""Batched mixed-adapter LoRA: y[i] += sum_j scale_ij * (x[i] A_s_ij^T) B_s_ij^T over the stack of (slot s_ij,
scale_ij) pairs of row i (one pair for one adapter; slot -1 = none).

Slot buffers are stacked and zero-padded: `A` [max_loras, max_rank, in] and `Bt` [max_loras, max_rank, out]
(B transposed, alpha/r folded in), so mixed ranks share one batch and any run of slots is a plain view.

`LoRABatch.build` looks at the batch once per forward; each patched module then runs one of:

- "dense" (decode, few rows): one shrink against the run of slots the batch touches, a row x rank mask holding
  each row's scales in its own adapters' columns, one addmm expand. Three ops per module, no gather, no scatter;
  a stack costs nothing more (its adapters' columns are all live in the row's mask).
- "segments" (inputs of T tokens per sequence: prefill, diffusion): each sequence's A/B gathered once (tiny; a
  stack of M concatenated into rank M * R), one batched matmul over the sequence blocks and a baddbmm straight
  into y. Activations are never copied.
- "grouped" (many single-token rows): (row, adapter) pairs grouped by adapter, two batched matmuls over the k
  adapters, index_add_ back (a stacked row is summed from its groups).

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
    """Sequence -> adapters mapping for one forward, shared by every patched module.

    Each sequence has a stack of up to M (slot, scale) pairs (M = 1 for one adapter per sequence) and gets the sum
    of their deltas. A layer input of S rows (one token per sequence: decode) runs the row path chosen at build
    time ("dense" or "grouped"); an input of S * T rows (T tokens per sequence, any T: prefill, image and text
    tokens of a diffusion transformer) runs "segments".
    """

    num_seqs: int
    row_mode: str  # "empty" | "dense" | "grouped"
    seq_slots: torch.Tensor  # [S, M], clamped to >= 0 (pairs without LoRA have scale 0)
    seq_scales: torch.Tensor  # [S, M]
    lo: int = 0  # the live pairs use slots [lo, hi)
    live_slots: frozenset = frozenset()  # slots of pairs with an adapter and a non-zero scale
    hi: int = 0
    # dense: mask [S, (hi - lo) * R], each row's scales in its own adapters' columns
    mask: torch.Tensor | None = None
    # grouped: active slots [k], gather index [k * max_n] of rows, scales [k, max_n, 1]
    active: torch.Tensor | None = None
    gather_idx: torch.Tensor | None = None
    group_scales: torch.Tensor | None = None
    max_n: int = 0

    @property
    def empty(self) -> bool:
        return self.row_mode == "empty"

    @property
    def stack(self) -> int:
        return self.seq_slots.shape[1]

    @classmethod
    def build(
        cls,
        slot_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        scales: Sequence[float] | Sequence[Sequence[float]] | torch.Tensor,
        max_rank: int = 16,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "LoRABatch":
        """One slot id (-1 = none) and scale per sequence ([S]), or a stack of them per sequence ([S, M], unused
        entries -1); a stack never holds one slot twice."""
        slots = torch.as_tensor(slot_ids, dtype=torch.long)
        scale = torch.as_tensor(scales, dtype=torch.float64)
        if slots.shape != scale.shape:
            raise ValueError(f"slot ids of shape {tuple(slots.shape)} but scales of shape {tuple(scale.shape)}")
        if slots.dim() < 2:
            slots, scale = slots.reshape(-1, 1), scale.reshape(-1, 1)
        live = (slots != NO_LORA) & (scale != 0)
        scale = torch.where(live, scale, torch.zeros_like(scale))
        slots = torch.where(live, slots, torch.zeros_like(slots))
        common = dict(num_seqs=slots.shape[0], seq_slots=slots.to(device), seq_scales=scale.to(device=device, dtype=dtype))
        if not bool(live.any()):
            return cls(row_mode="empty", **common)
        pair_rows, pair_cols = torch.nonzero(live, as_tuple=True)
        pair_slots, pair_scales = slots[pair_rows, pair_cols], scale[pair_rows, pair_cols]
        lo, hi = int(pair_slots.min()), int(pair_slots.max()) + 1
        common.update(lo=lo, hi=hi, live_slots=frozenset(pair_slots.tolist()))
        n = slots.shape[0]
        if n * (hi - lo) <= DENSE_MAX_ROW_SLOTS:
            mask = torch.zeros(n, hi - lo, max_rank, dtype=torch.float64)
            mask.index_put_((pair_rows, pair_slots - lo), pair_scales.unsqueeze(-1), accumulate=True)
            return cls(row_mode="dense", mask=mask.view(n, -1).to(device=device, dtype=dtype), **common)
        # Grouped by adapter over (row, adapter) pairs: a row of a stack sits in several groups, and index_add_
        # sums its deltas.
        active, counts = torch.unique(pair_slots, sorted=True, return_counts=True)
        k, max_n = active.numel(), int(counts.max())
        order = torch.argsort(pair_slots, stable=True)  # stable: each adapter's rows stay in order
        group = torch.repeat_interleave(torch.arange(k), counts)
        pos = torch.arange(order.numel()) - (torch.cumsum(counts, 0) - counts)[group]
        gather = torch.zeros(k, max_n, dtype=torch.long)
        grouped_scale = torch.zeros(k, max_n, 1, dtype=torch.float64)
        gather[group, pos] = pair_rows[order]
        grouped_scale[group, pos, 0] = pair_scales[order]
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
            h.view(s, -1, h.shape[1]).mul_(batch.seq_scales.sum(1).view(s, 1, 1))  # at most one live pair per row
            return y.addmm_(h, Bt[batch.lo])
        # Each sequence's stack as one adapter of rank M * R (weights are small; activations are not copied).
        m, rank = batch.stack, A.shape[1]
        a = A.index_select(0, batch.seq_slots.view(-1)).view(s, m * rank, -1)  # [S, M * R, in]
        b = Bt.index_select(0, batch.seq_slots.view(-1)).view(s, m * rank, -1)  # [S, M * R, out]
        h = torch.bmm(x.view(s, -1, x.shape[1]), a.transpose(1, 2))
        h.view(s, -1, m, rank).mul_(batch.seq_scales.view(s, 1, m, 1))
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
