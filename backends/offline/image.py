"""`ImageGenerator`: image requests with mixed adapters denoised together, in-process (vLLM-Omni's offline
text-to-image example, with per-row LoRA).

    from backends.offline import ImageGenerator, LoRA
    gen = ImageGenerator(preload={"tiny-sd3-a": ".cache/adapters/diffusion/tiny-sd3-a"})
    pngs = gen.generate(["a red cat", "a blue dog"], seed=7, num_inference_steps=4,
                        lora=[LoRA(name="tiny-sd3-a", scale=0.8), None])
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from backends.diffusion.generate import ImageRequest, build_request
from backends.diffusion.service import start_diffusion
from backends.lora.manager.selector import select_lora
from backends.offline.common import LoRASpec, per_prompt, service_params, stack_fields


class ImageGenerator:
    def __init__(self, model_path: str | Path | None = None, *, preload: dict[str, str] | None = None,
                 device: str = "cpu", **settings):
        """`model_path`: a diffusers pipeline folder (default: the tiny SD3 pipeline); `preload`: adapters by
        name -> path (PEFT folder, diffusers or kohya file), loaded and pinned now; `settings`: any `diffusion`
        model parameter of config.pbtxt (max_loras, max_lora_rank, max_batch_rows, dtype, ...)."""
        self.service = start_diffusion(service_params("diffusion", model_path, preload, settings), device)

    @property
    def name(self) -> str:
        return self.service.loaded.name

    def prepare(self, prompt: str, lora: LoRASpec = None, *, negative_prompt: str | None = None,
                height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                guidance_scale: float | None = None, true_cfg_scale: float | None = None, seed: int | None = None,
                num_images: int | None = None) -> ImageRequest:
        """Validate one request as the server does (InvalidArgument / AdapterError / NotFound on a bad one)."""
        selection = select_lora(self.service.selector, stack_fields(lora))
        return build_request(self.service.loaded, self.service.limits, prompt=prompt,
                             negative_prompt=negative_prompt, height=height, width=width, steps=num_inference_steps,
                             guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale, seed=seed,
                             num_images=num_images, lora=selection)

    def run(self, requests: Sequence[ImageRequest], progress: bool = True) -> list[list[bytes]]:
        """PNG bytes per request (num_images each), in order; planned into batches as the server plans them.
        Runs on the calling thread; one call at a time per generator."""
        generator = self.service.generator
        out: list[list[bytes] | None] = [None] * len(requests)
        batches = generator.plan(requests)
        for chunk in tqdm(batches, desc="denoising", unit="batch", disable=not progress):
            result = generator.run([requests[i] for i in chunk])
            for i, images in zip(chunk, result.images):
                out[i] = images
        return out

    def generate(self, prompts: str | Sequence[str], lora: LoRASpec | list[LoRASpec] = None,
                 progress: bool = True, **options) -> list[bytes]:
        """PNG bytes, `num_images` per prompt, in order; the same options for every prompt (seed: image j of
        prompt i uses seed + j, as the server does per request); `lora` as in `TextGenerator.generate` (tuples are
        LoRA stacks)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        loras = per_prompt(lora, len(prompts))
        requests = [self.prepare(p, lo, **options) for p, lo in zip(prompts, loras)]
        return [png for images in self.run(requests, progress) for png in images]
