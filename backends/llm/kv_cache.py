"""KV cache for a continuously changing batch of sequences: left-padded rows in growable per-layer buffers.

Rows are right-aligned (each sequence's tokens end at the same column) so one decode step appends one column for
the whole batch. An attention mask marks the left padding; positions come from the mask, so every row sees exactly
its own tokens at its own positions. Buffers grow in chunks (no per-step `torch.cat` of the whole cache), rows
leave with `keep` (which also drops columns that became padding for every remaining row, freeing their memory)
and join with `concat`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

GROW_TOKENS = 64  # spare columns allocated at a time: one buffer copy per 64 decode steps


class PaddedLayer(DynamicLayer):
    """One attention layer's keys/values in `[batch, heads, capacity, head_dim]` buffers; `[..., :length, :]` live."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def _set(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self._k, self._v, self.length = k, v, length
        self.keys, self.values = k[:, :, :length], v[:, :, :length]

    def _reserve(self, need: int, like: torch.Tensor, like_v: torch.Tensor) -> None:
        if self._k is not None and need <= self._k.shape[2]:
            return
        b, h, _, d = like.shape
        k = like.new_zeros(b, h, need + GROW_TOKENS, d)
        v = like_v.new_zeros(b, h, need + GROW_TOKENS, like_v.shape[-1])
        if self._k is not None and self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._set(k, v, self.length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        t = key_states.shape[-2]
        self._reserve(self.length + t, key_states, value_states)
        self._k[:, :, self.length : self.length + t] = key_states
        self._v[:, :, self.length : self.length + t] = value_states
        self._set(self._k, self._v, self.length + t)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0
        super().reset()

    def take(self, rows: torch.Tensor, first_col: int) -> None:
        """Keep `rows` and the columns from `first_col` on, in fresh buffers (the old memory is released)."""
        n = self.length - first_col
        k = self._k.new_zeros(len(rows), self._k.shape[1], n + GROW_TOKENS, self._k.shape[3])
        v = self._v.new_zeros(len(rows), self._v.shape[1], n + GROW_TOKENS, self._v.shape[3])
        k[:, :, :n] = self._k.index_select(0, rows)[:, :, first_col : self.length]
        v[:, :, :n] = self._v.index_select(0, rows)[:, :, first_col : self.length]
        self._set(k, v, n)

    @staticmethod
    def joined(a: "PaddedLayer", b: "PaddedLayer") -> "PaddedLayer":
        """Rows of `a` then rows of `b`, right-aligned to the longer of the two (the shorter padded on the left)."""
        n = max(a.length, b.length)
        rows = a._k.shape[0] + b._k.shape[0]
        k = a._k.new_zeros(rows, a._k.shape[1], n + GROW_TOKENS, a._k.shape[3])
        v = a._v.new_zeros(rows, a._v.shape[1], n + GROW_TOKENS, a._v.shape[3])
        for src, start in ((a, 0), (b, a._k.shape[0])):
            end = start + src._k.shape[0]
            k[start:end, :, n - src.length : n] = src._k[:, :, : src.length]
            v[start:end, :, n - src.length : n] = src._v[:, :, : src.length]
        out = PaddedLayer()
        out.device, out.is_initialized = a.device, True
        out._set(k, v, n)
        return out


class PaddedKVCache(Cache):
    def __init__(self, num_layers: int):
        super().__init__(layers=[PaddedLayer() for _ in range(num_layers)])


class KVBatch:
    """The KV cache of the running sequences plus their attention mask `[rows, length]` (1 = real token)."""

    def __init__(self, cache: PaddedKVCache, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def next_positions(self) -> torch.Tensor:
        """[rows, 1]: the position of each row's next token = how many real tokens it has."""
        return self.mask.sum(-1, keepdim=True)

    def mask_with_new_column(self) -> torch.Tensor:
        return torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)

    def keep(self, rows: list[int]) -> None:
        """Drop every other row; columns that are padding for all remaining rows go too."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        real_cols = torch.nonzero(mask.any(0)).reshape(-1)
        first = int(real_cols[0]) if real_cols.numel() else mask.shape[1]
        for layer in self.cache.layers:
            layer.take(index, first)
        self.mask = mask[:, first:].contiguous()

    def concat(self, other: "KVBatch") -> None:
        """Append `other`'s rows (newly prefilled sequences) after this batch's rows."""
        self.cache.layers = [PaddedLayer.joined(a, b) for a, b in zip(self.cache.layers, other.cache.layers)]
        n = max(self.length, other.length)
        pad = lambda m: torch.nn.functional.pad(m, (n - m.shape[1], 0))  # noqa: E731
        self.mask = torch.cat([pad(self.mask), pad(other.mask)], dim=0)
