"""Failure isolation in the continuous-batching engine, in-process over the real SmolLM2 (no server): a step that
fails while it holds a prefill fails only the prefilling requests (the decode rows rerun), a dead engine thread
fails what it holds and refuses new work at once, and a request that cannot be admitted neither spins the loop nor
outlives its client."""

from __future__ import annotations

import time

import psutil
import pytest

from backends.errors import InternalError, Unavailable
from backends.llm.chat import apply_chat_template
from backends.llm.engine import LLMEngine
from backends.llm.runner import ModelRunner, RunnerSettings
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.manager.request import AdapterRef, LoRASelection
from backends.lora.manager.selector import AdapterSelector
from backends.lora.store.entries import AdapterEntry
from backends.settings import adapters_dir, default_llm_model_path
from tools.clients.engine import Collect
from tools.clients.engine import request_for as _request

STORY = apply_chat_template("Tell me a long story about a dragon.")


class Dies(BaseException):
    """Not an Exception: escapes the per-step handling, as a bug in the loop itself would."""


class Observer:
    def __init__(self) -> None:
        self.die = False

    def on_finished(self, *args) -> None: ...

    def on_tokens(self, count: int) -> None:
        if self.die:
            raise Dies("injected fault")

    def on_queue(self, *args) -> None: ...

    def on_prefix_cache(self, *args) -> None: ...

    def on_preemption(self) -> None: ...

    def on_lora(self, *args) -> None: ...


@pytest.fixture(scope="module")
def runner():
    return ModelRunner(default_llm_model_path(), lora=LoRAServingConfig(max_loras=1, max_lora_rank=16),
                       settings=RunnerSettings(max_model_len=1024, max_num_seqs=8))


def _engine(runner, observer=None, pinned: bool = False) -> LLMEngine:
    config = LoRAServingConfig(max_loras=1, max_cpu_loras=2, registry_file=None, static=(
        AdapterEntry("uppercase", str(adapters_dir() / "demo" / "uppercase"), pinned=True, source="static"),
    ) if pinned else ())

    def setup(engine):
        return runner, AdapterSelector.build(runner.lora, config).cache

    return LLMEngine(setup, observer=observer)


def test_failed_prefill_fails_only_the_new_requests(runner):
    engine = _engine(runner)
    try:
        running = Collect()
        engine.submit(_request(engine, STORY, max_tokens=24, stream=True), running)
        assert running.first.wait(60)
        real = runner.step

        def faulty(rows):  # a step that holds a prefill (a row of several tokens) fails
            if any(len(row.tokens) > 1 for row in rows):
                raise RuntimeError("injected prefill fault")
            return real(rows)

        runner.step = faulty
        try:
            broken = Collect()
            engine.submit(_request(engine, "Hello there, how are you?"), broken)
            broken.wait()
        finally:
            runner.step = real
        assert isinstance(broken.error, InternalError) and "prefill failed" in str(broken.error)
        running.wait()
        assert running.error is None and running.chunks[-1].finish_reason == "length"
        after = Collect()
        engine.submit(_request(engine, "Hello"), after)
        assert after.wait().error is None and after.chunks[-1].num_output_tokens >= 1
        assert running.after_final == broken.after_final == 0
    finally:
        engine.shutdown()


def test_dead_engine_fails_what_it_holds_and_refuses_new_work_at_once(runner):
    observer = Observer()
    dead: list[BaseException] = []
    engine = _engine(runner, observer)
    engine._on_dead = dead.append
    running = Collect()
    engine.submit(_request(engine, STORY, max_tokens=64, stream=True), running)
    assert running.first.wait(60)
    observer.die = True
    running.wait(30)
    assert isinstance(running.error, Unavailable) and "engine stopped" in str(running.error)
    assert dead and isinstance(dead[0], Dies) and not engine.alive
    started = time.monotonic()
    with pytest.raises(Unavailable, match="engine stopped"):
        engine.submit(_request(engine, "Hello"), Collect())
    with pytest.raises(Unavailable):
        engine.call(lambda: 1)
    assert time.monotonic() - started < 1
    engine.shutdown()


def test_a_request_that_cannot_be_admitted_does_not_spin_and_ends_when_cancelled(runner):
    engine = _engine(runner, pinned=True)  # the only slot holds the pinned adapter
    try:
        path = str(adapters_dir() / "demo" / "signature")
        stuck = Collect()
        engine.submit(_request(engine, "Hello", lora=(LoRASelection(AdapterRef(99, "signature", path), 1.0),)), stuck)
        base = Collect()
        engine.submit(_request(engine, "Hello"), base)
        assert base.wait().error is None  # requests behind it that fit are served
        thread = next(t for t in psutil.Process().threads() if t.id == engine._thread.native_id)
        time.sleep(1.0)
        spent = next(t for t in psutil.Process().threads() if t.id == engine._thread.native_id)
        assert (spent.user_time + spent.system_time) - (thread.user_time + thread.system_time) < 0.3
        assert not stuck.finished.is_set()
        stuck.cancelled = True
        stuck.wait(5)
        assert stuck.chunks[-1].finish_reason == "abort"
    finally:
        engine.shutdown()
