"""The slot KV cache and the fixed-shape decode step, in-process over the real SmolLM2 (no server).

Sequences that join and leave a running batch get exactly the tokens plain transformers `generate` gives each of
them alone; the cache buffers never move; the static (CUDA-graph form) decode step equals the eager one; a budget
that holds fewer sequences than max_num_seqs makes the rest wait; bad settings fail the load with a clear message.
"""

from __future__ import annotations

import logging

import pytest
import torch

from backends.llm.chat import apply_chat_template
from backends.llm.engine import LLMEngine
from backends.llm.kv_cache import KVShape, plan_num_slots
from backends.llm.runner import ModelRunner, RunnerSettings, resolve_dtype
from backends.lora.adapters.peft import load_adapter
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.ops.batch import LoRABatch, RowLoRA
from backends.settings import adapters_dir, default_llm_model_path
from tools.clients.engine import Collect, request_for

QUESTIONS = ["What is the capital of France?", "Say hi.", "Count to five.", "Name a colour.", "What is 2+2?"]
STEPS = 10


@pytest.fixture(scope="module")
def runner():
    runner = ModelRunner(default_llm_model_path(), lora=LoRAServingConfig(max_loras=2, max_lora_rank=16),
                         settings=RunnerSettings(max_model_len=256, max_num_seqs=4))
    runner.lora.load_slot(0, load_adapter(adapters_dir() / "demo" / "uppercase", runner.lora.spec, 16))
    return runner


def _prompt(runner, i):
    return runner.encode(apply_chat_template(QUESTIONS[i]))


def _reference(runner, prompt, steps=STEPS):
    """Greedy tokens of plain transformers generate (base model: the LoRA context has no batch set)."""
    out = runner.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                pad_token_id=runner.pad_token_id)
    return out[0, len(prompt):].tolist()


class _Live:
    def __init__(self, runner, i):
        self.prompt = _prompt(runner, i)
        self.slot = runner.kv.allocate()
        self.tokens: list[int] = []
        self.cached = len(self.prompt)


def _decode(runner, live, lora=None):
    lora = lora or [RowLoRA()] * len(live)
    logits = runner.decode([s.slot for s in live], [s.tokens[-1] for s in live], [s.cached for s in live], lora)
    for seq, token in zip(live, logits.argmax(-1).tolist()):
        seq.tokens.append(token)
        seq.cached += 1


def _prefill(runner, new):
    logits = runner.prefill([s.prompt for s in new], [s.slot for s in new], [RowLoRA()] * len(new))
    for seq, token in zip(new, logits.argmax(-1).tolist()):
        seq.tokens.append(token)


def test_sequences_joining_and_leaving_get_the_tokens_generate_gives_each_alone(runner):
    """Joins while others decode, a leave that opens a hole in the slot prefix, a join that fills it: the buffers
    never move and every sequence equals its own `generate` run."""
    pointers = [b.data_ptr() for b in runner.kv.keys + runner.kv.values]
    a, b = _Live(runner, 0), _Live(runner, 1)
    _prefill(runner, [a, b])
    for _ in range(3):
        _decode(runner, [a, b])
    c = _Live(runner, 2)
    _prefill(runner, [c])  # joins a running batch of two
    _decode(runner, [a, b, c])
    runner.kv.free(a.slot)  # slot 0 leaves: rows 1 and 2 keep decoding over a dummy row 0
    done_a = a.tokens
    for _ in range(2):
        _decode(runner, [b, c])
    d = _Live(runner, 3)
    assert d.slot == a.slot  # the lowest free slot: the hole is refilled
    _prefill(runner, [d])
    while min(len(s.tokens) for s in (b, c, d)) < STEPS:
        live = [s for s in (b, c, d) if len(s.tokens) < STEPS]
        _decode(runner, live)
    for seq in (b, c, d):
        runner.kv.free(seq.slot)
    assert [x.data_ptr() for x in runner.kv.keys + runner.kv.values] == pointers
    for i, tokens in [(0, done_a), (1, b.tokens), (2, c.tokens), (3, d.tokens)]:
        want = _reference(runner, _prompt(runner, i), len(tokens))
        assert tokens == want, f"{QUESTIONS[i]!r}: {runner.tokenizer.decode(tokens)!r} != {runner.tokenizer.decode(want)!r}"


def test_static_decode_step_equals_the_eager_one_with_mixed_adapters(runner):
    """The graphed form (every tensor at max_model_len width, LoRA from fixed per-row buffers, padding rows) gives
    the eager step's logits: what a CUDA graph replays is the same computation."""
    seqs = [_Live(runner, i) for i in range(3)]
    try:
        _prefill(runner, seqs)
        lora = [RowLoRA.one(0, 1.0), RowLoRA(), RowLoRA.one(0, 0.5)]
        slots = [s.slot for s in seqs]
        eager = runner.decode(slots, [s.tokens[-1] for s in seqs], [s.cached for s in seqs], lora)
        rows = runner.lora.ops.fixed_batch(4)  # bucket 4 > 3 rows: one padding row
        rows.write(LoRABatch.from_rows(lora))
        inputs = {"input_ids": torch.tensor([s.tokens[-1] for s in seqs] + [0]).view(-1, 1),
                  "position_ids": torch.tensor([s.cached for s in seqs] + [0]).view(-1, 1)}
        with torch.inference_mode(), runner.lora.use(rows):
            static = runner._decode_forward(inputs, runner.max_model_len)
        torch.testing.assert_close(static[:3], eager, atol=2e-4, rtol=1e-4)
        assert static[:3].argmax(-1).tolist() == eager.argmax(-1).tolist()
    finally:
        for s in seqs:
            runner.kv.free(s.slot)


def test_requests_beyond_the_kv_budget_wait_and_all_finish(runner):
    shape = runner.kv.shape
    settings = RunnerSettings(max_model_len=128, max_num_seqs=8, kv_cache_memory_bytes=2 * 128 * shape.bytes_per_token)
    small = ModelRunner(default_llm_model_path(), lora=None, settings=settings)
    assert small.kv.num_slots == 2
    seen = []

    class Observer:
        def on_finished(self, *a): ...
        def on_tokens(self, n): ...
        def on_lora(self, *a): ...
        def on_queue(self, waiting, running, usage):
            seen.append((waiting, running, usage))

    engine = LLMEngine(lambda e: (small, None), observer=Observer())
    try:
        sinks = [Collect() for _ in range(5)]
        for i, sink in enumerate(sinks):
            engine.submit(request_for(engine, apply_chat_template(QUESTIONS[i]), max_tokens=6), sink)
        for sink in sinks:
            assert sink.wait().error is None and sink.chunks[-1].num_output_tokens >= 1
    finally:
        engine.shutdown()
    assert max(r for _, r, _ in seen) == 2 and max(w for w, _, _ in seen) >= 1
    assert max(u for *_, u in seen) == 1.0 and seen[-1][1:] == (0, 0.0)
    assert small.kv.num_free == 2


def test_forced_capture_failure_serves_eagerly_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="backends.llm.runner"):
        runner = ModelRunner(default_llm_model_path(), lora=None,
                             settings=RunnerSettings(max_model_len=64, max_num_seqs=1, cuda_graphs=True))
    assert runner.graphs is None
    assert any("CUDA-graph capture failed" in r.message and "runs eagerly" in r.message for r in caplog.records)
    seq = _Live(runner, 1)
    _prefill(runner, [seq])
    _decode(runner, [seq])
    assert seq.tokens == _reference(runner, seq.prompt, 2)


def test_a_budget_too_small_for_one_sequence_fails_the_load_saying_what_it_needs():
    with pytest.raises(ValueError, match=r"budget of 1\.0 MiB cannot hold one sequence of max_model_len=2048 "
                                         r"tokens: that needs 90\.0 MiB \(46080 bytes per token\)"):
        ModelRunner(default_llm_model_path(), lora=None,
                    settings=RunnerSettings(max_model_len=2048, kv_cache_memory_bytes=1 << 20))


def test_plan_num_slots_is_capped_by_max_num_seqs_and_the_budget():
    shape = KVShape(num_layers=2, kv_heads=1, head_dim=4, dtype=torch.float32)  # 64 bytes per token
    assert shape.bytes_per_token == 64
    assert plan_num_slots(shape, max_model_len=10, max_num_seqs=4, budget_bytes=10_000) == 4
    assert plan_num_slots(shape, max_model_len=10, max_num_seqs=4, budget_bytes=1_919) == 2


@pytest.mark.parametrize("settings,message", [
    (RunnerSettings(dtype="float8"), r"dtype 'float8' is not one of auto, float32, bfloat16, float16"),
    (RunnerSettings(dtype="float16"), r"float16 is not supported on CPU"),
    (RunnerSettings(max_model_len=100_000), r"max_model_len 100000 must be in 1\.\.8192"),
])
def test_bad_settings_fail_the_load_clearly(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelRunner(default_llm_model_path(), lora=None, settings=settings)


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_is_accepted():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.parametrize("params,message", [
    ({"kv_cache_memory_bytes": "lots"}, "'kv_cache_memory_bytes' must be an integer, got 'lots'"),
    ({"kv_cache_memory_bytes": "-5"}, "'kv_cache_memory_bytes' must be positive"),
    ({"gpu_memory_utilization": "1.5"}, r"'gpu_memory_utilization' must be in \(0, 1\]"),
    ({"enforce_eager": "maybe"}, "'enforce_eager' must be true or false"),
    ({"max_num_seqs": "0"}, "'max_num_seqs' must be >= 1"),
])
def test_bad_model_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        RunnerSettings.from_parameters(params)


def test_dummy_row_and_gathered_decode_agree_around_a_hole(runner):
    """A free slot inside the prefix: the in-place form runs it as a dummy row, the sparse form gathers the live
    slots; both give the live rows the same logits."""
    seqs = [_Live(runner, i) for i in range(3)]
    try:
        _prefill(runner, seqs)
        runner.kv.free(seqs[1].slot)
        live = [seqs[0], seqs[2]]
        tokens, positions = [s.tokens[-1] for s in live], [s.cached for s in live]
        width = max(positions) + 1
        with torch.inference_mode():
            gathered = runner._decode_forward(runner._decode_inputs(tokens, positions), width, [RowLoRA.one(0, 1.0)] * 2,
                                              torch.tensor([s.slot for s in live]))
            in_place = runner._decode_forward(
                runner._decode_inputs([tokens[0], runner.pad_token_id, tokens[1]], [positions[0], 0, positions[1]]),
                width, [RowLoRA.one(0, 1.0), RowLoRA(), RowLoRA.one(0, 1.0)])
        torch.testing.assert_close(in_place[[0, 2]], gathered, atol=2e-4, rtol=1e-4)
    finally:
        for s in (seqs[0], seqs[2]):
            runner.kv.free(s.slot)


@pytest.mark.parametrize("scrub", [False, True])
def test_a_failed_sequences_slot_is_scrubbed_for_its_next_owner(runner, scrub):
    """A sequence that failed with non-finite values may leave NaN in its slot. The next owner, decoding beside a
    longer sequence, reads its slot's masked columns too, and 0 x NaN is NaN: the engine scrubs a failed sequence's
    slot on release (scrub=False shows what happens otherwise)."""
    failed = _Live(runner, 0)
    for buf in runner.kv.keys + runner.kv.values:
        buf[failed.slot, :, :128] = float("nan")
    runner.kv.free(failed.slot, scrub=scrub)
    short = _Live(runner, 1)
    assert short.slot == failed.slot
    long = _Live(runner, 0)
    long.prompt = long.prompt * 3
    long.cached = len(long.prompt)
    try:
        _prefill(runner, [short, long])
        logits = runner.decode([short.slot, long.slot], [short.tokens[-1], long.tokens[-1]],
                               [short.cached, long.cached], [RowLoRA()] * 2)
        assert bool(torch.isfinite(logits[0]).all()) == scrub
        if scrub:
            assert logits[0].argmax().item() == _reference(runner, short.prompt, 2)[1]
    finally:
        for s in (short, long):
            runner.kv.free(s.slot, scrub=True)
