"""CUDA-graph capture and replay of a LoRA-patched forward, one graph per batch-size bucket.

During capture the patched layers run `lora_apply_rows` over fixed-size per-row buffers (slot, scale) held by
the `LoRAContext`; a replay only overwrites those buffers and the static inputs in place, so one captured graph
serves any mix of adapters and scales at that batch size. Requests are padded up to the next bucket (padding rows
use scale 0).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from backends.lora.ops import NO_LORA
from backends.lora.patch import LoRAContext


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: dict[str, torch.Tensor]
    slots: torch.Tensor
    scales: torch.Tensor
    output: torch.Tensor


class GraphedLoRAForward:
    def __init__(
        self,
        context: LoRAContext,
        forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        make_inputs: Callable[[int], dict[str, torch.Tensor]],
        buckets: Sequence[int] = (1, 2, 4, 8, 16, 32),
        warmup: int = 2,
    ):
        if context.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the patched model on a CUDA device")
        self.context, self.forward = context, forward
        self.buckets = sorted(buckets)
        self._graphs: dict[int, _Captured] = {}
        for size in self.buckets:
            self._graphs[size] = self._capture(size, make_inputs(size), warmup)

    @torch.inference_mode()
    def _capture(self, size: int, inputs: dict[str, torch.Tensor], warmup: int) -> _Captured:
        dev = self.context.device
        slots = torch.zeros(size, dtype=torch.long, device=dev)
        scales = torch.zeros(size, dtype=self.context.dtype, device=dev)
        self.context.rows = (slots, scales)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.forward(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = self.forward(inputs)
        finally:
            self.context.rows = None
        return _Captured(graph, inputs, slots, scales, output)

    def bucket_for(self, rows: int) -> int:
        i = bisect.bisect_left(self.buckets, rows)
        if i == len(self.buckets):
            raise ValueError(f"{rows} rows exceed the largest captured bucket {self.buckets[-1]}")
        return self.buckets[i]

    @torch.inference_mode()
    def __call__(self, inputs: dict[str, torch.Tensor], slot_ids: Sequence[int], scales: Sequence[float]) -> torch.Tensor:
        rows = len(slot_ids)
        cap = self._graphs[self.bucket_for(rows)]
        for name, value in inputs.items():
            static = cap.inputs[name]
            static[:rows].copy_(value, non_blocking=True)
            static[rows:].zero_()
        slot_t = torch.tensor([max(s, 0) for s in slot_ids], dtype=torch.long)
        scale_t = torch.tensor([c if s != NO_LORA else 0.0 for s, c in zip(slot_ids, scales)])
        cap.slots.zero_()
        cap.scales.zero_()
        cap.slots[:rows].copy_(slot_t, non_blocking=True)
        cap.scales[:rows].copy_(scale_t, non_blocking=True)
        cap.graph.replay()
        return cap.output[:rows]
