"""CUDA-graph capture and replay of the decode step's (LoRA-patched) forward, per batch-size bucket, with and
without adapters.

For every bucket two graphs are captured over the same static inputs: one running a fixed `LoRABatch` (the ops
backend's per-row slot and scale buffers, and the kernels' segment metadata, refreshed inside the graph), and one
where the LoRA layers do nothing, so base-only batches pay nothing for LoRA (vLLM specialises its graphs the same
way). A replay only overwrites the static inputs and the fixed batch in place, so one graph serves any mix of
adapters and scales at that batch size. Batches are padded up to their bucket; padding rows hold each input's pad value
(0 unless given) with scale 0.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from backends.lora.layers.context import LoRAContext
from backends.lora.ops.batch import LoRABatch


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    output: torch.Tensor


class GraphedLoRAForward:
    def __init__(
        self,
        context: LoRAContext | None,
        device: torch.device | str,
        forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        make_inputs: Callable[[int], dict[str, torch.Tensor]],
        buckets: Sequence[int] = (1, 2, 4, 8, 16, 32),
        warmup: int = 2,
        pad_values: dict[str, int] | None = None,
    ):
        """`pad_values`: what the rows past a batch's end hold per input (default 0)."""
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.context, self.forward = context, forward
        self.pad_values = pad_values or {}
        self.buckets = sorted(set(buckets))
        self._inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._rows: dict[int, LoRABatch] = {}  # the fixed batch of each bucket
        self._graphs: dict[tuple[int, bool], _Captured] = {}
        pool = self._pool = torch.cuda.graph_pool_handle()  # all graphs share one pool: they never run at once
        self._warmup = warmup
        # DoRA buffers are made when a DoRA adapter first lands on a layer: graphs captured before never run them.
        self._dora_version = context.dora_version if context is not None else 0
        for size in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool blocks
            self._inputs[size] = make_inputs(size)
            if context is not None:
                self._rows[size] = context.ops.fixed_batch(size)
                self._graphs[size, True] = self._capture(size, True, warmup, pool)
            self._graphs[size, False] = self._capture(size, False, warmup, pool)

    def _recapture_lora(self) -> None:
        self._dora_version = self.context.dora_version
        for size in reversed(self.buckets):
            self._graphs[size, True] = self._capture(size, True, self._warmup, self._pool)

    def _run(self, size: int, lora: bool) -> torch.Tensor:
        if not lora:
            return self.forward(self._inputs[size])
        # Inside the graph: the backend's metadata follows whatever slots a replay wrote into the fixed batch.
        with self.context.use(self._rows[size]):
            return self.forward(self._inputs[size])

    @torch.inference_mode()
    def _capture(self, size: int, lora: bool, warmup: int, pool) -> _Captured:
        if self.context is not None:
            self.context.wait_for_copies()  # an event recorded outside a capture cannot be waited on inside it
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._run(size, lora)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = self._run(size, lora)
        return _Captured(graph, output)

    def bucket_for(self, rows: int) -> int:
        i = bisect.bisect_left(self.buckets, rows)
        if i == len(self.buckets):
            raise ValueError(f"{rows} rows exceed the largest captured bucket {self.buckets[-1]}")
        return self.buckets[i]

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor], batch: LoRABatch) -> torch.Tensor:
        """Replay for `batch`'s rows (one adapter at most per row); returns a view of the static output: use or copy
        it before the next call."""
        rows = batch.num_seqs
        size = self.bucket_for(rows)
        for name, value in inputs.items():
            static = self._inputs[size][name]
            static[:rows].copy_(value, non_blocking=True)
            static[rows:].fill_(self.pad_values.get(name, 0))
        lora = self.context is not None and not batch.empty
        if lora:  # a replay does not pass through `context.use`: wait for slot copies here
            self.context.wait_for_copies()
        if lora and self.context.dora_version != self._dora_version:
            self._recapture_lora()
        if lora:
            self._rows[size].write(batch)
        captured = self._graphs[size, lora]
        captured.graph.replay()
        return captured.output[:rows]
