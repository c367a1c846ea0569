"""Admission policy: FCFS within max_num_seqs and the LoRA slots, the engine's take verdicts (tokens, blocks);
bounded bypassing."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from backends.llm.scheduler import Scheduler, SchedulerLimits, Take


@dataclass(eq=False)
class Req:
    adapter: str | tuple[str, ...] | None  # a tuple: a LoRA stack
    bypassed_steps: int = 0

    @property
    def adapter_keys(self) -> frozenset:
        return frozenset((self.adapter,) if isinstance(self.adapter, str) else self.adapter or ())


def slots(n: int):
    return lambda adapters: len(adapters) <= n


def admit(sched: Scheduler, waiting, running, verdicts=None) -> list:
    """What `admit` hands to a take that admits everything (or answers `verdicts[request]`)."""
    taken = []

    def take(seq):
        verdict = (verdicts or {}).get(id(seq), Take.ADMITTED)
        if verdict is Take.ADMITTED:
            taken.append(seq)
        return verdict

    sched.admit(waiting, running, take)
    return taken


def test_fcfs_up_to_max_num_seqs():
    sched = Scheduler(SchedulerLimits(max_num_seqs=3), slots(8))
    waiting = [Req(None) for _ in range(5)]
    assert admit(sched, waiting, running=[Req(None)]) == waiting[:2]


def test_a_request_that_does_not_fit_stops_the_admission_and_a_skipped_one_lets_others_pass():
    sched = Scheduler(SchedulerLimits(max_num_seqs=8), slots(8))
    a, b, c = Req(None), Req(None), Req(None)
    assert admit(sched, [a, b, c], [], {id(b): Take.STOP}) == [a]  # FCFS: c does not pass b
    assert admit(sched, [a, b, c], [], {id(b): Take.SKIPPED}) == [a, c]


def test_the_token_budget_must_cover_one_token_per_running_sequence():
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be at least max_num_seqs \(16\)"):
        SchedulerLimits(max_num_seqs=16, max_num_batched_tokens=8)


def test_adapters_beyond_the_slots_wait_while_others_pass_then_block_the_queue():
    sched = Scheduler(SchedulerLimits(max_num_seqs=16, max_bypass_steps=3), slots(2))
    running = [Req("a"), Req("b")]
    blocked = Req("c")
    later = [Req("a"), Req(None)]
    for step in range(3):  # bypassed: requests for resident adapters and base requests still go
        assert admit(sched, [blocked, *later], running) == later
        assert blocked.bypassed_steps == step + 1
    # After max_bypass_steps nothing behind it is admitted: the running adapters drain.
    assert admit(sched, [blocked, *later], running) == []
    running = [Req("a")]  # "b" finished; "c" fits next to "a"
    assert admit(sched, [blocked, *later], running) == [blocked, *later]


def test_base_requests_never_need_a_slot():
    sched = Scheduler(SchedulerLimits(), slots(0))
    waiting = [Req(None), Req("x"), Req(None)]
    assert admit(sched, waiting, running=[]) == [waiting[0], waiting[2]]


def test_a_lora_stack_counts_each_of_its_adapters_against_the_slots():
    sched = Scheduler(SchedulerLimits(max_num_seqs=16), slots(3))
    running = [Req("a")]
    too_wide, sharing, single = Req(("b", "c", "d")), Req(("a", "b")), Req("c")
    assert admit(sched, [too_wide, sharing, single], running) == [sharing, single]
    assert too_wide.bypassed_steps == 1
