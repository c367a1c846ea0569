"""Image generation on the diffusion models: OpenAI's images body plus vLLM-Omni's extras (seed, steps, guidance,
negative prompt, `lora`), checked against the frontend's limits; and chat completions on an image model
(vLLM-Omni's shape). A request's `n` images share one denoising batch."""

from __future__ import annotations

import base64
import re
import time

from pydantic import ValidationError

from openai_frontend.config import FrontendConfig
from openai_frontend.engine.catalog import DIFFUSION, Catalog, Target
from openai_frontend.engine.gateway import Images, TritonGateway
from openai_frontend.engine.responses import response_base
from openai_frontend.errors import bad_request
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.schemas import ChatCompletionRequest, ImageChatOptions, ImageGenerationRequest

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class ImageService:
    def __init__(self, config: FrontendConfig, gateway: TritonGateway, catalog: Catalog, metrics: FrontendMetrics):
        self.config, self.gateway, self.catalog, self.metrics = config, gateway, catalog, metrics

    async def generations(self, body: ImageGenerationRequest) -> dict:
        """`/v1/images/generations`: `data[].b64_json` PNGs, the seed and the pipeline that made them."""
        target = await self.catalog.target(body.model, body.lora, body.lora_scale)
        if target.base.kind != DIFFUSION:
            raise bad_request(f"model '{body.model}' is a text model: use /v1/chat/completions", "model")
        if body.response_format != "b64_json":
            raise bad_request("response_format 'url' is not supported: use 'b64_json'", "response_format")
        images = await self.render(target, body)
        return {"created": int(time.time()), "model": body.model, "pipeline": images.pipeline, "seed": images.seed,
                "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None}
                         for png in images.pngs]}

    async def chat(self, body: ChatCompletionRequest, raw: dict, target: Target) -> dict:
        """vLLM-Omni's chat completions on an image model: the user messages' text is the prompt, image options are
        top-level keys of `raw`, and each choice's message carries its images as `image_url` parts holding PNG data
        URLs. All of them share one denoising batch."""
        if body.stream:
            raise bad_request(f"model '{body.model}' generates images: send stream: false", "stream")
        if body.logprobs:
            raise bad_request(f"model '{body.model}' generates images and has no logprobs", "logprobs")
        try:
            options = ImageChatOptions.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"])
            raise bad_request(f"{field}: {error['msg']}", field) from None
        per_choice = options.num_outputs_per_prompt
        prompt = " ".join(m.text() for m in body.messages if m.role == "user").strip()
        job = ImageGenerationRequest(model=body.model, prompt=prompt, n=body.n * per_choice, size=options.size,
                                     seed=body.seed, num_inference_steps=options.num_inference_steps,
                                     guidance_scale=options.guidance_scale, negative_prompt=options.negative_prompt)
        done = await self.render(target, job)
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
                 for png in done.pngs]
        choices = [{"index": i, "message": {"role": "assistant", "content": parts[i * per_choice:(i + 1) * per_choice]},
                    "finish_reason": "stop", "logprobs": None} for i in range(body.n)]
        return {**response_base(body.model, "chat"), "object": "chat.completion", "choices": choices, "seed": done.seed}

    async def render(self, target: Target, body: ImageGenerationRequest) -> Images:
        """An image request checked against the frontend's limits, rendered by the target's model."""
        config = self.config
        if body.n > config.max_images:
            raise bad_request(f"n must be <= {config.max_images}, got {body.n}", "n")
        if not body.prompt.strip():
            raise bad_request("prompt must be a non-empty string", "prompt")
        if len(body.prompt) > config.max_prompt_chars:
            raise bad_request(f"prompt exceeds {config.max_prompt_chars} characters", "prompt")
        width = height = None
        if body.size and body.size != "auto":
            match = _SIZE.match(body.size)
            if not match:
                raise bad_request(f"size must look like '512x512', got {body.size!r}", "size")
            width, height = int(match[1]), int(match[2])
            if max(width, height) > config.max_image_size:
                raise bad_request(f"size {body.size} exceeds {config.max_image_size} pixels per side", "size")
        fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt or "", "height": height,
                  "width": width, "num_inference_steps": body.num_inference_steps,
                  "guidance_scale": body.guidance_scale, "seed": body.seed, "num_images": body.n}
        images = await self.gateway.images(target.base.name, fields, target.lora_parameters())
        self.metrics.images.labels(body.model).inc(len(images.pngs))
        return images
