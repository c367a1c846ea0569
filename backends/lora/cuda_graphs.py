"""CUDA-graph capture and replay of a (LoRA-patched) forward, per batch-size bucket, with and without adapters.

For every bucket two graphs are captured over the same static inputs: one with the LoRA layers reading the
context's fixed-size per-row buffers (slot, scale, and the kernels' segment metadata, rebuilt inside the graph),
and one where the LoRA layers do nothing, so base-only batches pay nothing for LoRA (vLLM specialises its graphs
the same way). A replay only overwrites the static inputs and the row buffers in place, so one graph serves any
mix of adapters and scales at that batch size. Batches are padded up to their bucket; padding rows are zeroed
inputs with scale 0.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from backends.lora.ops import NO_LORA
from backends.lora.patch import LoRAContext, RowSlots


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
    ):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.context, self.forward = context, forward
        self.buckets = sorted(set(buckets))
        self._inputs: dict[int, dict[str, torch.Tensor]] = {}
        self._rows: dict[int, RowSlots] = {}
        self._graphs: dict[tuple[int, bool], _Captured] = {}
        pool = torch.cuda.graph_pool_handle()  # all graphs share one memory pool: they never run at once
        for size in reversed(self.buckets):  # largest first, so smaller graphs reuse its pool blocks
            self._inputs[size] = make_inputs(size)
            if context is not None:
                self._rows[size] = RowSlots.allocate(size, context)
                self._graphs[size, True] = self._capture(size, True, warmup, pool)
            self._graphs[size, False] = self._capture(size, False, warmup, pool)

    def _run(self, size: int, lora: bool) -> torch.Tensor:
        if not lora:
            return self.forward(self._inputs[size])
        rows = self._rows[size]
        self.context.rows = rows
        try:
            rows.refresh()  # inside the graph: the kernels' metadata follows whatever slots a replay wrote
            return self.forward(self._inputs[size])
        finally:
            self.context.rows = None

    @torch.inference_mode()
    def _capture(self, size: int, lora: bool, warmup: int, pool) -> _Captured:
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
    def __call__(self, inputs: dict[str, torch.Tensor], slot_ids: Sequence[int], scales: Sequence[float]) -> torch.Tensor:
        """Replay for len(slot_ids) rows (slot -1 = no LoRA); returns a view of the static output: use or copy it
        before the next call."""
        rows = len(slot_ids)
        size = self.bucket_for(rows)
        for name, value in inputs.items():
            static = self._inputs[size][name]
            static[:rows].copy_(value, non_blocking=True)
            static[rows:].zero_()
        live = [(max(s, 0), float(c) if s != NO_LORA else 0.0) for s, c in zip(slot_ids, scales)]
        lora = self.context is not None and any(c != 0.0 for _, c in live)
        if lora:
            self._rows[size].write(live)
        captured = self._graphs[size, lora]
        captured.graph.replay()
        return captured.output[:rows]
