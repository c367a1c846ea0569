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


def test_a_starving_adapter_closes_the_emptiest_running_adapter_while_base_and_other_adapters_keep_going():
    sched = Scheduler(SchedulerLimits(max_num_seqs=16, max_bypass_steps=3), slots(2))
    running = [Req("a"), Req("b"), Req("b")]
    blocked = Req("c")
    later = [Req("a"), Req("b"), Req(None), Req("d")]
    for step in range(3):  # bypassed: requests for resident adapters and base requests still go
        assert admit(sched, [blocked, *later], running) == later[:3]
        assert blocked.bypassed_steps == step + 1
    assert sched.rotations == 0
    # Past max_bypass_steps "a" (one row, fewer than "b"'s two) takes no new requests; "b" and base ones still go,
    # and nobody ("d") takes a new slot.
    assert admit(sched, [blocked, *later], running) == later[1:3]
    assert admit(sched, [blocked, *later], running) == later[1:3]
    assert sched.rotations == 1  # one starving request, however many steps it waits
    running = [Req("b"), Req("b")]  # "a" drained: "c" gets its slot
    assert admit(sched, [blocked, *later], running) == [blocked, later[1], later[2]]


def test_a_rare_adapter_is_served_within_a_bounded_number_of_steps_however_popular_the_others_are():
    """A step-by-step run: two popular adapters always have queued requests (each runs 4 steps), one rare adapter
    asks once; two slots. The rare request is admitted within max_bypass_steps + one generation of the closed
    adapter, and the popular adapters keep being served meanwhile."""
    bound, length = 3, 4
    sched = Scheduler(SchedulerLimits(max_num_seqs=32, max_bypass_steps=bound), slots(2))
    running: dict[int, tuple[Req, int]] = {}  # id -> (request, steps left)
    waiting = [Req("a"), Req("b")]
    rare, rare_step, served = Req("rare"), None, []
    for step in range(40):
        waiting += [Req("a"), Req("b"), Req("a")]  # popular traffic keeps coming
        if step == 2:
            waiting.insert(0, rare)  # the oldest waiting request from now on
        taken = admit(sched, waiting, [r for r, _ in running.values()])
        for r in taken:
            waiting.remove(r)
            running[id(r)] = (r, length)
            served.append(r.adapter)
            if r is rare:
                rare_step = step
        running = {k: (r, left - 1) for k, (r, left) in running.items() if left > 1}
    assert rare_step is not None and rare_step - 2 <= bound + length
    assert sched.rotations >= 1  # the rare request's; then the closed adapter's own waiters may starve a turn
    assert served.count("a") > 20 and served.count("b") > 20


def test_a_starving_stack_closes_as_many_adapters_as_it_needs():
    sched = Scheduler(SchedulerLimits(max_num_seqs=16, max_bypass_steps=0), slots(3))
    running = [Req("a"), Req("b"), Req("b"), Req("c"), Req("c"), Req("c")]
    stack = Req(("x", "y"))
    later = [Req("a"), Req("b"), Req("c")]
    assert admit(sched, [stack, *later], running) == [later[2]]  # "a" and "b" drain, "c" (3 rows) keeps going


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
