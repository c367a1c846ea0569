"""Per-row LoRA for a whole diffusers pipeline: one `LoRAContext` over the denoiser and the text encoders.

Every `nn.Linear` of those components is patched (adapters choose which ones they train; a layer no loaded
adapter targets costs no compute, only its slot memory), except T5 text encoders, which LoRA files practically never
train and whose slots would take gigabytes; so is every plain `nn.Conv2d` of a UNet (LoCon files train the ResNet
and resampler convolutions; a transformer's patch-embedding conv is not trained by LoRA files). `targets` (a
regex over pipeline module names) narrows it further. The pipeline itself runs unchanged: a forward pre-hook on
each component maps the batch it is called with onto the generation's rows. Text encoders see the B prompts
(and, separately, the B negative prompts); the denoiser sees B rows, or 2B under classifier-free guidance, where
diffusers stacks [negative; positive] in row order, so row i and row B + i both get row i's adapter and scale.
That is what each row would get with the adapter loaded alone (diffusers applies text-encoder and denoiser LoRA
to both halves).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Iterator

import torch
from torch import nn

from backends.diffusion.pipeline import LoadedPipeline
from backends.lora.adapters.diffusers import load_diffusion_adapter
from backends.lora.adapters.peft import LoRAAdapter
from backends.lora.layers.context import LoRAContext
from backends.lora.layers.conv import LoRAConv2d, patch_convs
from backends.lora.layers.linear import patch_model
from backends.lora.ops.batch import LoRABatch

log = logging.getLogger(__name__)


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("LoRA hook: the component was called without a batched tensor")


def lora_components(loaded: LoadedPipeline) -> tuple[str, ...]:
    """The denoiser, then the text encoders LoRA is served on (all but T5)."""
    encoders = tuple(n for n in loaded.text_encoders if not type(getattr(loaded.pipe, n)).__name__.startswith("T5"))
    return (loaded.denoiser, *encoders)


class PipelineLoRA:
    def __init__(self, loaded: LoadedPipeline, max_loras: int, max_rank: int, targets: str | None = None):
        self.loaded = loaded
        names = lora_components(loaded)
        root = nn.ModuleDict({n: getattr(loaded.pipe, n) for n in names})
        targets = targets or (lambda _n, _m: True)
        self.context: LoRAContext = patch_model(root, max_loras, max_rank, targets=targets, model_name=loaded.name)
        if loaded.denoiser == "unet":
            match = targets if callable(targets) else (lambda n, _m, rx=re.compile(targets): rx.fullmatch(n))
            patch_convs(root, self.context, lambda n, m: n.startswith("unet.") and match(n, m))
        convs = sum(isinstance(layer, LoRAConv2d) for layer in self.context.layers.values())
        # diffusers' SDXL/SD loaders map kohya's SGM block names with the UNet's config; so do we.
        self._state_dict_kwargs = {"unet_config": loaded.pipe.unet.config} if loaded.denoiser == "unet" else {}
        slot_bytes = sum(layer.lora_A.nbytes + layer.lora_B.nbytes for layer in self.context.layers.values())
        log.info("LoRA on %s: %d linear and %d conv layers of %s, %d slots x rank %d = %.1f MB of slot buffers",
                 loaded.name, len(self.context.layers) - convs, convs,
                 ", ".join(names), max_loras, max_rank, slot_bytes / 2**20)
        self._batch: LoRABatch | None = None  # the generation's rows
        self._batches: dict[int, LoRABatch] = {}  # those rows as each component's batch size sees them
        for n in names:
            getattr(loaded.pipe, n).register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def load(self, path: str) -> LoRAAdapter:
        """Read and validate an adapter for this pipeline (any supported format); the cache's loader."""
        return load_diffusion_adapter(path, self.context.spec, self.loaded.denoiser, type(self.loaded.pipe),
                                      self.context.max_rank, dtype=self.context.dtype,
                                      state_dict_kwargs=self._state_dict_kwargs)

    def _before_forward(self, _module, args, kwargs):
        if self._batch is None:
            return None
        n = _batch_size(args, kwargs)
        batch = self._batches.get(n)
        if batch is None:
            rows = self._batch.num_seqs
            if n % rows:
                raise ValueError(f"LoRA rows: a component got a batch of {n} for {rows} rows")
            batch = self._batches[n] = self._batch.repeat(n // rows)
        self.context.ops.set_batch(batch)
        return None

    @contextlib.contextmanager
    def use(self, batch: LoRABatch) -> Iterator[None]:
        """Within the block, pipeline calls run row i of the prompt list with row i of `batch` (its adapters'
        deltas add up)."""
        self._batch, self._batches = batch, {}
        try:
            yield
        finally:
            self._batch, self._batches = None, {}
            self.context.ops.clear()
