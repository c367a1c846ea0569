"""KV cache of the running sequences: one preallocated slot per sequence, sized once within a memory budget.

Every layer owns `keys`/`values` buffers `[num_slots, kv_heads, max_model_len, head_dim]`, allocated (zeroed) at
load and never reallocated. A sequence takes the lowest free slot when it is admitted and gives it back when it
finishes: nobody else's cache is copied on join or leave, and the decode step's tensors are views with fixed
addresses, which is what a CUDA graph needs. Each sequence's tokens sit at columns `0..len-1` of its slot, so its
positions are plain column numbers (no left padding during decode).

Decode runs the slot prefix `[0, hi)` as the batch, row r = slot r: the K/V views are `buffer[:hi, :, :width]`,
no gather. A free slot inside the prefix becomes a dummy row (it attends to column 0 of its own slot and its
output is dropped); the lowest-free-first policy refills such holes with the next admitted request. When holes
are many (a draining batch), an eager step runs only the live rows and attention reads a gathered copy of their
slots instead: a copy a third the size of the one grouped-query attention already makes, cheaper than running
dummy rows through the whole model.

Why slots and not pages: a paged cache (vLLM's block tables) wastes less memory on short sequences, but attention
must then read K/V through the block table, which needs a paged-attention kernel; Hugging Face attention (eager
or SDPA, the path on CPU and for any model family) wants each row's K/V contiguous. A slot per sequence keeps the
stock attention, bounded memory and capturable decode; the cost is that every slot reserves `max_model_len`
tokens, so the budget holds fewer long-context sequences than pages would (docs/llm_engine.md).
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

log = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> "KVShape":
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(int(config.num_hidden_layers), int(kv_heads), int(head_dim), dtype)

    @property
    def bytes_per_token(self) -> int:
        """Keys and values of one token in every layer."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def plan_num_slots(shape: KVShape, max_model_len: int, max_num_seqs: int, budget_bytes: int) -> int:
    """How many sequences of up to `max_model_len` tokens the budget holds (at most `max_num_seqs`)."""
    per_seq = shape.bytes_per_token * max_model_len
    slots = min(max_num_seqs, budget_bytes // per_seq)
    if slots < 1:
        raise ValueError(
            f"the KV-cache budget of {budget_bytes / MiB:.1f} MiB cannot hold one sequence of max_model_len="
            f"{max_model_len} tokens: that needs {per_seq / MiB:.1f} MiB ({shape.bytes_per_token} bytes per token); "
            f"raise kv_cache_memory_bytes or lower max_model_len"
        )
    return int(slots)


class _SlotLayer(DynamicLayer):
    """What one attention layer sees of the slot buffers during a forward (prefill or decode)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, view):
        super().__init__()
        self._buffers = (keys, values)
        self._view = view
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._view.update(self._buffers, key_states, value_states)

    def get_seq_length(self) -> int:
        return 0


class _PrefillWrite:
    """Left-padded prompts [n, heads, width, dim]: each row's real tokens go to its slot's first columns; the
    prompts attend only to themselves, so the layer returns the new states unchanged."""

    def __init__(self, slots: Sequence[int], lengths: Sequence[int], width: int, device: torch.device):
        rows, src, dst_slot, dst_col = [], [], [], []
        for row, (slot, n) in enumerate(zip(slots, lengths)):
            rows += [row] * n
            src += range(width - n, width)
            dst_slot += [slot] * n
            dst_col += range(n)
        as_t = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
        self.rows, self.src, self.dst_slot, self.dst_col = as_t(rows), as_t(src), as_t(dst_slot), as_t(dst_col)

    def update(self, buffers, key_states, value_states):
        for buf, new in zip(buffers, (key_states, value_states)):
            # [tokens, heads, dim] on both sides: one scatter per layer for the whole prefill.
            buf[self.dst_slot, :, self.dst_col] = new[self.rows, :, self.src]
        return key_states, value_states


class _DecodeWrite:
    """One new token per row, written at (slots[i], positions[i]). Attention reads the first `width` columns of the
    slot prefix in place (slots = 0..n-1), or, for a sparse batch, a gathered copy of just those slots."""

    def __init__(self, slots: torch.Tensor, positions: torch.Tensor, width: int, gather: bool):
        self.slots, self.positions, self.width, self.gather = slots, positions, width, gather

    def update(self, buffers, key_states, value_states):
        out = []
        for buf, new in zip(buffers, (key_states, value_states)):
            buf[self.slots, :, self.positions] = new[:, :, 0]
            view = buf[:, :, : self.width]
            out.append(view.index_select(0, self.slots) if self.gather else view[: self.slots.shape[0]])
        return out[0], out[1]


class SlotKVCache:
    def __init__(self, shape: KVShape, num_slots: int, max_model_len: int, device: torch.device | str):
        self.shape, self.num_slots, self.max_model_len = shape, num_slots, max_model_len
        self.device = torch.device(device)
        dims = (num_slots, shape.kv_heads, max_model_len, shape.head_dim)
        # Zeroed, not empty: masked columns get weight exactly 0, and 0 * NaN from stale memory would be NaN.
        self.keys = [torch.zeros(dims, dtype=shape.dtype, device=self.device) for _ in range(shape.num_layers)]
        self.values = [torch.zeros(dims, dtype=shape.dtype, device=self.device) for _ in range(shape.num_layers)]
        self._free = list(range(num_slots))  # a heap: the lowest free slot goes first, keeping the prefix dense
        self._used: set[int] = set()

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.max_model_len * self.shape.bytes_per_token

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of the allocated cache reserved by running sequences (each holds a whole slot)."""
        return len(self._used) / self.num_slots

    @property
    def prefix(self) -> int:
        """Rows a decode step runs: every slot up to the highest one in use."""
        return max(self._used) + 1 if self._used else 0

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def free(self, slot: int, scrub: bool = False) -> None:
        """Give the slot back. `scrub` zeroes it: a sequence that failed may have left NaN/inf keys or values, and
        the next owner's masked columns would still turn them into NaN (0 x NaN) in attention."""
        if slot in self._used:
            if scrub:
                for buf in (*self.keys, *self.values):
                    buf[slot].zero_()
            self._used.remove(slot)
            heapq.heappush(self._free, slot)

    def _cache(self, view) -> Cache:
        return Cache(layers=[_SlotLayer(k, v, view) for k, v in zip(self.keys, self.values)])

    def prefill_view(self, slots: Sequence[int], lengths: Sequence[int], width: int) -> Cache:
        return self._cache(_PrefillWrite(slots, lengths, width, self.device))

    def decode_view(self, positions: torch.Tensor, width: int, slots: torch.Tensor | None = None) -> Cache:
        """positions: [n] device tensor; row i is slot i (the prefix, read in place) or, given `slots`, slots[i]
        (gathered). Attention sees columns [0, width)."""
        if slots is None:
            return self._cache(_DecodeWrite(torch.arange(positions.shape[0], device=positions.device), positions,
                                            width, gather=False))
        return self._cache(_DecodeWrite(slots, positions, width, gather=True))


def prefill_mask(lengths: Sequence[int], width: int, dtype: torch.dtype, device, window: int | None = None
                 ) -> torch.Tensor:
    """Additive [n, 1, width, width] causal mask over left-padded prompts (keys within `window` positions of the
    query when given). A padding query attends to itself only, so no softmax row is empty (an all-masked row
    would be NaN); its output is never read."""
    n = len(lengths)
    col = torch.arange(width, device=device)
    real = col.unsqueeze(0) >= (width - torch.tensor(lengths, device=device)).unsqueeze(1)  # [n, width]
    causal = col.view(1, -1) <= col.view(-1, 1)  # [q, k]
    if window is not None:  # transformers' sliding window: key > query - window
        causal &= col.view(1, -1) > col.view(-1, 1) - window
    allowed = causal.unsqueeze(0) & real.unsqueeze(1)  # real keys at or before the query
    allowed |= torch.eye(width, dtype=torch.bool, device=device).unsqueeze(0)
    return _additive(allowed.view(n, 1, width, width), dtype)


def decode_mask_into(out: torch.Tensor, positions: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Fill the additive [n, 1, 1, width] mask in place: row r sees columns 0..positions[r] (the last `window`
    of them when given)."""
    col = torch.arange(out.shape[-1], device=out.device)
    allowed = col.view(1, -1) <= positions.view(-1, 1)
    if window is not None:
        allowed &= col.view(1, -1) > positions.view(-1, 1) - window
    out.copy_(_additive(allowed, out.dtype).view_as(out))
    return out


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)
