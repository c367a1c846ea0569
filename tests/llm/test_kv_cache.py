"""The paged KV cache, chunked prefill and the fixed-shape decode step, in-process over the real SmolLM2 (no server).

Sequences that join and leave a running batch, prefilled in chunks beside decode rows, get exactly the tokens plain
transformers `generate` gives each of them alone; the pools never move; the fixed-shape (CUDA-graph form) step
equals the eager one and its padding rows touch neither the null block nor anyone's blocks; bad settings fail the
load with a clear message.
"""

from __future__ import annotations

import logging

import pytest
import torch

from backends.llm.chat import apply_chat_template
from backends.llm.kv_cache import KVShape, plan_num_blocks
from backends.llm.runner import ModelRunner, RunnerSettings, StepRow, cpu_has_bf16, resolve_dtype
from backends.lora.adapters.peft import load_adapter
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.ops.batch import LoRABatch, RowLoRA
from backends.settings import adapters_dir, default_llm_model_path

QUESTIONS = ["What is the capital of France?", "Say hi.", "Count to five.", "Name a colour.", "What is 2+2?"]
STEPS = 10


@pytest.fixture(scope="module")
def runner():
    runner = ModelRunner(default_llm_model_path(), lora=LoRAServingConfig(max_loras=2, max_lora_rank=16),
                         settings=RunnerSettings(dtype="float32", max_model_len=256, max_num_seqs=4))
    runner.lora.load_slot(0, load_adapter(adapters_dir() / "demo" / "uppercase", runner.lora.spec, 16))
    return runner


def _prompt(runner, i):
    return runner.encode(apply_chat_template(QUESTIONS[i]))


def _reference(runner, prompt, steps=STEPS):
    """Greedy tokens of plain transformers generate (base model: the LoRA context has no batch set)."""
    with runner.stock_attention() as model:
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             pad_token_id=runner.pad_token_id)
    return out[0, len(prompt):].tolist()


class _Live:
    """A sequence driven by hand: its tokens, how many are computed, its blocks."""

    def __init__(self, runner, i, lora=RowLoRA()):
        self.runner, self.ids, self.lora = runner, list(_prompt(runner, i)), lora
        self.prompt_len, self.computed, self.blocks = len(self.ids), 0, []

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len:]

    def row(self, budget: int) -> StepRow:
        n = min(len(self.ids) - self.computed, budget)
        kv = self.runner.kv
        self.blocks += kv.pool.allocate(kv.blocks_for(self.computed + n) - len(self.blocks))
        last = self.computed + n == len(self.ids)
        return StepRow(self.ids[self.computed:self.computed + n], self.computed, list(self.blocks), self.lora,
                       "last" if last else "none")

    def take(self, row: StepRow, logits) -> None:
        self.computed += len(row.tokens)
        if logits is not None:
            self.ids.append(int(logits.argmax()))

    def free(self):
        self.runner.kv.pool.release(self.blocks, keep_cached=False)
        self.blocks = []


def _step(runner, seqs, budget=1 << 30):
    rows = [s.row(budget) for s in seqs]
    for seq, row, logits in zip(seqs, rows, runner.step(rows)):
        seq.take(row, logits)


def test_chunked_sequences_joining_and_leaving_get_the_tokens_generate_gives_each_alone(runner):
    """a and b prefill in chunks of 7 tokens beside each other; c joins while they decode; a leaves early; d joins
    into its freed blocks. Nobody's tokens change."""
    pointers = [b.data_ptr() for b in runner.kv.keys + runner.kv.values]
    a, b = _Live(runner, 0), _Live(runner, 1)
    while len(a.generated) < 3:
        _step(runner, [a, b], budget=7)
    c = _Live(runner, 2)
    for _ in range(4):
        _step(runner, [a, b, c], budget=7)
    done_a = a.generated
    a.free()
    d = _Live(runner, 3)
    while len(d.generated) < 6:
        _step(runner, [b, c, d])
    assert [x.data_ptr() for x in runner.kv.keys + runner.kv.values] == pointers
    for i, tokens in [(0, done_a), (1, b.generated), (2, c.generated), (3, d.generated)]:
        want = _reference(runner, _prompt(runner, i), len(tokens))
        decode = runner.tokenizer.decode
        assert tokens == want, f"{QUESTIONS[i]!r}: {decode(tokens)!r} != {decode(want)!r}"
    for s in (b, c, d):
        s.free()
    assert runner.kv.pool.num_used == 0


def test_fixed_shape_step_equals_the_eager_one_and_its_padding_rows_write_nowhere(runner):
    """The graphed form (every row gathers max_model_len pool rows, LoRA from fixed per-row buffers, one padding
    row writing to the trash block) gives the eager step's logits: what a CUDA graph replays is the same
    computation. The null block stays zero."""
    seqs = [_Live(runner, i, lora) for i, lora in enumerate([RowLoRA.one(0, 1.0), RowLoRA(), RowLoRA.one(0, 0.5)])]
    try:
        _step(runner, seqs)
        rows = [s.row(1) for s in seqs]
        eager = torch.stack(runner.step(rows))
        fixed = runner.lora.ops.fixed_batch(4)  # bucket 4 > 3 rows: one padding row
        fixed.write(LoRABatch.from_rows([s.lora for s in seqs]))
        bs = runner.kv.block_size
        pad = runner.kv.trash_row
        tables = torch.zeros(4, runner._graph_tables, dtype=torch.long)
        for i, r in enumerate(rows):
            tables[i, :len(r.blocks)] = torch.tensor(r.blocks)
        inputs = {"input_ids": torch.tensor([r.tokens[0] for r in rows] + [runner.pad_token_id]),
                  "position_ids": torch.tensor([r.start for r in rows] + [0]),
                  "write_idx": torch.tensor([r.blocks[r.start // bs] * bs + r.start % bs for r in rows] + [pad]),
                  "tables": tables}
        with torch.inference_mode(), runner.lora.use(fixed):
            static = runner._graph_forward(inputs)
        torch.testing.assert_close(static[:3], eager, atol=2e-4, rtol=1e-4)
        assert static[:3].argmax(-1).tolist() == eager.argmax(-1).tolist()
        assert all(bool((pool[:bs] == 0).all()) for pool in runner.kv.keys + runner.kv.values), "null block written"
    finally:
        for s in seqs:
            s.free()


def test_forced_capture_failure_serves_eagerly_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="backends.llm.runner"):
        runner = ModelRunner(default_llm_model_path(), lora=None,
                             settings=RunnerSettings(dtype="float32", max_model_len=64, max_num_seqs=1,
                                                     cuda_graphs=True))
    assert runner.graphs is None
    assert any("CUDA-graph capture failed" in r.message and "runs eagerly" in r.message for r in caplog.records)
    seq = _Live(runner, 1)
    _step(runner, [seq])
    _step(runner, [seq])
    assert seq.generated == _reference(runner, seq.ids[:seq.prompt_len], 2)


def test_a_budget_smaller_than_one_block_fails_the_load_saying_what_it_needs():
    with pytest.raises(ValueError, match=r"budget of 0\.50 MiB cannot hold one block of 16 tokens: that needs "
                                         r"0\.70 MiB \(46080 bytes per token\)"):
        ModelRunner(default_llm_model_path(), lora=None,
                    settings=RunnerSettings(dtype="float32", kv_cache_memory_bytes=1 << 19))


def test_a_budget_below_max_model_len_loads_with_a_warning_and_refuses_what_it_cannot_hold(caplog):
    shape_bytes = 46080  # SmolLM2 float32, per token
    with caplog.at_level(logging.WARNING, logger="backends.llm.runner"):
        small = ModelRunner(default_llm_model_path(), lora=None,
                            settings=RunnerSettings(dtype="float32", max_model_len=512,
                                                    kv_cache_memory_bytes=4 * 16 * shape_bytes))
    assert small.kv.num_blocks == 4 and small.kv.num_tokens == 64
    assert any("holds 64 tokens, fewer than max_model_len=512" in r.message for r in caplog.records)


def test_plan_num_blocks_follows_the_budget():
    shape = KVShape(num_layers=2, kv_heads=1, head_dim=4, dtype=torch.float32)  # 64 bytes per token
    assert shape.bytes_per_token == 64
    assert plan_num_blocks(shape, block_size=16, budget_bytes=10_000) == 9
    assert plan_num_blocks(shape, block_size=16, budget_bytes=1_024) == 1


@pytest.mark.parametrize("settings,message", [
    (RunnerSettings(dtype="float8"), r"dtype 'float8' is not one of auto, float32, bfloat16, float16"),
    (RunnerSettings(dtype="float16"), r"float16 is not supported on CPU"),
    (RunnerSettings(max_model_len=100_000), r"max_model_len 100000 must be in 1\.\.8192"),
])
def test_bad_settings_fail_the_load_clearly(settings, message):
    with pytest.raises(ValueError, match=message):
        ModelRunner(default_llm_model_path(), lora=None, settings=settings)


def test_dtype_auto_on_cpu_is_bfloat16_where_the_cpu_has_it():
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("params,message", [
    ({"kv_cache_memory_bytes": "lots"}, "'kv_cache_memory_bytes' must be an integer, got 'lots'"),
    ({"kv_cache_memory_bytes": "-5"}, "'kv_cache_memory_bytes' must be positive"),
    ({"gpu_memory_utilization": "1.5"}, r"'gpu_memory_utilization' must be in \(0, 1\]"),
    ({"enforce_eager": "maybe"}, "'enforce_eager' must be true or false"),
    ({"max_num_seqs": "0"}, "'max_num_seqs' must be >= 1"),
    ({"block_size": "0"}, r"'block_size' must be in 1\.\.1024"),
    ({"enable_prefix_caching": "sometimes"}, "'enable_prefix_caching' must be true or false"),
])
def test_bad_model_parameters_are_named(params, message):
    with pytest.raises(ValueError, match=message):
        RunnerSettings.from_parameters(params)
