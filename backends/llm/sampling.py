"""Next-token choice for a batch of rows, each with its own parameters and random generator.

Each sampled row draws from its own `torch.Generator` on the logits' device, seeded from the request, so a seeded
request gets the same tokens whatever other requests share its batch (and on the same device, run after run). A row whose logits are not finite (NaN or +inf from a broken
adapter or overflow) gets an error instead of a token; the other rows are unaffected.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from backends.errors import InternalError
from backends.llm.params import SamplingParams


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return gen


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token once the mass before it already reaches top_p; the first token always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> list[int | Exception]:
    """logits: [batch, vocab] float; returns one token id per row, or the error that row failed with."""
    logits = logits.float()
    chosen: list[int | Exception] = logits.argmax(-1).tolist()
    bad = (torch.isnan(logits) | torch.isposinf(logits)).any(-1)
    if bool(bad.any()):
        for row in bad.nonzero().flatten().tolist():
            chosen[row] = InternalError("the model produced non-finite logits (NaN/inf) for this request")
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy or isinstance(chosen[row], Exception):
            continue
        try:
            row_logits = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
            probs = row_logits.softmax(-1)
            chosen[row] = int(torch.multinomial(probs, 1, generator=gen).item())
        except RuntimeError as exc:  # e.g. probabilities that overflowed: this row only
            chosen[row] = InternalError(f"sampling failed: {exc}")
    return chosen
