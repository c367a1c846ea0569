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
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.manager.selector import AdapterSelector
from backends.model_params import param_choice, param_float, param_int, param_str
from backends.settings import default_diffusion_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DiffusionService:
    loaded: LoadedPipeline
    limits: ImageLimits
    generator: DiffusionGenerator
    selector: AdapterSelector | None  # None: LoRA disabled (max_loras 0)


def start_diffusion(params: dict[str, str], device: str = "cpu") -> DiffusionService:
    dtype_name = param_choice(params, "dtype", "float16" if device != "cpu" else "float32", DTYPES)
    model_path = param_str(params, "model_path", None) or default_diffusion_model_path()
    loaded = load_pipeline(model_path, device, DTYPES[dtype_name])
    defaults = ImageLimits()
    limits = ImageLimits(
        max_image_size=param_int(params, "max_image_size", defaults.max_image_size),
        max_inference_steps=param_int(params, "max_inference_steps", defaults.max_inference_steps),
        max_num_images=param_int(params, "max_num_images", defaults.max_num_images),
        max_batch_rows=param_int(params, "max_batch_rows", defaults.max_batch_rows),
        default_inference_steps=param_int(params, "default_inference_steps", None),
        default_guidance_scale=param_float(params, "default_guidance_scale", None),
    )
    lora = LoRAServingConfig.from_parameters(params)
    selector, pipe_lora = None, None
    if lora.enabled:
        pipe_lora = PipelineLoRA(loaded, lora.max_loras, lora.max_lora_rank, targets=lora.target_modules)
        selector = AdapterSelector.build(pipe_lora.context, lora, load=pipe_lora.load)
    generator = DiffusionGenerator(loaded, limits, pipe_lora, selector.cache if selector else None)
    return DiffusionService(loaded, limits, generator, selector)
