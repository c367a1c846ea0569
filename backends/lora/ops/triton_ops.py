"""Triton kernels for batched mixed-adapter LoRA (the Punica/SGMV idea): y[i] += c_i * (x[i] A_s^T) Bt_s.

Rows are grouped by slot once per forward and stack position (`SegmentMeta`, fixed-shape torch ops only, so it
can be built inside a CUDA-graph capture). Then two launches per layer over the same slot buffers as the torch ops
(`A` [max_loras, max_rank, in], `Bt` [max_loras, max_rank, out], contiguous, ranks zero-padded):

- `lora_shrink`: h [N, max_rank] fp32 = c_i * x[i] A_s^T, the scale fused in.
- `lora_expand`: y[i] += h[i] Bt_s in place, fp32 accumulation, one rounding to y's dtype.

Each program owns one tile of one slot's rows, so an adapter's weights are read once per row tile, not once per
row. Grids depend only on N, the layer's shapes and max_loras (worst case: every row in one slot); programs past
their segment's end exit at once. Rows without an adapter (slot NO_ADAPTER or scale 0) are in no segment and
never written, so their outputs stay bit-identical to the base layer's.

x, y and h must be contiguous 2D tensors. On CPU the kernels run only under Triton's interpreter
(TRITON_INTERPRET=1 set before this module is imported).

`TritonLoRAOps` is the ops backend over them (LoCon convolutions stay on the torch path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.lora.ops.base import SlotWeights
from backends.lora.ops.batch import LoRABatch
from backends.lora.ops.torch_ops import TorchLoRAOps

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; the kernels say why they cannot run when called
    triton = None

# Rank tiles are padded to a power of two >= 16 (tl.dot's smallest tile); above 256 the fp32 accumulator of a
# shrink tile no longer fits in registers.
MAX_KERNEL_RANK = 256
_MIN_DOT = 16


def check_rank(max_rank: int) -> None:
    if not 1 <= max_rank <= MAX_KERNEL_RANK:
        raise ValueError(f"max_lora_rank {max_rank} is not supported by the Triton LoRA kernels "
                         f"(1..{MAX_KERNEL_RANK}); use a smaller max_lora_rank or the torch LoRA path")


@dataclass
class SegmentMeta:
    """Rows of one forward grouped by slot; every tensor has a fixed size, on the rows' device.

    `order` lists row indices sorted by slot (stable); slot k's rows are order[seg_start[k] : seg_start[k] +
    seg_len[k]]. Rows with slot NO_ADAPTER (-1), a slot >= max_loras or scale 0 sort into a sentinel bucket after
    the last slot that no program reads.
    """

    order: torch.Tensor  # [N] int64
    seg_start: torch.Tensor  # [max_loras] int64
    seg_len: torch.Tensor  # [max_loras] int64
    scales: torch.Tensor  # [N] float32

    @property
    def num_rows(self) -> int:
        return self.order.numel()

    @property
    def max_loras(self) -> int:
        return self.seg_len.numel()

    @classmethod
    def build(cls, slots: torch.Tensor, scales: torch.Tensor, max_loras: int) -> "SegmentMeta":
        """slots [N] (NO_ADAPTER = no LoRA) and scales [N] on the same device. No host sync, no data-dependent shape."""
        slots = slots.reshape(-1).to(torch.int64)
        # A copy: the metadata is a snapshot, later writes to the caller's scales do not leak into it.
        scales = scales.reshape(-1).to(device=slots.device, dtype=torch.float32, copy=True)
        if slots.shape != scales.shape:
            raise ValueError(f"{slots.numel()} slots but {scales.numel()} scales")
        live = (slots >= 0) & (slots < max_loras) & (scales != 0)
        key = slots.masked_fill(~live, max_loras)
        order = torch.sort(key, stable=True).indices
        counts = torch.zeros(max_loras + 1, dtype=torch.int64, device=slots.device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        start = torch.cumsum(counts, 0) - counts
        return cls(order, start[:max_loras], counts[:max_loras], scales)

    def build_into(self, slots: torch.Tensor, scales: torch.Tensor) -> "SegmentMeta":
        """Rebuild for new slots/scales in place (same buffers), e.g. before replaying a graph that reads them."""
        fresh = SegmentMeta.build(slots, scales, self.max_loras)
        if fresh.num_rows != self.num_rows:
            raise ValueError(f"metadata holds {self.num_rows} rows, got {fresh.num_rows}")
        self.order.copy_(fresh.order)
        self.seg_start.copy_(fresh.seg_start)
        self.seg_len.copy_(fresh.seg_len)
        self.scales.copy_(fresh.scales)
        return self


if triton is not None:
    # Kernels use tl builtins only, no @jit helpers of triton.language (tl.cdiv, tl.zeros, ...): whether those
    # are interpreted was fixed when triton was first imported, which breaks a copy of this module decorated later
    # under TRITON_INTERPRET=1 (the tests' CPU runs). Our own helpers are decorated with the module, so they are.

    @triton.jit
    def _tile_rows(order_ptr, seg_start_ptr, slot, seg_len, pid_m, BLOCK_M: tl.constexpr):
        """Both kernels' prologue: the row indices (into x, h and y) of row tile `pid_m` of `slot`'s segment, and
        which of the tile's BLOCK_M positions lie inside the segment."""
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        in_seg = offs_m < seg_len
        rows = tl.load(order_ptr + tl.load(seg_start_ptr + slot) + offs_m, mask=in_seg, other=0).to(tl.int64)
        return rows, in_seg

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, h_ptr, order_ptr, seg_start_ptr, seg_len_ptr, scale_ptr,
                       K, R, stride_xm, stride_al, stride_ar, stride_hm,
                       BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        slot = tl.program_id(1)
        seg_len = tl.load(seg_len_ptr + slot)
        if pid_m * BLOCK_M >= seg_len:
            return
        rows, in_seg = _tile_rows(order_ptr, seg_start_ptr, slot, seg_len, pid_m, BLOCK_M)
        offs_r = tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        rank_ok = offs_r < R
        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
        # A[slot] read as its transpose [BLOCK_K, BLOCK_R]: rank padding beyond R loads as zeros.
        a_ptrs = a_ptr + slot.to(tl.int64) * stride_al + offs_r[None, :] * stride_ar + offs_k[:, None]
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, dtype=tl.float32)
        for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
            k_ok = offs_k < K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=in_seg[:, None] & k_ok[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_ok[:, None] & rank_ok[None, :], other=0.0)
            xt = xt.to(at.dtype)
            if UPCAST:
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            # "ieee": fp32 weights stay fp32 (no TF32); 16-bit operands ignore it.
            acc += tl.dot(xt, at, input_precision="ieee")
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
        scale = tl.load(scale_ptr + rows, mask=in_seg, other=0.0)
        acc = acc * scale[:, None]
        tl.store(h_ptr + rows[:, None] * stride_hm + offs_r[None, :], acc, mask=in_seg[:, None] & rank_ok[None, :])

    @triton.jit
    def _expand_kernel(h_ptr, b_ptr, y_ptr, order_ptr, seg_start_ptr, seg_len_ptr,
                       N_OUT, R, stride_hm, stride_bl, stride_br, stride_ym,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
        # Row tiles outermost: the programs of a short segment are the first ones, the exiting ones the last.
        tiles_n = (N_OUT + BLOCK_N - 1) // BLOCK_N
        pid_m = tl.program_id(0) // tiles_n
        pid_n = tl.program_id(0) % tiles_n
        slot = tl.program_id(1)
        seg_len = tl.load(seg_len_ptr + slot)
        if pid_m * BLOCK_M >= seg_len:
            return
        rows, in_seg = _tile_rows(order_ptr, seg_start_ptr, slot, seg_len, pid_m, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_OUT
        offs_r = tl.arange(0, BLOCK_R)
        h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_r[None, :]
        b_ptrs = b_ptr + slot.to(tl.int64) * stride_bl + offs_r[:, None] * stride_br + offs_n[None, :]
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for r in range(0, (R + BLOCK_R - 1) // BLOCK_R):
            r_ok = offs_r < R - r * BLOCK_R
            ht = tl.load(h_ptrs, mask=in_seg[:, None] & r_ok[None, :], other=0.0)
            bt = tl.load(b_ptrs, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            # h meets 16-bit weights in their dtype (tensor cores), as the torch path's bf16 h would.
            ht = ht.to(bt.dtype)
            if UPCAST:
                ht = ht.to(tl.float32)
                bt = bt.to(tl.float32)
            acc += tl.dot(ht, bt, input_precision="ieee")
            h_ptrs += BLOCK_R
            b_ptrs += BLOCK_R * stride_br
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
        mask = in_seg[:, None] & n_ok[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _rank_tile(max_rank: int) -> int:
    check_rank(max_rank)
    return max(_MIN_DOT, _next_pow2(max_rank))


def _interpreted() -> bool:
    return triton is not None and type(_shrink_kernel).__name__ == "InterpretedFunction"


def _upcast(weights: torch.Tensor) -> bool:
    # Triton's interpreter multiplies bf16 tiles as their raw uint16 bits (3.9): there, bf16 operands (already
    # rounded to bf16) go to the dot as fp32, which is exact for the products. Compiled kernels never take this.
    return weights.dtype == torch.bfloat16 and _interpreted()


# Tile sizes: 16-row tiles for decode-sized inputs (a few rows per adapter), bigger ones for prefill. Chosen so
# that no configuration up to MAX_KERNEL_RANK spills registers on sm_90 (ptxas resource usage, fp32/bf16/fp16);
# not tuned for speed on a device.
def _shrink_config(n: int, block_r: int) -> dict:
    if n < 256:
        block_m = 16
    else:
        block_m = 64 if block_r <= 64 else 32 if block_r <= 128 else 16
    return dict(BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=32 if block_r <= 64 else 16,
                num_warps=4 if block_m == 16 and block_r <= 128 else 8, num_stages=2)


def _expand_config(n: int, block_r: int) -> dict:
    # The rank is looped over in chunks of at most 32, so the tile stays BLOCK_M x BLOCK_N whatever the rank.
    block_m = 16 if n < 256 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_R=min(block_r, 32), num_warps=4 if block_m == 16 else 8,
                num_stages=2)


def _check_launch(x: torch.Tensor, weights: torch.Tensor, meta: SegmentMeta, what: str) -> None:
    if triton is None:
        raise RuntimeError("the Triton LoRA kernels need the `triton` package, which is not installed")
    if x.device.type != "cuda" and not _interpreted():
        raise RuntimeError(f"the Triton LoRA kernels run on CUDA tensors (got {x.device}); on CPU only under "
                           "Triton's interpreter (TRITON_INTERPRET=1 before importing backends.lora.ops.triton_ops)")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"{what} must be a contiguous 2D tensor, got shape {tuple(x.shape)} strides {x.stride()}")
    if weights.dim() != 3 or not weights.is_contiguous():
        raise ValueError(f"LoRA slot buffers must be contiguous [max_loras, max_rank, features], "
                         f"got shape {tuple(weights.shape)}")
    if meta.num_rows != x.shape[0] or meta.max_loras != weights.shape[0]:
        raise ValueError(f"segment metadata for {meta.num_rows} rows x {meta.max_loras} slots, but {what} has "
                         f"{x.shape[0]} rows and the slot buffers {weights.shape[0]} slots")


def lora_shrink(x: torch.Tensor, A: torch.Tensor, meta: SegmentMeta) -> torch.Tensor:
    """h [N, max_rank] fp32 = scale_i * x[i] @ A[slot_i].T for rows in a segment; zeros elsewhere."""
    _check_launch(x, A, meta, "x")
    n, k = x.shape
    max_loras, max_rank, in_features = A.shape
    if in_features != k:
        raise ValueError(f"x has {k} features but the A slots {in_features}")
    h = torch.zeros(n, max_rank, dtype=torch.float32, device=x.device)
    if n == 0:
        return h
    cfg = _shrink_config(n, _rank_tile(max_rank))
    _shrink_kernel[(triton.cdiv(n, cfg["BLOCK_M"]), max_loras)](
        x, A, h, meta.order, meta.seg_start, meta.seg_len, meta.scales,
        k, max_rank, x.stride(0), A.stride(0), A.stride(1), h.stride(0), UPCAST=_upcast(A), **cfg)
    return h


def lora_expand(y: torch.Tensor, h: torch.Tensor, Bt: torch.Tensor, meta: SegmentMeta) -> torch.Tensor:
    """y[i] += h[i] @ Bt[slot_i] in place for rows in a segment (fp32 accumulation); other rows untouched."""
    _check_launch(y, Bt, meta, "y")
    n, out_features = y.shape
    max_loras, max_rank, b_out = Bt.shape
    if b_out != out_features or h.shape != (n, max_rank) or not h.is_contiguous():
        raise ValueError(f"shapes do not match: y {tuple(y.shape)}, h {tuple(h.shape)} (contiguous), "
                         f"Bt {tuple(Bt.shape)}")
    check_rank(max_rank)
    if n == 0 or out_features == 0:
        return y
    cfg = _expand_config(n, _rank_tile(max_rank))
    grid = (triton.cdiv(n, cfg["BLOCK_M"]) * triton.cdiv(out_features, cfg["BLOCK_N"]), max_loras)
    _expand_kernel[grid](
        h, Bt, y, meta.order, meta.seg_start, meta.seg_len,
        out_features, max_rank, h.stride(0), Bt.stride(0), Bt.stride(1), y.stride(0), UPCAST=_upcast(Bt), **cfg)
    return y


def lora_apply_triton(y: torch.Tensor, x: torch.Tensor, meta: SegmentMeta, A: torch.Tensor,
                      Bt: torch.Tensor) -> torch.Tensor:
    """In place on y [N, out] for x [N, in]; A [K, R, in], Bt [K, R, out]. Returns y."""
    return lora_expand(y, lora_shrink(x, A, meta), Bt, meta)


class TritonLoRAOps(TorchLoRAOps):
    """CUDA with Triton: the kernels for every linear; convolutions (LoCon) keep the torch path."""

    def __init__(self, max_loras: int, max_rank: int, device: torch.device, dtype: torch.dtype):
        check_rank(max_rank)
        super().__init__(max_loras, max_rank, device, dtype)

    def _prepare(self, batch: LoRABatch) -> None:
        if not batch.fixed:
            return
        # Inside a captured graph: the segments follow whatever slots and scales a replay wrote.
        meta = batch.memo.get("segments")
        if meta is None:
            batch.memo["segments"] = SegmentMeta.build(batch.slots[:, 0], batch.scales[:, 0], self.max_loras)
        else:
            meta.build_into(batch.slots[:, 0], batch.scales[:, 0])

    def _segments(self, rows: int) -> list[SegmentMeta]:
        """Kernel metadata for a layer input of `rows` = S sequences x T tokens, built once per forward: one per
        stack position that any sequence uses."""
        batch = self.batch
        if batch.fixed:
            return [batch.memo["segments"]]
        metas = batch.memo.get(("segments", rows))
        if metas is None:
            plan = self._plan()  # the sequences' slots and scales on the device, in the model's dtype
            per_seq = rows // batch.num_seqs
            used = (plan.seq_scales != 0).any(0).nonzero().view(-1).tolist()
            metas = batch.memo[("segments", rows)] = [
                SegmentMeta.build(plan.seq_slots[:, j].repeat_interleave(per_seq),
                                  plan.seq_scales[:, j].repeat_interleave(per_seq), self.max_loras)
                for j in used]
        return metas

    def add_linear(self, y: torch.Tensor, x: torch.Tensor, layer: SlotWeights) -> torch.Tensor:
        if not self._live(layer):
            return y
        y2, x2 = y.view(-1, layer.out_features), x.reshape(-1, layer.in_features).contiguous()
        for meta in self._segments(x2.shape[0]):  # one kernel pass per stack position
            lora_apply_triton(y2, x2, meta, layer.lora_A, layer.lora_B)
        return y
