"""Log-probabilities of chosen tokens and the top alternatives, from the logits the engine already computed (the
request's adapter and scale applied): OpenAI's `logprobs`, and with `echo` the prompt's own tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for a prompt's first token: nothing before it predicts it
    top: tuple[tuple[int, float], ...] = ()  # the `top_n` most likely tokens at this position, best first


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """Row i of `logits` [n, vocab] is the distribution token_ids[i] was drawn from (raw model logits, before
    temperature or top-p, as vLLM reports them)."""
    if not len(token_ids):
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(token_ids), device=logits.device).view(-1, 1)
    chosen = logprobs.gather(-1, ids).view(-1).tolist()
    if not top_n:
        return [TokenLogprob(t, lp) for t, lp in zip(token_ids, chosen)]
    values, indices = logprobs.topk(top_n, dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(i, v)))
            for t, lp, i, v in zip(token_ids, chosen, indices.tolist(), values.tolist())]


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """`logits` [len(prompt), vocab]: position j predicts prompt token j + 1."""
    first = TokenLogprob(prompt_ids[0], None)
    return [first, *token_logprobs(logits[:-1], prompt_ids[1:], top_n)]
