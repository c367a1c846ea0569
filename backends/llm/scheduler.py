"""Admission policy of the continuous-batching engine: which waiting requests join the running batch this step.

First come, first served, within `max_num_seqs` running sequences and the LoRA slots (`fits` says whether a set of
adapters can be resident at once; a LoRA stack counts each of its adapters). Whether a request's tokens and KV
blocks fit this step is the engine's `take` callback's call: it admits the request, passes it over, or stops the
admission (FCFS: nobody behind a request that does not fit in the blocks goes first). A request whose adapters do
not fit is passed over by later requests whose adapters do fit, but only for `max_bypass_steps` steps: after that
nothing behind it is admitted until it is, so the running adapters drain and it gets its slot (bounded wait, no
starvation).

`max_num_batched_tokens` is the token budget of one step, shared by decode rows (one token each, served first) and
prefill chunks (vLLM's chunked prefill): a long prompt is prefilled over several steps while the running streams
keep producing a token every step.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Protocol


class Schedulable(Protocol):
    adapter_keys: frozenset[Hashable]  # empty = base model; a LoRA stack holds several
    bypassed_steps: int


class Take(enum.Enum):
    ADMITTED = "admitted"
    SKIPPED = "skipped"  # not now (its adapter slots are pinned elsewhere); later requests may go
    STOP = "stop"  # no room this step (tokens or KV blocks): nobody behind it goes first


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    max_bypass_steps: int = 8

    def __post_init__(self):
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence decodes one token per step")


class Scheduler:
    def __init__(self, limits: SchedulerLimits, fits: Callable[[set], bool]):
        self.limits = limits
        self._fits = fits

    def admit(self, waiting: Iterable[Schedulable], running: Iterable[Schedulable],
              take: Callable[[Schedulable], Take]) -> None:
        """Offer the waiting requests (in queue order) to `take`; updates their `bypassed_steps`."""
        running = list(running)
        free = self.limits.max_num_seqs - len(running)
        adapters = set().union(*(s.adapter_keys for s in running))
        for seq in list(waiting):
            if free <= 0:
                break
            wanted = adapters | seq.adapter_keys
            if not self._fits(wanted):
                seq.bypassed_steps += 1
                if seq.bypassed_steps > self.limits.max_bypass_steps:
                    break  # hold everything behind it until its adapter gets a slot
                continue
            verdict = take(seq)
            if verdict is Take.STOP:
                break
            if verdict is Take.ADMITTED:
                adapters, free = wanted, free - 1
