"""Admission policy: FCFS within max_num_seqs, the prefill token budget and the LoRA slots; bounded bypassing."""

from __future__ import annotations

from dataclasses import dataclass

from backends.llm.scheduler import Scheduler, SchedulerLimits


@dataclass(eq=False)
class Req:
    adapter: str | tuple[str, ...] | None  # a tuple: a LoRA stack
    num_prompt_tokens: int = 10
    bypassed_steps: int = 0

    @property
    def adapter_keys(self) -> frozenset:
        return frozenset((self.adapter,) if isinstance(self.adapter, str) else self.adapter or ())


def slots(n: int):
    return lambda adapters: len(adapters) <= n


def test_fcfs_up_to_max_num_seqs_and_token_budget():
    sched = Scheduler(SchedulerLimits(max_num_seqs=3, max_num_batched_tokens=1000), slots(8))
    waiting = [Req(None) for _ in range(5)]
    assert sched.admit(waiting, running=[Req(None)]) == waiting[:2]
    budget = Scheduler(SchedulerLimits(max_num_seqs=8, max_num_batched_tokens=100), slots(8))
    # Padded tokens count: 3 prompts of width 40 = 120 > 100, so only two go.
    chosen = budget.admit([Req(None, 40), Req(None, 5), Req(None, 5)], running=[])
    assert len(chosen) == 2


def test_a_prompt_longer_than_the_budget_still_runs_alone():
    sched = Scheduler(SchedulerLimits(max_num_batched_tokens=100), slots(8))
    long, short = Req(None, 500), Req(None, 5)
    assert sched.admit([long, short], running=[]) == [long]


def test_adapters_beyond_the_slots_wait_while_others_pass_then_block_the_queue():
    sched = Scheduler(SchedulerLimits(max_num_seqs=16, max_bypass_steps=3), slots(2))
    running = [Req("a"), Req("b")]
    blocked = Req("c")
    later = [Req("a"), Req(None)]
    for step in range(3):  # bypassed: requests for resident adapters and base requests still go
        assert sched.admit([blocked, *later], running) == later
        assert blocked.bypassed_steps == step + 1
    # After max_bypass_steps nothing behind it is admitted: the running adapters drain.
    assert sched.admit([blocked, *later], running) == []
    running = [Req("a")]  # "b" finished; "c" fits next to "a"
    assert sched.admit([blocked, *later], running) == [blocked, *later]


def test_base_requests_never_need_a_slot():
    sched = Scheduler(SchedulerLimits(), slots(0))
    waiting = [Req(None), Req("x"), Req(None)]
    assert sched.admit(waiting, running=[]) == [waiting[0], waiting[2]]


def test_a_lora_stack_counts_each_of_its_adapters_against_the_slots():
    sched = Scheduler(SchedulerLimits(max_num_seqs=16), slots(3))
    running = [Req("a")]
    too_wide, sharing, single = Req(("b", "c", "d")), Req(("a", "b")), Req("c")
    assert sched.admit([too_wide, sharing, single], running) == [sharing, single]
    assert too_wide.bypassed_steps == 1
