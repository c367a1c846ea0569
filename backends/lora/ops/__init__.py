"""LoRA math behind one seam: `LoRABatch` (a forward's adapters, built once per forward) and the `LoRAOps` backend
every LoRA layer calls once; `make_ops` picks the backend for a device."""

from __future__ import annotations

import torch

from backends.lora.ops.base import LoRAOps


def make_ops(max_loras: int, max_rank: int, device: torch.device, dtype: torch.dtype) -> LoRAOps:
    """Triton's shrink/expand kernels on CUDA when triton is installed; torch ops everywhere else."""
    from backends.lora.ops import triton_ops
    from backends.lora.ops.torch_ops import TorchLoRAOps

    if device.type == "cuda" and triton_ops.triton is not None:
        return triton_ops.TritonLoRAOps(max_loras, max_rank, device, dtype)
    return TorchLoRAOps(max_loras, max_rank, device, dtype)
