"""LoRA math in torch ops, for any device: y[i] += sum_j scale_ij * (x[i] A_s_ij^T) B_s_ij^T over the stack of
(slot s_ij, scale_ij) pairs of row i.

`plan` looks at a `LoRABatch` once per forward (memoised on it); each LoRA layer then runs one of:

- "dense" (decode, few rows): one shrink against the run of slots the batch touches, a row x rank mask holding
  each row's scales in its own adapters' columns, one addmm expand. Three ops per module, no gather, no scatter;
  a stack costs nothing more (its adapters' columns are all live in the row's mask).
- "segments" (inputs of T tokens per sequence: prefill, diffusion): each sequence's A/B gathered once (tiny; a
  stack of M concatenated into rank M * R), one batched matmul over the sequence blocks and a baddbmm straight
  into y. Activations are never copied.
- "runs" (an engine step: rows are the tokens of varlen sequences, `LoRABatch.runs`): the leading one-token rows
  run one of the row paths, each longer run (a prefill chunk) two plain GEMMs per adapter of its stack.
- "grouped" (many single-token rows): (row, adapter) pairs grouped by adapter, two batched matmuls over the k
  adapters, index_add_ back (a stacked row is summed from its groups).

`lora_apply_rows` is the fixed-shape variant a fixed batch (CUDA graphs) runs: per-row slot/scale buffers of a
fixed size. `conv_lora_apply` is LoCon's: a down convolution against the touched slots, a per-row scale mask, a
1x1 convolution up. Rows without an adapter or with scale 0 get exactly +0 (or nothing), so their outputs equal
the base layer's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from backends.lora.ops.base import LoRAOps, SlotWeights
from backends.lora.ops.batch import LoRABatch

# Up to this many rows x slots, a dense shrink over the touched slots beats gathering (decode steps).
DENSE_MAX_ROW_SLOTS = 512


@dataclass(frozen=True)
class TorchPlan:
    """How the torch ops run one `LoRABatch`: its tensors on the model's device and dtype, and the row path.

    A layer input of S rows (one token per sequence: decode) runs the row path chosen here ("dense" or
    "grouped"); an input of S * T rows (T tokens per sequence, any T: prefill, image and text tokens of a diffusion
    transformer) runs "segments".
    """

    num_seqs: int
    row_mode: str  # "empty" | "dense" | "grouped"
    seq_slots: torch.Tensor  # [S, M], >= 0 (dead pairs have scale 0)
    seq_scales: torch.Tensor  # [S, M]
    lo: int = 0  # the live pairs use slots [lo, hi)
    hi: int = 0
    # dense: mask [S, (hi - lo) * R], each row's scales in its own adapters' columns
    mask: torch.Tensor | None = None
    # grouped: active slots [k], gather index [k * max_n] of rows, scales [k, max_n, 1]
    active: torch.Tensor | None = None
    gather_idx: torch.Tensor | None = None
    group_scales: torch.Tensor | None = None
    max_n: int = 0
    # runs: the plan of the leading one-token rows, then (start, end, live (slot, scale) pairs) per longer run
    head: "TorchPlan | None" = None
    head_rows: int = 0
    segments: tuple = ()

    @property
    def empty(self) -> bool:
        return self.row_mode == "empty"

    @property
    def stack(self) -> int:
        return self.seq_slots.shape[1]


def plan(batch: LoRABatch, max_rank: int = 16, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32) -> TorchPlan:
    """The torch ops' plan for an eager batch (host tensors)."""
    slots, scale = batch.slots, batch.scales
    common = dict(num_seqs=slots.shape[0], seq_slots=slots.to(device), seq_scales=scale.to(device=device, dtype=dtype))
    if batch.empty:
        return TorchPlan(row_mode="empty", **common)
    if batch.runs and max(batch.runs) > 1:
        return _runs_plan(batch, max_rank, device, dtype, common)
    pair_rows, pair_cols = torch.nonzero(scale != 0, as_tuple=True)
    pair_slots, pair_scales = slots[pair_rows, pair_cols], scale[pair_rows, pair_cols]
    lo, hi = min(batch.live_slots), max(batch.live_slots) + 1
    common.update(lo=lo, hi=hi)
    n = slots.shape[0]
    if n * (hi - lo) <= DENSE_MAX_ROW_SLOTS:
        mask = torch.zeros(n, hi - lo, max_rank, dtype=torch.float64)
        mask.index_put_((pair_rows, pair_slots - lo), pair_scales.unsqueeze(-1), accumulate=True)
        return TorchPlan(row_mode="dense", mask=mask.view(n, -1).to(device=device, dtype=dtype), **common)
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
    return TorchPlan(row_mode="grouped", active=active.to(device), gather_idx=gather.reshape(-1).to(device),
                     group_scales=grouped_scale.to(device=device, dtype=dtype), max_n=max_n, **common)


def _runs_plan(batch: LoRABatch, max_rank: int, device, dtype, common: dict) -> TorchPlan:
    head = next((i for i, n in enumerate(batch.runs) if n != 1), len(batch.runs))
    head_plan = None
    if head:
        head_plan = plan(LoRABatch.build(batch.slots[:head], batch.scales[:head]), max_rank, device, dtype)
    segments, start = [], head
    for length in batch.runs[head:]:
        pairs = tuple((int(s), float(c)) for s, c in zip(batch.slots[start].tolist(), batch.scales[start].tolist())
                      if c != 0)
        if pairs:
            segments.append((start, start + length, pairs))
        start += length
    return TorchPlan(row_mode="runs", head=head_plan, head_rows=head, segments=tuple(segments), **common)


class TorchLoRAOps(LoRAOps):
    """CPU, and CUDA without Triton: the plans above."""

    def _plan(self) -> TorchPlan:
        key = ("torch", self.max_rank, self.device, self.dtype)
        found = self.batch.memo.get(key)
        if found is None:
            found = self.batch.memo[key] = plan(self.batch, self.max_rank, self.device, self.dtype)
        return found

    def add_linear(self, y: torch.Tensor, x: torch.Tensor, layer: SlotWeights) -> torch.Tensor:
        if not self._live(layer):
            return y
        y2, x2 = y.view(-1, layer.out_features), x.reshape(-1, layer.in_features)
        if self.batch.fixed:  # every layer runs, whatever the slots hold
            lora_apply_rows(y2, x2, self.batch.slots[:, 0], self.batch.scales[:, 0], layer.lora_A, layer.lora_B)
        else:
            lora_apply(y2, x2, self._plan(), layer.lora_A, layer.lora_B)
        return y

    def add_conv(self, y: torch.Tensor, x: torch.Tensor, layer: SlotWeights, base: nn.Conv2d) -> torch.Tensor:
        batch = self.batch
        if batch is None or batch.empty:
            return y
        if batch.fixed:  # only diffusion pipelines patch convolutions, and they capture no graphs
            raise RuntimeError("LoRA convolutions have no fixed-shape (CUDA-graph) path")
        # Only the slots with weights here: a LoCon row next to linear-only adapters convolves with its own slot.
        live = layer.loaded_slots & batch.live_slots
        if live:
            conv_lora_apply(y, x, self._plan(), layer.lora_A, layer.lora_B, base, min(live), max(live) + 1)
        return y


def lora_apply(y: torch.Tensor, x: torch.Tensor, batch: TorchPlan, A: torch.Tensor, Bt: torch.Tensor) -> torch.Tensor:
    """In place on y [N, out] for x [N, in] (N = S rows, or S * T); A [K, R, in], Bt [K, R, out]. Returns y."""
    if batch.row_mode == "empty":
        return y
    if batch.row_mode == "runs":
        if batch.head is not None:
            lora_apply(y[:batch.head_rows], x[:batch.head_rows], batch.head, A, Bt)
        for start, end, pairs in batch.segments:
            xs, ys = x[start:end], y[start:end]
            for slot, scale in pairs:
                ys.addmm_(torch.mm(xs, A[slot].t()), Bt[slot], alpha=scale)
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


def conv_lora_apply(y: torch.Tensor, x: torch.Tensor, batch: TorchPlan, A: torch.Tensor, Bt: torch.Tensor,
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
