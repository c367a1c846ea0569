"""Admission policy of the continuous-batching engine: which waiting requests join the running batch this step.

First come, first served, within three limits: `max_num_seqs` running sequences, a prefill token budget per step
(padded tokens, since the new prompts are left-padded into one forward), and the LoRA slots (`fits` says whether a
set of adapters can be resident at once; a LoRA stack counts each of its adapters). A request whose adapters do not fit is passed over by later requests
whose adapters do fit, but only for `max_bypass_steps` steps: after that nothing behind it is admitted until it
is, so the running adapters drain and it gets its slot (bounded wait, no starvation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Protocol


class Schedulable(Protocol):
    num_prompt_tokens: int
    adapter_keys: frozenset[Hashable]  # empty = base model; a LoRA stack holds several
    bypassed_steps: int


@dataclass(frozen=True)
class SchedulerLimits:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_bypass_steps: int = 8


class Scheduler:
    def __init__(self, limits: SchedulerLimits, fits: Callable[[set], bool]):
        self.limits = limits
        self._fits = fits

    def admit(self, waiting: Iterable[Schedulable], running: Iterable[Schedulable]) -> list[Schedulable]:
        """The waiting requests (in queue order) to prefill now; updates their `bypassed_steps`."""
        running = list(running)
        free = self.limits.max_num_seqs - len(running)
        adapters = set().union(*(s.adapter_keys for s in running))
        chosen: list[Schedulable] = []
        widest = 0
        for seq in waiting:
            if free <= 0:
                break
            width = max(widest, seq.num_prompt_tokens)
            # The first request always goes (a prompt longer than the budget must still run, alone).
            if chosen and width * (len(chosen) + 1) > self.limits.max_num_batched_tokens:
                break
            wanted = adapters | seq.adapter_keys
            if not self._fits(wanted):
                seq.bypassed_steps += 1
                if seq.bypassed_steps > self.limits.max_bypass_steps:
                    break  # hold everything behind it until its adapter gets a slot
                continue
            chosen.append(seq)
            adapters, widest, free = wanted, width, free - 1
        return chosen
