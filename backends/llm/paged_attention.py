"""Attention over the paged KV cache for one engine step, as a transformers attention function.

A step is one forward over the *flattened* tokens of every row it runs (input `[1, T]`): first the rows that feed
one token (decode, or the last token of a prompt), then the prefill chunks, each a run of a sequence's tokens. The
linear layers and the LoRA ops see T tokens and no padding; only attention needs to know the rows, and that is
this function, registered with transformers' `AttentionInterface` under `ATTENTION` and chosen as the model's
attention implementation. The model passes our `StepLayout` through to it (`kv_layout=` model kwarg).

Per layer it writes the step's new keys/values into the pool rows of each token (one `index_copy_`), then reads
each row's context back through its block table: the one-token rows as one batch (keys gathered to the longest
context among them, a bool mask per row), each chunk alone (its context gathered, causal from its first position,
`is_causal` when it starts at 0). Both go to PyTorch's SDPA with grouped-query heads (`enable_gqa`); Gemma-2's
logit soft-capping runs an eager softmax instead. Sliding windows come from the model's own `sliding_window`
argument (`key > query - window`, transformers' rule).

Why this and not transformers' paged cache or FlexAttention (docs/llm_engine.md): transformers' continuous-batching
cache owns its scheduler and its blocks (no adapter-keyed prefix cache, no LoRA rows), and FlexAttention on CPU
compiles a kernel per shape through Inductor (seconds per new shape on this machine); gathered SDPA runs any family
that calls the attention interface, in eager mode, on CPU and CUDA, and its gathers are what grouped-query attention
already copies (`repeat_kv`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from backends.llm.kv_cache import PagedKVCache

ATTENTION = "multilora_paged"


@dataclass
class Chunk:
    """A run of one sequence's tokens: tokens [start, start + length) of the step, positions first_pos..."""

    start: int
    length: int
    first_pos: int
    context: torch.Tensor  # [first_pos + length] pool rows of its keys, positions 0..
    masks: dict = field(default_factory=dict)

    def mask(self, window: int | None, device) -> torch.Tensor | None:
        """Bool [1, 1, length, context] (True = attend), or None for plain causal from position 0."""
        if self.first_pos == 0 and window is None:
            return None
        if window not in self.masks:
            q = torch.arange(self.first_pos, self.first_pos + self.length, device=device).view(-1, 1)
            k = torch.arange(self.first_pos + self.length, device=device).view(1, -1)
            allowed = k <= q
            if window is not None:
                allowed &= k > q - window
            self.masks[window] = allowed.view(1, 1, self.length, -1)
        return self.masks[window]


class StepLayout:
    """Where one step's tokens go in the pool and which pool rows each row attends to.

    One-token rows are described by device tensors (`tables` [n, max_blocks] block tables, `positions` [n]) from
    which the gather index and masks are derived with tensor ops only, memoised per step: the CUDA-graph decode
    step captures exactly this with fixed-size tensors that each replay refills (`begin` clears the memo so a
    capture records the derivation)."""

    def __init__(self, kv: PagedKVCache, write_idx: torch.Tensor, tables: torch.Tensor | None,
                 positions: torch.Tensor | None, chunks: Sequence[Chunk] = (), width: int | None = None):
        self.kv, self.write_idx, self.tables, self.positions = kv, write_idx, tables, positions
        self.num_single = 0 if positions is None else positions.shape[0]
        self.chunks = list(chunks)
        # Keys the one-token rows attend over: the longest context among them (eager), or a fixed width (graphs).
        self.width = width
        self._memo: dict = {}

    def begin(self) -> None:
        self._memo.clear()

    def single_gather(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool rows [n * width] of the one-token rows' contexts (the null block past each row's end) and their
        bool mask [n, 1, 1, width]."""
        if "idx" not in self._memo:
            bs = self.kv.block_size
            cols = torch.arange(self.width, device=self.positions.device)
            valid = cols.view(1, -1) <= self.positions.view(-1, 1)
            rows = self.tables.index_select(1, cols // bs) * bs + cols % bs
            self._memo["idx"] = torch.where(valid, rows, torch.zeros_like(rows)).view(-1)
            self._memo["valid"] = valid
        key = ("mask", window)
        if key not in self._memo:
            allowed = self._memo["valid"]
            if window is not None:
                cols = torch.arange(self.width, device=self.positions.device)
                allowed = allowed & (cols.view(1, -1) > self.positions.view(-1, 1) - window)
            self._memo[key] = allowed.view(self.num_single, 1, 1, self.width)
        return self._memo["idx"], self._memo[key]


def _attend(q, k, v, mask, scaling, softcap, causal: bool) -> torch.Tensor:
    """[B, Hq, L, D] x [B, Hkv, S, D] -> [B, Hq, L, D]."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scaling,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def paged_attention_forward(module, query, key, value, attention_mask=None, dropout: float = 0.0,
                            scaling: float | None = None, sliding_window: int | None = None,
                            softcap: float | None = None, kv_layout: StepLayout | None = None, **kwargs):
    """transformers' attention-function contract: query [1, Hq, T, D], key/value [1, Hkv, T, D] of the step's new
    tokens -> ([1, T, Hq, D], None)."""
    if kv_layout is None:
        raise RuntimeError(f"attention '{ATTENTION}' runs only inside the engine's steps (no kv_layout given)")
    layout = kv_layout
    keys, values = layout.kv.keys[module.layer_idx], layout.kv.values[module.layer_idx]
    keys.index_copy_(0, layout.write_idx, key[0].transpose(0, 1))
    values.index_copy_(0, layout.write_idx, value[0].transpose(0, 1))
    heads, dim = query.shape[1], query.shape[3]
    kv_heads = keys.shape[1]
    out = query.new_empty(query.shape[2], heads, dim)
    n = layout.num_single
    if n:
        idx, mask = layout.single_gather(sliding_window)
        k = keys.index_select(0, idx).view(n, layout.width, kv_heads, dim).transpose(1, 2)
        v = values.index_select(0, idx).view(n, layout.width, kv_heads, dim).transpose(1, 2)
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, Hq, 1, D]
        out[:n] = _attend(q, k, v, mask, scaling, softcap, causal=False)[:, :, 0]
    for chunk in layout.chunks:
        length = chunk.context.shape[0]
        k = keys.index_select(0, chunk.context).view(1, length, kv_heads, dim).transpose(1, 2)
        v = values.index_select(0, chunk.context).view(1, length, kv_heads, dim).transpose(1, 2)
        q = query[:, :, chunk.start:chunk.start + chunk.length]
        mask = chunk.mask(sliding_window, query.device)
        o = _attend(q, k, v, mask, scaling, softcap, causal=mask is None)
        out[chunk.start:chunk.start + chunk.length] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION, paged_attention_forward)
