"""The seam between LoRA layers and LoRA math (vLLM's punica wrapper, SGLang's LoRA backend): a few verbs that every
implementation provides, so a layer's forward is its base output plus one call.

Notation: a LoRA layer holds stacked, zero-padded slot buffers `A` [max_loras, max_rank, in] and `Bt`
[max_loras, max_rank, out] (B transposed, alpha/r folded in). The current batch gives row i of a layer input the
pairs (s_ij, c_ij) of its stack (`LoRABatch`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import nn

from backends.lora.ops.batch import LoRABatch


class SlotWeights(Protocol):
    """What the ops read from a LoRA layer (`backends.lora.layers.base.SlotLayer`)."""

    lora_A: torch.Tensor  # [max_loras, max_rank, in]
    lora_B: torch.Tensor  # [max_loras, max_rank, out] (Bt)
    loaded_slots: set[int]  # slots holding weights for this layer; the others are all zeros
    in_features: int
    out_features: int


class LoRAOps(ABC):
    """One model's LoRA math; the batch it holds is shared by all of that model's layers."""

    def __init__(self, max_loras: int, max_rank: int, device: torch.device, dtype: torch.dtype):
        self.max_loras, self.max_rank, self.device, self.dtype = max_loras, max_rank, device, dtype
        self.batch: LoRABatch | None = None

    def set_batch(self, batch: LoRABatch) -> None:
        """Semantics: until `clear`, every layer input row i gets sum_j c_ij * (x_i A[s_ij]^T) Bt[s_ij].
        Once per forward (plans are built on first use and memoised on the batch); a fixed batch refreshes its
        metadata in place, so a CUDA graph captured around this call follows whatever a replay wrote into it."""
        self.batch = batch
        self._prepare(batch)

    def clear(self) -> None:
        """Semantics: layers add nothing (base-only forward)."""
        self.batch = None

    def fixed_batch(self, rows: int) -> LoRABatch:
        """A fixed batch of `rows` rows (one adapter each) for CUDA-graph capture; refill it with `write`."""
        return LoRABatch.fixed_size(rows, self.device)

    def _live(self, layer: SlotWeights) -> bool:
        """Whether `layer` adds anything in this forward (a fixed batch: always, its slots change between
        replays)."""
        batch = self.batch
        return batch is not None and (batch.fixed or not layer.loaded_slots.isdisjoint(batch.live_slots))

    def _prepare(self, batch: LoRABatch) -> None:
        """Refresh a backend's metadata that must follow a fixed batch in place (eager plans are built lazily)."""

    def rescale_dora(self, y: torch.Tensor, layer: SlotWeights) -> torch.Tensor:
        """Semantics: rows whose adapter (one per row: DoRA is never stacked) holds DoRA weights in this layer get
        y[i] <- bias + g(s_i, c_i) * (y[i] - bias) after `add_linear` (`backends/lora/layers/dora.py`), in place;
        other rows, and scale 0, are untouched. Shared by every backend: one gain per (slot, scale) pair of the
        batch, broadcast over the rows (a sequence's T tokens share its gain row), one multiply."""
        dora, batch = getattr(layer, "dora", None), self.batch
        if dora is None or batch is None or not dora.slots:
            return y
        y2 = y.view(-1, layer.out_features)
        if batch.fixed:
            dora.rescale_fixed(y2, batch.slots[:, 0], batch.scales[:, 0], layer.bias)
            return y
        if dora.slots.isdisjoint(batch.live_slots):
            return y
        pairs, pair_slots, pair_scales, row_pair = self._dora_pairs()
        g = dora.pair_gains(pairs, pair_slots, pair_scales, y.dtype)
        bias = None if layer.bias is None else layer.bias.to(y.dtype)
        n, s = y2.shape[0], batch.num_seqs
        if n % s:
            raise ValueError(f"LoRA batch maps {s} sequences but the layer output has {n} rows")
        # S rows (a varlen engine step has one batch row per token), or S sequences of T tokens each.
        dora.apply(y2.view(s, n // s, -1), g.index_select(0, row_pair).unsqueeze(1), bias)
        return y

    def _dora_pairs(self) -> tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's distinct live (slot, scale) pairs of its rows' first adapter and each row's pair (1-based;
        0: none), on the device, memoised on the batch."""
        key = ("dora_pairs", self.device)
        found = self.batch.memo.get(key)
        if found is None:
            batch = self.batch
            slots, scales = batch.slots[:, 0], batch.scales[:, 0]
            live = scales != 0
            pairs = sorted({(int(a), float(c)) for a, c in zip(slots[live].tolist(), scales[live].tolist())})
            index = {pair: i + 1 for i, pair in enumerate(pairs)}
            row_pair = torch.tensor([index.get((int(a), float(c)), 0) for a, c in zip(slots.tolist(),
                                                                                      scales.tolist())])
            found = batch.memo[key] = (
                tuple(pairs), torch.tensor([a for a, _ in pairs], dtype=torch.long, device=self.device),
                torch.tensor([c for _, c in pairs], dtype=torch.float32, device=self.device),
                row_pair.to(self.device))
        return found

    @abstractmethod
    def add_linear(self, y: torch.Tensor, x: torch.Tensor, layer: SlotWeights) -> torch.Tensor:
        """Semantics: y[i] += sum_j c_ij * (x[i] @ A[s_ij].T) @ Bt[s_ij], in place, for x [..., in] and y
        [..., out] whose leading dims are the batch's S rows or S x T tokens; returns y."""

    @abstractmethod
    def add_conv(self, y: torch.Tensor, x: torch.Tensor, layer: SlotWeights, base: nn.Conv2d) -> torch.Tensor:
        """Semantics: y[i] += sum_j c_ij * conv1x1(conv2d(x[i], A[s_ij] as [R, in, kh, kw], base's stride, padding
        and dilation), Bt[s_ij]), in place, for x [S, in, H, W]; returns y."""
