"""Wrap a model's target `nn.Linear` layers in place with LoRA-aware layers that share one `LoRAContext`.

The context holds the current forward's row -> slot mapping (set once per forward, read by every layer) and owns
the stacked slot buffers of every wrapped layer. Base weights are never touched, so with no adapter (or scale 0)
outputs are bit-identical to the unpatched model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from backends.lora.adapter import LoRAAdapter, TargetSpec
from backends.lora import triton_ops
from backends.lora.layer import SlotLayer, wrap_matching
from backends.lora.ops import LoRABatch, lora_apply, lora_apply_rows
from backends.lora.targets import PackedPart, llm_targets


class LoRALinear(SlotLayer):
    def __init__(self, base: nn.Linear, context: "LoRAContext", name: str):
        super().__init__(base, context, name, base.in_features, base.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self._context[0]
        rows = ctx.rows
        if rows is not None:  # fixed-shape path (CUDA graphs): every layer runs, whatever the slots hold
            y2, x2 = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
            if rows.segments is not None:
                triton_ops.lora_apply_triton(y2, x2.contiguous(), rows.segments, self.lora_A, self.lora_B)
            else:
                lora_apply_rows(y2, x2, rows.slots, rows.scales, self.lora_A, self.lora_B)
        elif ctx.batch is not None and not ctx.batch.empty and not self.loaded_slots.isdisjoint(ctx.batch.live_slots):
            y2, x2 = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
            if ctx.kernels:
                x2 = x2.contiguous()
                for segments in ctx.segments_for(x2.shape[0]):  # one kernel pass per stack position
                    triton_ops.lora_apply_triton(y2, x2, segments, self.lora_A, self.lora_B)
            else:
                lora_apply(y2, x2, ctx.batch, self.lora_A, self.lora_B)
        return y


@dataclass
class RowSlots:
    """Fixed-size per-row LoRA buffers of one captured batch size: slot (>= 0) and scale (0 = no LoRA) per row,
    and on CUDA the kernels' segment metadata, rebuilt from them by `refresh` (inside the graph)."""

    slots: torch.Tensor
    scales: torch.Tensor
    segments: "triton_ops.SegmentMeta | None" = None

    @classmethod
    def allocate(cls, rows: int, context: "LoRAContext") -> "RowSlots":
        slots = torch.zeros(rows, dtype=torch.long, device=context.device)
        scales = torch.zeros(rows, dtype=torch.float32, device=context.device)  # 1.3 stays 1.3 in a bf16 model
        segments = triton_ops.SegmentMeta.build(slots, scales, context.max_loras) if context.kernels else None
        return cls(slots, scales, segments)

    def write(self, live: Sequence[tuple[int, float]]) -> None:
        """Rows 0..len(live)-1 get (slot, scale); the rest scale 0. In place: captured graphs read these buffers."""
        n = len(live)
        self.scales.zero_()
        self.slots[:n].copy_(torch.tensor([s for s, _ in live], dtype=torch.long), non_blocking=True)
        self.scales[:n].copy_(torch.tensor([c for _, c in live], dtype=self.scales.dtype), non_blocking=True)

    def refresh(self) -> None:
        if self.segments is not None:
            self.segments.build_into(self.slots, self.scales)


class LoRAContext:
    """Shared per-model LoRA state: slot buffers of every wrapped layer and the active batch mapping."""

    def __init__(self, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device | str,
                 model_name: str | None = None):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras}, {max_rank}")
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.model_name = model_name
        self.layers: dict[str, SlotLayer] = {}
        # Fused layers (Phi-3 qkv_proj, ...) -> their parts, so adapters trained on the parts load onto them.
        self.packed: dict[str, tuple[PackedPart, ...]] = {}
        self.batch: LoRABatch | None = None
        # Fixed-size per-row buffers for the CUDA-graph path; None = the per-batch paths.
        self.rows: RowSlots | None = None
        # On CUDA the LoRA math runs in the Triton-language shrink/expand kernels; CPU keeps the torch paths.
        self.kernels = self.device.type == "cuda" and triton_ops.triton is not None
        if self.kernels:
            triton_ops.check_rank(max_rank)
        self._segments: dict[int, list["triton_ops.SegmentMeta"]] = {}

    @property
    def spec(self) -> TargetSpec:
        return TargetSpec({n: (m.in_features, m.out_features) for n, m in self.layers.items()}, self.model_name,
                          self.packed, {n: m.kernel for n, m in self.layers.items() if hasattr(m, "kernel")})

    # -- per forward -----------------------------------------------------------------------------------------
    def set_batch(self, slot_ids: Sequence, scales: Sequence) -> None:
        """One slot (-1 = none) and scale per sequence, or a stack of them per sequence (see `LoRABatch.build`);
        layers see [S, ...] or [S, T, ...] inputs."""
        self.batch = LoRABatch.build(slot_ids, scales, self.max_rank, self.device, self.dtype)
        self._segments = {}

    def segments_for(self, rows: int) -> list["triton_ops.SegmentMeta"]:
        """Kernel metadata for a layer input of `rows` = S sequences x T tokens, built once per forward: one per
        stack position that any sequence uses."""
        metas = self._segments.get(rows)
        if metas is None:
            per_seq = rows // self.batch.num_seqs
            used = (self.batch.seq_scales != 0).any(0).nonzero().view(-1).tolist()
            metas = self._segments[rows] = [
                triton_ops.SegmentMeta.build(self.batch.seq_slots[:, j].repeat_interleave(per_seq),
                                             self.batch.seq_scales[:, j].repeat_interleave(per_seq), self.max_loras)
                for j in used]
        return metas

    def clear(self) -> None:
        self.batch = None
        self._segments = {}

    @contextlib.contextmanager
    def use(self, slot_ids: Sequence, scales: Sequence) -> Iterator[None]:
        self.set_batch(slot_ids, scales)
        try:
            yield
        finally:
            self.clear()

    # -- slot contents ---------------------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} outside 0..{self.max_loras - 1}")

    @torch.no_grad()
    def load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter into `slot` of every layer (zero-padded to max_rank; untargeted layers zeroed)."""
        self._check_slot(slot)
        for name, layer in self.layers.items():
            weights = adapter.modules.get(name)
            r = 0 if weights is None else weights.A.shape[0]
            if r:
                layer.lora_A[slot, :r].copy_(weights.A, non_blocking=True)
                layer.lora_B[slot, :r].copy_(weights.Bt, non_blocking=True)
            # Invariant: a slot outside `loaded_slots` is all zeros (the CUDA-graph path reads every layer), so
            # only a slot the previous adapter used needs its padding (or, if skipped now, all of it) zeroed.
            if r < self.max_rank and slot in layer.loaded_slots:
                layer.lora_A[slot, r:].zero_()
                layer.lora_B[slot, r:].zero_()
            (layer.loaded_slots.add if r else layer.loaded_slots.discard)(slot)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.loaded_slots.discard(slot)


def patch_model(
    model: nn.Module,
    max_loras: int,
    max_rank: int,
    targets: str | Callable[[str, nn.Module], bool] | None = None,
    dtype: torch.dtype | None = None,
    model_name: str | None = None,
) -> LoRAContext:
    """Replace every `nn.Linear` whose name matches `targets` (regex, full match, or predicate; default: every
    linear of the decoder blocks, see `backends.lora.targets`) with `LoRALinear`."""
    first = next(model.parameters())
    model_name = model_name or getattr(getattr(model, "config", None), "name_or_path", None) or None
    context = LoRAContext(max_loras, max_rank, dtype or first.dtype, first.device, model_name)
    if targets is None:
        targets = llm_targets(model)
    if not wrap_matching(model, context, lambda m: isinstance(m, nn.Linear), targets, LoRALinear):
        raise ValueError(f"no nn.Linear of {type(model).__name__} matches the LoRA targets {targets!r}")
    return context
