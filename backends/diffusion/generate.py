"""Image requests -> validated parameters -> mixed-adapter batches -> PNG bytes.

Requests that arrive together (Triton's dynamic batcher hands them over in one `execute`) and share height,
width, steps and guidance scale are denoised as one batch; each row keeps its own prompt, negative prompt, seed,
adapter and scale. Image j of a request with seed s uses seed s + j on its own CPU generator, so a row's starting
noise is the same alone or in any batch.
"""

from __future__ import annotations

import io
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch

from backends.diffusion.lora import PipelineLoRA
from backends.diffusion.pipeline import LoadedPipeline
from backends.errors import InvalidArgument
from backends.lora.manager.cache import LoRACache
from backends.lora.manager.request import LoRASelection
from backends.lora.ops.batch import LoRABatch, RowLoRA

log = logging.getLogger(__name__)

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ImageLimits:
    max_image_size: int = 1024  # height and width
    max_inference_steps: int = 100
    max_num_images: int = 4  # per request
    max_batch_rows: int = 8  # images denoised together (x2 under classifier-free guidance)
    max_prompt_chars: int = 4096
    default_inference_steps: int | None = None  # None: the pipeline's own default
    default_guidance_scale: float | None = None


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str
    height: int
    width: int
    steps: int
    guidance_scale: float | None
    seed: int
    num_images: int
    lora: tuple[LoRASelection, ...] = ()  # () = no LoRA; several = a LoRA stack (their deltas summed)
    true_cfg_scale: float | None = None  # pipelines with a true-CFG pass only (LoadedPipeline.true_cfg)
    # SDXL-style pipelines (force_zeros_for_empty_prompt) guide against zero embeddings without a negative prompt
    # but encode "" once any row of the call has one: such rows must not share a batch, or an image would depend
    # on its batch mates.
    zero_negative: bool = False

    @property
    def batch_key(self) -> tuple:
        return (self.height, self.width, self.steps, self.guidance_scale, self.true_cfg_scale, self.zero_negative)


def build_request(loaded: LoadedPipeline, limits: ImageLimits, *, prompt: str | None,
                  negative_prompt: str | None = None, height: int | None = None, width: int | None = None,
                  steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                  num_images: int | None = None, lora: tuple[LoRASelection, ...] = (),
                  true_cfg_scale: float | None = None) -> ImageRequest:
    """Validate one request's parameters (InvalidArgument names the first bad one) and fill the defaults.

    `true_cfg_scale` (vLLM-Omni's name): the scale of a pipeline's true-CFG pass where it has one; on a pipeline
    whose only guidance is classic classifier-free guidance it is that guidance's scale, i.e. guidance_scale."""
    if prompt is None:
        raise InvalidArgument("missing required input 'prompt'")
    if not prompt.strip():
        raise InvalidArgument("input 'prompt' must be a non-empty string")
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(f"input '{name}' has {len(text)} characters, max is {limits.max_prompt_chars}")
    if true_cfg_scale is not None:
        if not (math.isfinite(true_cfg_scale) and true_cfg_scale >= 0):
            raise InvalidArgument(f"true_cfg_scale must be a finite number >= 0, got {true_cfg_scale}")
        if not loaded.true_cfg:
            if not loaded.negative_prompt:
                raise InvalidArgument(f"{loaded.name} ({loaded.kind}) takes no true_cfg_scale: it has no "
                                      f"classifier-free guidance pass")
            if guidance_scale is not None and guidance_scale != true_cfg_scale:
                raise InvalidArgument(f"true_cfg_scale {true_cfg_scale} and guidance_scale {guidance_scale} differ: "
                                      f"for {loaded.name} ({loaded.kind}) both are its classifier-free guidance "
                                      f"scale; send one")
            guidance_scale, true_cfg_scale = true_cfg_scale, None
    true_cfg_on = true_cfg_scale is not None and true_cfg_scale > 1
    if true_cfg_on and not negative_prompt:  # diffusers runs the true-CFG pass only against a negative prompt
        raise InvalidArgument(f"true_cfg_scale {true_cfg_scale} needs a negative_prompt on {loaded.name} "
                              f"({loaded.kind}): its true-CFG pass guides away from it")
    if negative_prompt and not loaded.negative_prompt and not true_cfg_on:
        raise InvalidArgument(f"{loaded.name} ({loaded.kind}) takes no negative_prompt without true_cfg_scale > 1: "
                              f"its guidance is embedded in the model (guidance_scale), there is no classifier-free "
                              f"guidance pass otherwise")
    factor = loaded.size_factor
    size = {}
    for name, value in (("height", height), ("width", width)):
        value = loaded.default_size if value is None else value
        if value < factor or value > limits.max_image_size or value % factor:
            raise InvalidArgument(f"{name} must be a multiple of {factor} between {factor} and "
                                  f"{limits.max_image_size} for {loaded.name}, got {value}")
        size[name] = value
    steps = limits.default_inference_steps if steps is None else steps
    if steps is not None and not 1 <= steps <= limits.max_inference_steps:
        raise InvalidArgument(f"num_inference_steps must be between 1 and {limits.max_inference_steps}, got {steps}")
    guidance_scale = limits.default_guidance_scale if guidance_scale is None else guidance_scale
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise InvalidArgument(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    num_images = 1 if num_images is None else num_images
    if not 1 <= num_images <= limits.max_num_images:
        raise InvalidArgument(f"num_images must be between 1 and {limits.max_num_images}, got {num_images}")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif not 0 <= seed <= MAX_SEED - num_images:
        raise InvalidArgument(f"seed must be between 0 and {MAX_SEED - num_images}, got {seed}")
    # Rows without a negative prompt must not share a call with rows that have one where that changes them: SDXL
    # (zero embeddings vs an encoded "") and true-CFG pipelines (the pass runs once any row has a negative prompt).
    zero_negative = not negative_prompt and (loaded.true_cfg or bool(getattr(loaded.pipe.config,
                                                                             "force_zeros_for_empty_prompt", False)))
    return ImageRequest(prompt, negative_prompt or "", size["height"], size["width"], steps, guidance_scale,
                        seed, num_images, lora, true_cfg_scale, zero_negative)


@dataclass
class BatchResult:
    images: list[list[bytes]] = field(default_factory=list)  # PNG bytes per request, in request order
    seconds: float = 0.0


def encode_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class DiffusionGenerator:
    """Runs batches of ImageRequests on one pipeline; call from the thread that owns torch work."""

    def __init__(self, loaded: LoadedPipeline, limits: ImageLimits, lora: PipelineLoRA | None = None,
                 cache: LoRACache | None = None):
        self.loaded = loaded
        self.limits = limits
        self.lora = lora
        self.cache = cache

    def plan(self, requests: Iterable[ImageRequest]) -> list[list[int]]:
        """Indices of `requests` grouped into batches: same batch key, at most max_batch_rows images and only as
        many distinct adapters as fit the slots next to the pinned ones. A request's images always stay in one
        batch; order is kept."""
        groups: dict[tuple, list[list[int]]] = {}
        items = list(requests)
        fits = self.cache.fits if self.cache is not None else (lambda keys: not keys)
        for i, req in enumerate(items):
            chunks = groups.setdefault(req.batch_key, [[]])
            chunk = chunks[-1]
            rows = sum(items[j].num_images for j in chunk) + req.num_images
            adapters = {s.ref.key for j in [*chunk, i] for s in items[j].lora}  # a stack counts each adapter
            if chunk and (rows > self.limits.max_batch_rows or not fits(adapters)):
                chunks.append(chunk := [])
            chunk.append(i)
        return [c for chunks in groups.values() for c in chunks]

    @staticmethod
    def pipeline_kwargs(batch: list[ImageRequest]) -> dict:
        """The pipeline call for a planned batch: one row per image, in request order."""
        first = batch[0]
        rows = [(req, j) for req in batch for j in range(req.num_images)]
        kwargs = dict(
            prompt=[req.prompt for req, _ in rows],
            height=first.height, width=first.width,
            generator=[torch.Generator("cpu").manual_seed(req.seed + j) for req, j in rows],
            output_type="pil",
        )
        # Only when some row has one: without it SDXL guides against zero embeddings, not an encoded "" (the
        # other pipelines encode "" either way).
        if any(req.negative_prompt for req in batch):
            kwargs["negative_prompt"] = [req.negative_prompt for req, _ in rows]
        if first.steps is not None:
            kwargs["num_inference_steps"] = first.steps
        if first.guidance_scale is not None:
            kwargs["guidance_scale"] = first.guidance_scale
        if first.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = first.true_cfg_scale
        return kwargs

    @torch.inference_mode()
    def run(self, batch: list[ImageRequest]) -> BatchResult:
        """Denoise one planned batch; every row gets its own adapter, scale, prompt and seed."""
        started = time.perf_counter()
        first = batch[0]
        rows = [(req, j) for req in batch for j in range(req.num_images)]
        refs = [s.ref for req in batch for s in req.lora]
        kwargs = self.pipeline_kwargs(batch)
        if refs and (self.lora is None or self.cache is None):
            raise InvalidArgument("this model serves no LoRA adapters (max_loras is 0)")
        if refs:
            slot_of = dict(zip((r.key for r in refs), self.cache.acquire(refs)))
            try:
                lora = LoRABatch.from_rows([RowLoRA.stack([(slot_of[s.ref.key], s.scale) for s in req.lora])
                                            for req, _ in rows])
                with self.lora.use(lora):
                    images = self.loaded.pipe(**kwargs).images
            finally:
                self.cache.release(refs)
        else:
            images = self.loaded.pipe(**kwargs).images
        result = BatchResult(seconds=time.perf_counter() - started)
        it = iter(images)
        for req in batch:
            result.images.append([encode_png(next(it)) for _ in range(req.num_images)])
        log.info("denoised %d images (%d requests, %d adapters, %dx%d, %s steps) in %.2f s", len(rows), len(batch),
                 len({r.key for r in refs}), first.height, first.width, first.steps or "default",
                 result.seconds)
        return result
