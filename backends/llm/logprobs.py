"""Log-probabilities of chosen tokens and the top alternatives, from the logits the engine already computed (the
request's adapter and scale applied): OpenAI's `logprobs`, and with `echo` the prompt's own tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

CHUNK = 256  # positions converted to float and normalised at a time

@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for a prompt's first token: nothing before it predicts it
    top: tuple[tuple[int, float], ...] = ()  # the `top_n` most likely tokens at this position, best first


def token_logprobs(logits: torch.Tensor, token_ids: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """Row i of `logits` [n, vocab] is the distribution token_ids[i] was drawn from (raw model logits, before
    temperature or top-p, as vLLM reports them)."""
    out: list[TokenLogprob] = []
    for start in range(0, len(token_ids), CHUNK):  # float copies of a chunk, never of a whole long prompt
        ids = list(token_ids[start : start + CHUNK])
        logprobs = torch.log_softmax(logits[start : start + CHUNK].float(), dim=-1)
        chosen = logprobs.gather(-1, torch.tensor(ids, device=logits.device).view(-1, 1)).view(-1).tolist()
        if not top_n:
            out += [TokenLogprob(t, lp) for t, lp in zip(ids, chosen)]
            continue
        values, indices = logprobs.topk(top_n, dim=-1)
        out += [TokenLogprob(t, lp, tuple(zip(i, v)))
                for t, lp, i, v in zip(ids, chosen, indices.tolist(), values.tolist())]
    return out


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """`logits` [len(prompt), vocab]: position j predicts prompt token j + 1."""
    first = TokenLogprob(prompt_ids[0], None)
    return [first, *token_logprobs(logits[:-1], prompt_ids[1:], top_n)]
