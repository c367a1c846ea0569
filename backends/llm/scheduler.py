"""Admission policy of the continuous-batching engine: which waiting requests join the running batch this step.

First come, first served, within `max_num_seqs` running sequences and the LoRA slots (`fits` says whether a set of
adapters can be resident at once; a LoRA stack counts each of its adapters). Whether a request's tokens and KV
blocks fit this step is the engine's `take` callback's call: it admits the request, passes it over, or stops the
admission (FCFS: nobody behind a request that does not fit in the blocks goes first).

Adapters, when more distinct ones wait than there are slots (`max_loras`):
- *Grouping*: a request whose adapters are already in the batch is admitted whatever its place in the queue, and
  once an adapter gets a slot every queued request for it joins in the same step.
- *Rotation with a bounded wait*: a request whose adapters do not fit is passed over by later ones for at most
  `max_bypass_steps` steps. Then it is *starving*: the running adapters with the fewest rows (as few as its
  adapters need) are *closed* to new requests, so they drain while base requests and requests for the other
  resident adapters keep going; nobody behind it takes a new slot. When the closed adapters' rows finish, it gets
  their slots, and its adapter's queued requests join it. So a rare adapter waits at most `max_bypass_steps` steps
  plus the rest of the closed adapters' running generations, however popular the others are; slots change hands
  for a starving request only, never on every step (no thrash). `rotations` counts the starving requests.

`max_num_batched_tokens` is the token budget of one step, shared by decode rows (one token each, served first) and
prefill chunks (vLLM's chunked prefill): a long prompt is prefilled over several steps while the running streams
keep producing a token every step.
"""

from __future__ import annotations

import enum
from collections import Counter
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
        self.rotations = 0  # starving requests for which running adapters were closed to new requests
        self._starving: Schedulable | None = None  # last step's

    def admit(self, waiting: Iterable[Schedulable], running: Iterable[Schedulable],
              take: Callable[[Schedulable], Take]) -> None:
        """Offer the waiting requests (in queue order) to `take`; updates their `bypassed_steps`."""
        running = list(running)
        free = self.limits.max_num_seqs - len(running)
        adapters = set().union(*(s.adapter_keys for s in running))
        starving: Schedulable | None = None
        closed: frozenset = frozenset()
        for seq in list(waiting):
            if free <= 0:
                break
            if starving is not None and (seq.adapter_keys & closed or not seq.adapter_keys <= adapters):
                continue  # the slots it would take or keep busy are the starving request's next
            wanted = adapters | seq.adapter_keys
            if not self._fits(wanted):
                seq.bypassed_steps += 1
                if starving is None and seq.bypassed_steps > self.limits.max_bypass_steps:
                    starving, drain = seq, self._to_close(seq, running, adapters)
                    if drain is None:
                        break  # no choice of running adapters frees enough slots: hold the whole queue
                    closed = drain
                    if seq is not self._starving:
                        self.rotations += 1
                continue
            verdict = take(seq)
            if verdict is Take.STOP:
                break
            if verdict is Take.ADMITTED:
                adapters, free = wanted, free - 1
        self._starving = starving

    def _to_close(self, seq: Schedulable, running: list[Schedulable], adapters: set) -> frozenset | None:
        """The running adapters to drain for `seq`: those with the fewest rows (they free their slots soonest), as
        few as make its adapters fit; None when even closing all of them would not."""
        rows = Counter(key for s in running for key in s.adapter_keys)
        keep, closed = set(adapters), set()
        for key in sorted(adapters - seq.adapter_keys, key=lambda k: (rows[k], str(k))):
            if self._fits(keep | seq.adapter_keys):
                break
            keep.discard(key)
            closed.add(key)
        return frozenset(closed) if self._fits(keep | seq.adapter_keys) else None
