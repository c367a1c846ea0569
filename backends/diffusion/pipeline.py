"""Load a diffusers text-to-image pipeline (local folder or Hugging Face cache id) and describe what it accepts."""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from backends.settings import DIFFUSION_MODEL_PATH_ENV

log = logging.getLogger(__name__)

DENOISERS = ("transformer", "unet")


@dataclass
class LoadedPipeline:
    pipe: object  # a diffusers DiffusionPipeline
    name: str  # what the server reports: the folder name or the Hugging Face id
    denoiser: str  # "transformer" or "unet"
    text_encoders: tuple[str, ...]
    size_factor: int  # height and width must be multiples of this (VAE downscale x latent packing x patch size)
    default_size: int
    negative_prompt: bool = True  # takes a negative prompt (classic classifier-free guidance)
    true_cfg: bool = False  # has a separate "true CFG" pass (Flux, Qwen-Image: true_cfg_scale + negative prompt)

    @property
    def kind(self) -> str:
        return type(self.pipe).__name__


def _null_components(path: Path) -> dict[str, None]:
    """Components saved as [null, null] (e.g. SD3 without T5): diffusers only skips those its class lists as
    optional, so pass them as None explicitly."""
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    return {k: None for k, v in json.loads(index.read_text()).items()
            if isinstance(v, list) and len(v) == 2 and v[0] is None}


def load_pipeline(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedPipeline:
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    local = path.is_dir()
    if not local and (model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1)):
        raise FileNotFoundError(f"diffusion pipeline folder {model} does not exist (run scripts/setup to build the "
                                f"tiny test pipelines, or set model_path / ${DIFFUSION_MODEL_PATH_ENV})")
    source = str(path) if local else model
    pipe = DiffusionPipeline.from_pretrained(source, dtype=dtype, **(_null_components(path) if local else {}))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = next((d for d in DENOISERS if getattr(pipe, d, None) is not None), None)
    if denoiser is None:
        raise ValueError(f"{type(pipe).__name__} at {source} has neither a transformer nor a unet to serve LoRA on")
    text_encoders = tuple(n for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
                          if isinstance(getattr(pipe, n, None), torch.nn.Module))
    factor = _size_factor(pipe, denoiser)
    default_size = _default_size(pipe, denoiser, factor)
    name = path.name if local else model
    log.info("diffusion pipeline %s (%s) from %s on %s: sizes in multiples of %d, default %dx%d",
             name, type(pipe).__name__, source, device, factor, default_size, default_size)
    params = inspect.signature(pipe.__call__).parameters
    # Flux embeds guidance in the transformer (no CFG pass): its negative prompt only acts in the second "true CFG"
    # pass that true_cfg_scale > 1 turns on.
    true_cfg = "true_cfg_scale" in params
    return LoadedPipeline(pipe, name, denoiser, text_encoders, factor, default_size,
                          "negative_prompt" in params and not true_cfg, true_cfg)


def _size_factor(pipe, denoiser: str) -> int:
    """Pixels per latent token: the image processor's factor (the VAE's, x2 where latents are packed 2x2 as in
    Flux) times the denoiser's patch size (SD3 patchifies the latents; a UNet has none)."""
    processor = getattr(pipe, "image_processor", None)
    vae_factor = getattr(getattr(processor, "config", None), "vae_scale_factor", None)
    vae_factor = int(vae_factor or getattr(pipe, "vae_scale_factor", 8))
    patch = int(getattr(getattr(pipe, denoiser).config, "patch_size", None) or 1)
    return vae_factor * patch


def _default_size(pipe, denoiser: str, factor: int) -> int:
    """The denoiser's latent sample_size times the VAE factor; a denoiser without one (Flux's transformer) takes
    the VAE's sample_size, which is in pixels. Rounded down to a valid size."""
    sample_size = getattr(getattr(pipe, denoiser).config, "sample_size", None)
    if sample_size is not None:
        size = int(sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    else:
        vae_size = pipe.vae.config.sample_size
        size = int(vae_size[0] if isinstance(vae_size, (list, tuple)) else vae_size)
    return max(factor, size // factor * factor)
