"""Driving `ModelRunner.step` by hand, without the engine: a fixed batch of sequences prefilled once, then decoded
one token each (GPU check timings, the replica profile, exactness tests on the GPU path)."""

from __future__ import annotations

from typing import Sequence

import torch

from backends.llm.runner import ModelRunner, StepRow
from backends.lora.ops.batch import RowLoRA


class HandBatch:
    """n sequences with their own blocks: `prefill` their prompts in one step, then `decode` a token each."""

    def __init__(self, runner: ModelRunner, prompts: Sequence[Sequence[int]]):
        self.runner = runner
        self.prompts = [list(p) for p in prompts]
        kv = runner.kv
        self.blocks = [kv.pool.allocate(kv.blocks_for(runner.max_model_len)) for _ in self.prompts]
        self.positions = [len(p) for p in self.prompts]

    def prefill(self, rows_lora: Sequence[RowLoRA]) -> torch.Tensor:
        """Last-position logits [n, vocab]; may run again (it rewrites the same blocks)."""
        rows = [StepRow(p, 0, b, lora) for p, b, lora in zip(self.prompts, self.blocks, rows_lora)]
        self.positions = [len(p) for p in self.prompts]
        return torch.stack(self.runner.step(rows))

    def decode(self, tokens: Sequence[int], rows_lora: Sequence[RowLoRA], advance: bool = True) -> torch.Tensor:
        """One token per sequence at its next position; `advance=False` keeps the positions (repeated timing)."""
        rows = [StepRow([t], pos, b, lora) for t, pos, b, lora in zip(tokens, self.positions, self.blocks, rows_lora)]
        logits = torch.stack(self.runner.step(rows))
        if advance:
            self.positions = [p + 1 for p in self.positions]
        return logits

    def free(self) -> None:
        for table in self.blocks:
            self.runner.kv.pool.release(table, keep_cached=False)
        self.blocks = []
