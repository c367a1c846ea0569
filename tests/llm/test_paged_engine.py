"""The engine over the paged KV cache, in-process over the real SmolLM2 (no server): the prefix cache keyed by adapter
content, preemption when blocks run out, far more sequences than max_model_len slots at the same budget, chunked
prefill beside running streams, cancellation mid-chunk, prompts at max_model_len."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from backends.errors import InvalidArgument
from backends.llm.chat import apply_chat_template
from backends.llm.engine import LLMEngine
from backends.llm.params import GenerationRequest, SamplingParams
from backends.llm.runner import ModelRunner, RunnerSettings
from backends.llm.scheduler import SchedulerLimits
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.manager.request import LoRAFields
from backends.lora.manager.selector import AdapterSelector
from backends.settings import adapters_dir, default_llm_model_path
from tools.clients.engine import Collect, request_for

SYSTEM = ("You are a careful assistant for a library. You answer questions about books, opening hours and loans in "
          "one short sentence, politely, and you never invent titles that the catalogue does not hold.")
BYTES_PER_TOKEN = 46080  # SmolLM2 in float32


def _chat(question: str, system: str = SYSTEM) -> str:
    return apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}])


class Observer:
    def __init__(self, on_queue=None):
        self.lookups: list[tuple[int, int]] = []
        self.preemptions = 0
        self.queue: list[tuple[int, int, float]] = []
        self._on_queue = on_queue

    def on_finished(self, *a): ...

    def on_tokens(self, n): ...

    def on_lora(self, *a): ...

    def on_queue(self, waiting, running, usage):
        self.queue.append((waiting, running, usage))
        if self._on_queue:
            self._on_queue(waiting, running)

    def on_prefix_cache(self, queried, hits):
        self.lookups.append((queried, hits))

    def on_preemption(self):
        self.preemptions += 1


def _runner(**settings) -> ModelRunner:
    return ModelRunner(default_llm_model_path(), lora=LoRAServingConfig(max_loras=2, max_lora_rank=16),
                       settings=RunnerSettings(dtype="float32", **{"max_model_len": 512, "max_num_seqs": 16,
                                                                   **settings}))


@pytest.fixture(scope="module")
def runner():
    return _runner()


def _engine(runner, observer=None, roots=(), **limits) -> tuple[LLMEngine, list]:
    """An engine over `runner`; the second value holds its adapter selector once set up."""
    holder = []
    config = LoRAServingConfig(max_loras=2, max_cpu_loras=4, registry_file=None,
                               allowed_roots=(adapters_dir(), *roots))

    def setup(engine):
        holder.append(AdapterSelector.build(runner.lora, config))
        return runner, holder[0].cache

    return LLMEngine(setup, observer=observer, limits=SchedulerLimits(**{"max_num_seqs": 16, **limits})), holder


def _run(engine, request) -> Collect:
    sink = Collect()
    engine.submit(request, sink)
    sink.wait(120)
    assert sink.error is None, sink.error
    return sink


def _text(sink: Collect) -> str:
    return "".join(c.text for c in sink.chunks)


def test_prefix_cache_is_keyed_by_adapter_content_and_scale_not_by_name(runner, tmp_path):
    """Same tokens + same adapter content share blocks (even under another name; scale 0 = the base); an adapter
    rewritten on disk under the same name never reuses the blocks its old weights computed."""
    ours = tmp_path / "ours"
    shutil.copytree(adapters_dir() / "demo" / "uppercase", ours)
    twin = tmp_path / "twin"  # the same files under another name
    shutil.copytree(ours, twin)
    observer = Observer()
    engine, selector = _engine(runner, observer, roots=(tmp_path,))
    try:
        def ask(lora=None, scale=None, question="When do you open on Sunday?"):
            stack = selector[0].select_stack([LoRAFields(path=str(lora), scale=scale)]) if lora else ()
            sink = _run(engine, request_for(engine, _chat(question), max_tokens=6, lora=stack))
            return _text(sink), observer.lookups[-1][1]

        base_text, first = ask()
        assert first == 0
        again, hits = ask()
        assert hits >= 3 * runner.kv.block_size and again == base_text
        assert ask(ours, scale=0.0)[1] == hits  # scale 0 adds nothing: the base's blocks
        ours_text, hits = ask(ours)
        assert hits == 0  # other weights, other KV
        assert ask(ours)[1] > 0
        shutil.rmtree(ours)  # rewritten in place: the same path and name, other weights
        shutil.copytree(adapters_dir() / "demo" / "signature", ours)
        rewritten_text, hits = ask(ours)
        assert hits == 0, "blocks computed with the adapter's old files were reused"
        fresh, _ = ask(adapters_dir() / "demo" / "signature")
        assert rewritten_text == fresh
        twin_text, hits = ask(twin)  # the old files' content under another name: its blocks are still cached
        assert hits > 0 and twin_text == ours_text
    finally:
        engine.shutdown()


def test_a_request_with_a_partial_hit_publishes_its_own_new_blocks(runner):
    """The shared system prompt hits; the rest of the first request's prompt must then be cached for the second
    (this failed when the blocks already cached were counted in tokens, so nothing more was published)."""
    observer = Observer()
    engine, _ = _engine(runner, observer)
    try:
        _run(engine, request_for(engine, _chat("Warm up the shared system prompt."), max_tokens=1))
        question = _chat("Which books about the history of the printing press can I borrow this week?")
        blocks = (len(runner.encode(question)) - 1) // runner.kv.block_size
        for _ in range(2):
            _run(engine, request_for(engine, question, max_tokens=1))
        first, second = observer.lookups[-2][1], observer.lookups[-1][1]
        assert 0 < first < second == blocks * runner.kv.block_size
    finally:
        engine.shutdown()


def test_block_exhaustion_mid_decode_preempts_and_everyone_finishes_with_their_own_tokens(runner):
    questions = ["Name three rivers.", "Describe the sea at night.", "Why is the sky blue?"]
    engine, _ = _engine(runner)
    try:  # references: each alone, with room to spare
        alone = [_text(_run(engine, request_for(engine, _chat(q, "Be brief."), max_tokens=60, ignore_eos=True)))
                 for q in questions]
    finally:
        engine.shutdown()
    small = _runner(kv_cache_memory_bytes=10 * 16 * BYTES_PER_TOKEN)  # 160 tokens: not 3 x (~35 + 60)
    observer = Observer()
    engine, _ = _engine(small, observer)
    try:
        sinks = [Collect() for _ in questions]
        for q, sink in zip(questions, sinks):
            engine.submit(request_for(engine, _chat(q, "Be brief."), max_tokens=60, ignore_eos=True), sink)
        for sink in sinks:
            assert sink.wait(180).error is None
        deadline = time.monotonic() + 10  # the engine reports the queue after the step that sent the last token
        while observer.queue[-1][:2] != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.shutdown()
    assert observer.preemptions >= 1
    assert [_text(s) for s in sinks] == alone
    assert all(s.chunks[-1].num_output_tokens == 60 and s.chunks[-1].finish_reason == "length" for s in sinks)
    assert small.kv.pool.num_used == 0 and observer.queue[-1][:2] == (0, 0)


def test_many_more_sequences_than_max_model_len_slots_at_the_same_budget():
    """A budget of two max_model_len (512) sequences, the old slot design's limit, runs 8 requests of 128 tokens
    at once: 4x."""
    small = _runner(kv_cache_memory_bytes=2 * 512 * BYTES_PER_TOKEN)
    observer = Observer()
    engine, _ = _engine(small, observer, max_num_batched_tokens=2048)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    try:
        sinks = [Collect() for _ in range(10)]
        for i, sink in enumerate(sinks):  # distinct prompts (no shared blocks) of ~100 tokens
            text = _chat(f"{i}: " + " ".join(words[(i + j) % len(words)] for j in range(60)), "Repeat.")
            request = request_for(engine, text, max_tokens=128 - len(small.encode(text)), ignore_eos=True)
            engine.submit(request, sink)
        for sink in sinks:
            assert sink.wait(180).error is None
    finally:
        engine.shutdown()
    assert max(running for _, running, _ in observer.queue) >= 8


class _Timeline(Collect):
    """Records (who, tokens so far) for every chunk, in the order all sinks received them."""

    def __init__(self, name: str, events: list, lock: threading.Lock):
        super().__init__()
        self.name, self.events, self.lock = name, events, lock

    def send(self, chunk, final):
        with self.lock:
            self.events.append((self.name, chunk.num_output_tokens))
        super().send(chunk, final)


def test_a_long_prompt_prefills_in_chunks_while_a_running_stream_keeps_its_tokens(runner):
    engine, _ = _engine(runner, max_num_batched_tokens=32)
    events, lock = [], threading.Lock()
    try:
        stream = _Timeline("stream", events, lock)
        engine.submit(request_for(engine, _chat("Count slowly from one to fifty."), max_tokens=48, stream=True,
                                  ignore_eos=True), stream)
        assert stream.first.wait(60)
        long_text = _chat(" ".join(["The library opens at nine and closes at five."] * 30), "Summarise.")
        assert len(runner.encode(long_text)) > 300
        joining = _Timeline("long", events, lock)
        with lock:
            mark = len(events)
        engine.submit(request_for(engine, long_text, max_tokens=2, stream=True), joining)
        assert joining.wait(120).error is None and stream.wait(120).error is None
    finally:
        engine.shutdown()
    first_long = next(i for i, (who, _) in enumerate(events) if who == "long")
    during = [e for e in events[mark:first_long] if e[0] == "stream"]
    # ~ 300 / 31 chunk steps, each with one token for the stream
    assert len(during) >= 8, events


def test_cancelling_mid_chunk_frees_its_blocks(runner):
    sink = Collect()
    reports = []

    def cancel_on_second_report(waiting, running):
        reports.append(running)
        if sum(1 for r in reports if r) == 2:
            sink.cancelled = True

    engine, _ = _engine(runner, Observer(cancel_on_second_report), max_num_batched_tokens=32)
    try:
        text = _chat(" ".join(["Shelves hold the books in order of their authors' names."] * 20), "Summarise.")
        engine.submit(request_for(engine, text, max_tokens=4, stream=True), sink)
        sink.wait(60)
        deadline = time.monotonic() + 5
        while runner.kv.pool.num_used and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        engine.shutdown()
    assert sink.chunks[-1].finish_reason == "abort" and sink.chunks[-1].num_output_tokens == 0
    assert runner.kv.pool.num_used == 0


def test_a_prompt_at_max_model_len(runner):
    engine, _ = _engine(runner)
    try:
        ids = runner.encode(" ".join(["word"] * 600))[:runner.max_model_len]

        def request(n_prompt, max_tokens, **extra):
            return engine.prepare(GenerationRequest("t", "", SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                            **extra), prompt_token_ids=ids[:n_prompt]))

        done = _run(engine, request(runner.max_model_len - 1, 1))
        assert done.chunks[-1].num_output_tokens == 1
        scored = _run(engine, request(runner.max_model_len, 0, prompt_logprobs=0))
        assert len(scored.chunks[-1].prompt_logprobs) == runner.max_model_len
        with pytest.raises(InvalidArgument, match=r"maximum context length is 512 tokens\. However, you requested "
                                                  r"513 tokens \(512 in the messages, 1 in the completion\)"):
            request(runner.max_model_len, 1)
    finally:
        engine.shutdown()


def test_a_request_larger_than_the_whole_cache_is_refused_up_front():
    small = _runner(kv_cache_memory_bytes=4 * 16 * BYTES_PER_TOKEN)
    engine, _ = _engine(small, max_num_batched_tokens=64)
    try:
        with pytest.raises(InvalidArgument, match=r"needs \d+ tokens of KV cache .* holds 64"):
            request_for(engine, _chat("Hello"), max_tokens=60)
    finally:
        engine.shutdown()
