"""The one description of a forward's adapters: which (slot, scale) pairs each row adds.

A request's adapters become one `RowLoRA` per batch row once its slots are acquired; the LLM runner and the
diffusion generator turn the rows of a forward into one `LoRABatch` (`LoRABatch.from_rows`) and hand it to the
model's ops backend (`LoRAContext.use`), which every LoRA layer reads. CUDA graphs replay over a *fixed* batch whose
device buffers are written in place (`LoRAOps.fixed_batch`, `LoRABatch.write`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

NO_ADAPTER = -1  # the slot id of "no LoRA" wherever a slot id may be absent


@dataclass(frozen=True)
class RowLoRA:
    """One batch row's adapters: (slot, scale) pairs whose deltas add up (a LoRA stack); () = the base model."""

    pairs: tuple[tuple[int, float], ...] = ()

    @classmethod
    def one(cls, slot: int, scale: float) -> "RowLoRA":
        return cls() if slot == NO_ADAPTER else cls(((slot, scale),))

    @classmethod
    def stack(cls, pairs: Sequence[tuple[int, float]]) -> "RowLoRA":
        return cls(tuple((int(s), float(c)) for s, c in pairs if s != NO_ADAPTER))

    def __bool__(self) -> bool:
        return bool(self.pairs)


@dataclass(frozen=True)
class LoRABatch:
    """Sequence -> its stack of (slot, scale) pairs for one forward: S sequences x M pairs (M = the deepest
    stack). Dead pairs (no adapter, padding of a shorter stack, scale 0) are slot 0 with scale 0, so every entry
    indexes a real slot.

    An eager batch holds host tensors (`slots` int64, `scales` float64) that each ops backend plans once (its plan
    is memoised on the batch). A fixed batch (`fixed`) holds device buffers of one captured size with M = 1, which
    a CUDA graph reads: every LoRA layer runs for it whatever the slots hold, and `write` refills it in place.
    """

    slots: torch.Tensor  # [S, M] int64
    scales: torch.Tensor  # [S, M]
    live_slots: frozenset = frozenset()  # slots of pairs with an adapter and a non-zero scale (eager batches)
    fixed: bool = False
    # Rows are tokens of varlen sequences: tokens per sequence, in order (an engine step: one-token decode rows
    # first, then prefill chunks). Empty: one row per sequence, or S * T rows of T tokens each.
    runs: tuple[int, ...] = ()
    memo: dict = field(default_factory=dict, compare=False, repr=False)  # the ops backend's per-batch metadata

    @classmethod
    def build(cls, slot_ids: Sequence | torch.Tensor, scales: Sequence | torch.Tensor) -> "LoRABatch":
        """One slot id (NO_ADAPTER = none) and scale per sequence ([S]), or a stack of them per sequence ([S, M],
        unused entries NO_ADAPTER); a stack never holds one slot twice."""
        slots = torch.as_tensor(slot_ids, dtype=torch.long)
        scale = torch.as_tensor(scales, dtype=torch.float64)
        if slots.shape != scale.shape:
            raise ValueError(f"slot ids of shape {tuple(slots.shape)} but scales of shape {tuple(scale.shape)}")
        if slots.dim() < 2:
            slots, scale = slots.reshape(-1, 1), scale.reshape(-1, 1)
        live = (slots != NO_ADAPTER) & (scale != 0)
        return cls(torch.where(live, slots, torch.zeros_like(slots)), torch.where(live, scale, torch.zeros_like(scale)),
                   frozenset(slots[live].tolist()))

    @classmethod
    def from_rows(cls, rows: Sequence[RowLoRA], tokens: Sequence[int] | None = None) -> "LoRABatch":
        """One row per sequence, or with `tokens` (tokens per sequence) one row per token of varlen sequences."""
        depth = max((len(r.pairs) for r in rows), default=0) or 1
        padded = [r.pairs + ((NO_ADAPTER, 0.0),) * (depth - len(r.pairs)) for r in rows]
        if tokens is None:
            return cls.build([[s for s, _ in p] for p in padded], [[c for _, c in p] for p in padded])
        counts = torch.as_tensor(list(tokens), dtype=torch.long)
        slots = torch.tensor([[s for s, _ in p] for p in padded], dtype=torch.long).repeat_interleave(counts, 0)
        scales = torch.tensor([[c for _, c in p] for p in padded], dtype=torch.float64).repeat_interleave(counts, 0)
        batch = cls.build(slots, scales)
        return replace(batch, runs=tuple(int(t) for t in tokens))

    @classmethod
    def fixed_size(cls, rows: int, device: torch.device | str) -> "LoRABatch":
        """Device buffers for `rows` rows of one adapter each, all scale 0 (see `write`)."""
        return cls(torch.zeros(rows, 1, dtype=torch.long, device=device),
                   torch.zeros(rows, 1, dtype=torch.float32, device=device), fixed=True)  # 1.3 stays 1.3 in bf16

    @property
    def num_seqs(self) -> int:
        return self.slots.shape[0]

    @property
    def depth(self) -> int:
        return self.slots.shape[1]

    @property
    def empty(self) -> bool:
        """No pair adds anything (an eager batch; a fixed one is never empty: its buffers change between replays)."""
        return not self.fixed and not self.live_slots

    def repeat(self, times: int) -> "LoRABatch":
        """The rows `times` over, in order (a diffusion denoiser under classifier-free guidance sees 2B rows)."""
        if self.fixed:
            raise ValueError("a fixed LoRA batch has the size it was captured with")
        return LoRABatch(self.slots.repeat(times, 1), self.scales.repeat(times, 1), self.live_slots)

    def write(self, batch: "LoRABatch") -> None:
        """Fixed batches: rows 0..S-1 take `batch`'s (one adapter per row), the rest scale 0. In place (captured
        graphs read these buffers), without a host sync."""
        if not self.fixed or batch.depth != 1:
            raise ValueError("write copies a batch of one adapter per row into a fixed batch")
        n = batch.num_seqs
        if n > self.num_seqs:
            raise ValueError(f"{n} rows do not fit a fixed LoRA batch of {self.num_seqs}")
        self.scales.zero_()
        self.slots[:n].copy_(batch.slots, non_blocking=True)
        self.scales[:n].copy_(batch.scales, non_blocking=True)
