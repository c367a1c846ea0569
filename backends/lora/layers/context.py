"""`LoRAContext`: one model's LoRA state, shared by all its wrapped layers: the layers and what their slots hold,
the ops backend they call, and the batch it runs (set once per forward with `use`).

Base weights are never touched, so with no adapter (or scale 0) outputs are bit-identical to the unpatched model.
Invariant: a slot outside a layer's `loaded_slots` is all zeros there (a fixed batch runs every layer).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from backends.lora.adapters.peft import LoRAAdapter
from backends.lora.adapters.targets import PackedPart, TargetSpec
from backends.lora.layers.dora import DoraSlots
from backends.lora.ops import make_ops
from backends.lora.ops.batch import LoRABatch


class LoRAContext:
    def __init__(self, max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device | str,
                 model_name: str | None = None):
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_lora_rank must be >= 1, got {max_loras}, {max_rank}")
        self.max_loras, self.max_rank = max_loras, max_rank
        self.dtype, self.device = dtype, torch.device(device)
        self.model_name = model_name
        self.layers: dict[str, nn.Module] = {}  # name -> its SlotLayer
        # Fused layers (Phi-3 qkv_proj, ...) -> their parts, so adapters trained on the parts load onto them.
        self.packed: dict[str, tuple[PackedPart, ...]] = {}
        self.ops = make_ops(max_loras, max_rank, self.device, dtype)
        # Bumped when a layer first gets DoRA buffers: CUDA graphs captured before it never run them.
        self.dora_version = 0
        # CUDA: slot copies run on a side stream (from pinned host copies) and the forwards wait for their event,
        # so a copy overlaps the work queued before it instead of sitting in the compute stream's queue.
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._copied: torch.cuda.Event | None = None

    @property
    def spec(self) -> TargetSpec:
        return TargetSpec({n: (m.in_features, m.out_features) for n, m in self.layers.items()}, self.model_name,
                          self.packed, {n: m.kernel for n, m in self.layers.items() if hasattr(m, "kernel")})

    @contextlib.contextmanager
    def use(self, batch: LoRABatch) -> Iterator[None]:
        """Forwards within the block run `batch` (layers see [S, ...] or [S, T, ...] inputs)."""
        if not (self._copy_stream is not None and torch.cuda.is_current_stream_capturing()):
            self.wait_for_copies()
        self.ops.set_batch(batch)
        try:
            yield
        finally:
            self.ops.clear()

    def wait_for_copies(self) -> None:
        """Order the current stream after the slot copies in flight (CUDA; a no-op elsewhere)."""
        if self._copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied)
            self._copied = None

    # -- slot contents ---------------------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise IndexError(f"slot {slot} outside 0..{self.max_loras - 1}")

    @torch.no_grad()
    def load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter into `slot` of every layer (zero-padded to max_rank; untargeted layers zeroed)."""
        self._check_slot(slot)
        if self._copy_stream is None:
            self._load_slot(slot, adapter)
            return
        # The slot's old contents may still be read by forwards queued before: the copy waits for them.
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            self._load_slot(slot, adapter)
            self._copied = torch.cuda.Event()
            self._copied.record(self._copy_stream)

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        for name, layer in self.layers.items():
            weights = adapter.modules.get(name)
            r = 0 if weights is None else weights.A.shape[0]
            if r:
                layer.lora_A[slot, :r].copy_(weights.A, non_blocking=True)
                layer.lora_B[slot, :r].copy_(weights.Bt, non_blocking=True)
            # The invariant above: only a slot the previous adapter used needs its padding (or, if skipped now,
            # all of it) zeroed.
            if r < self.max_rank and slot in layer.loaded_slots:
                layer.lora_A[slot, r:].zero_()
                layer.lora_B[slot, r:].zero_()
            (layer.loaded_slots.add if r else layer.loaded_slots.discard)(slot)
            self._load_dora(layer, slot, weights if r else None)

    def _load_dora(self, layer: nn.Module, slot: int, weights) -> None:
        if weights is None or weights.magnitude is None:
            if layer.dora is not None:
                layer.dora.clear(slot)
            return
        if layer.dora is None:
            layer.dora = DoraSlots(layer.weight, self.max_loras)
            self.dora_version += 1
        layer.dora.load(slot, layer.weight, weights.A, weights.Bt, weights.magnitude)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        self.wait_for_copies()
        for layer in self.layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.loaded_slots.discard(slot)
            if layer.dora is not None:
                layer.dora.clear(slot)
