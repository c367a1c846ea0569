"""A diffusion pipeline with its LoRA stack, built from the `diffusion` model's parameters (config.pbtxt names,
string values): the Triton model and the offline `ImageGenerator` build it the same way, so a request gives the
same image bytes through either."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from backends.diffusion.generate import DiffusionGenerator, ImageLimits
from backends.diffusion.lora import PipelineLoRA
from backends.diffusion.pipeline import LoadedPipeline, load_pipeline
from backends.settings import default_diffusion_model_path
from backends.lora.resolver import AdapterResolver
from backends.lora.serving import LoRAServingConfig, build_resolver
from backends.model_params import param_int

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DiffusionService:
    loaded: LoadedPipeline
    limits: ImageLimits
    generator: DiffusionGenerator
    resolver: AdapterResolver | None  # None: LoRA disabled (max_loras 0)


def start_diffusion(params: dict[str, str], device: str = "cpu") -> DiffusionService:
    dtype_name = (params.get("dtype") or "").strip() or ("float16" if device != "cpu" else "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"parameter dtype must be one of {sorted(DTYPES)}, got {dtype_name}")
    model_path = (params.get("model_path") or "").strip() or default_diffusion_model_path()
    loaded = load_pipeline(model_path, device, DTYPES[dtype_name])
    defaults = ImageLimits()
    guidance = (params.get("default_guidance_scale") or "").strip()
    limits = ImageLimits(
        max_image_size=param_int(params, "max_image_size", defaults.max_image_size),
        max_inference_steps=param_int(params, "max_inference_steps", defaults.max_inference_steps),
        max_num_images=param_int(params, "max_num_images", defaults.max_num_images),
        max_batch_rows=param_int(params, "max_batch_rows", defaults.max_batch_rows),
        default_inference_steps=param_int(params, "default_inference_steps", None),
        default_guidance_scale=float(guidance) if guidance else None,
    )
    lora = LoRAServingConfig.from_parameters(params)
    resolver, pipe_lora = None, None
    if lora.enabled:
        pipe_lora = PipelineLoRA(loaded, lora.max_loras, lora.max_lora_rank,
                                 targets=(params.get("lora_target_modules") or "").strip() or None)
        resolver = build_resolver(pipe_lora.context, lora, load=pipe_lora.load)
    generator = DiffusionGenerator(loaded, limits, pipe_lora, resolver.cache if resolver else None)
    return DiffusionService(loaded, limits, generator, resolver)
