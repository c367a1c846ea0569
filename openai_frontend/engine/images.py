"""Image generation on the diffusion models: OpenAI's images body plus vLLM-Omni's extras (height/width, seed,
steps, guidance, true CFG, negative prompt, `lora`), checked against the frontend's limits; and chat completions on
an image model (vLLM-Omni's shape). A request's images share one denoising batch."""

from __future__ import annotations

import base64
import re
import time

from openai_frontend.config import FrontendConfig
from openai_frontend.engine.catalog import DIFFUSION, Catalog, Target
from openai_frontend.engine.gateway import Images, TritonGateway
from openai_frontend.engine.responses import response_base
from openai_frontend.errors import bad_request
from openai_frontend.metrics import FrontendMetrics
from openai_frontend.schemas import IMAGE_OPTIONS, ChatCompletionRequest, ImageGenerationRequest

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# Chat fields that shape text generation: on an image model they would change nothing, so they are refused.
_TEXT_ONLY = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "top_logprobs",
              "stream_options")


class ImageService:
    def __init__(self, config: FrontendConfig, gateway: TritonGateway, catalog: Catalog, metrics: FrontendMetrics):
        self.config, self.gateway, self.catalog, self.metrics = config, gateway, catalog, metrics

    async def generations(self, body: ImageGenerationRequest) -> dict:
        """`/v1/images/generations`: `data[].b64_json` PNGs, the seed and the pipeline that made them."""
        body.model = await self.catalog.resolve(body.model, DIFFUSION)
        target = await self.catalog.target(body.model, body.lora, body.lora_scale)
        if target.base.kind != DIFFUSION:
            raise bad_request(f"model '{body.model}' is a text model: use /v1/chat/completions", "model")
        if body.response_format != "b64_json":
            raise bad_request("response_format 'url' is not supported: use 'b64_json'", "response_format")
        if body.num_outputs_per_prompt is not None:  # vLLM-Omni's name for n
            if "n" in body.model_fields_set and body.n != body.num_outputs_per_prompt:
                raise bad_request(f"num_outputs_per_prompt {body.num_outputs_per_prompt} disagrees with n {body.n}; "
                                  f"send one", "num_outputs_per_prompt")
            body.n = body.num_outputs_per_prompt
        images = await self.render(target, body)
        return {"created": int(time.time()), "model": body.model, "pipeline": images.pipeline, "seed": images.seed,
                "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None}
                         for png in images.pngs]}

    async def chat(self, body: ChatCompletionRequest, target: Target) -> dict:
        """vLLM-Omni's chat completions on an image model: the user messages' text is the prompt, the image options
        are the body's (top level or its `extra_body` object), and each choice's message carries its images as
        `image_url` parts holding PNG data URLs. All of them share one denoising batch."""
        if body.stream:
            raise bad_request(f"model '{body.model}' generates images: send stream: false", "stream")
        if body.logprobs:
            raise bad_request(f"model '{body.model}' generates images and has no logprobs", "logprobs")
        for name in _TEXT_ONLY:
            if getattr(body, name) not in (None, []):
                raise bad_request(f"{name} applies to text generation; model '{body.model}' generates images", name)
        if body.ignore_eos:
            raise bad_request(f"ignore_eos applies to text generation; model '{body.model}' generates images",
                              "ignore_eos")
        per_choice = body.num_outputs_per_prompt or 1
        if body.n * per_choice > self.config.max_images:
            raise bad_request(f"n x num_outputs_per_prompt must be <= {self.config.max_images}, got "
                              f"{body.n} x {per_choice}", "num_outputs_per_prompt" if per_choice > 1 else "n")
        if body.seed is not None and body.seed < 0:
            raise bad_request(f"seed must be >= 0 for an image model, got {body.seed}", "seed")
        prompt = " ".join(m.text() for m in body.messages if m.role == "user").strip()
        if not prompt:
            raise bad_request("the user messages hold no text to use as the image prompt", "messages")
        job = ImageGenerationRequest(model=body.model, prompt=prompt, n=body.n * per_choice, seed=body.seed,
                                     **{name: getattr(body, name) for name in IMAGE_OPTIONS
                                        if name != "num_outputs_per_prompt"})
        done = await self.render(target, job)
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
                 for png in done.pngs]
        choices = [{"index": i, "message": {"role": "assistant", "content": parts[i * per_choice:(i + 1) * per_choice]},
                    "finish_reason": "stop", "logprobs": None} for i in range(body.n)]
        return {**response_base(body.model, "chat"), "object": "chat.completion", "choices": choices, "seed": done.seed}

    def _dimensions(self, body: ImageGenerationRequest) -> tuple[int | None, int | None]:
        """(width, height) from `size` "WxH" and/or vLLM-Omni's `height`/`width` (both ways: they must agree); None
        leaves a side to the pipeline's default. Multiples of the pipeline's factor are the backend's check."""
        cap = self.config.max_image_size
        width, height = body.width, body.height
        if body.size and body.size != "auto":
            match = _SIZE.match(body.size)
            if not match:
                raise bad_request(f"size must look like '512x512', got {body.size!r}", "size")
            for name, given, parsed in (("width", width, int(match[1])), ("height", height, int(match[2]))):
                if given is not None and given != parsed:
                    raise bad_request(f"{name} {given} disagrees with size {body.size}; send one", name)
            width, height = int(match[1]), int(match[2])
            if max(width, height) > cap:
                raise bad_request(f"size {body.size} exceeds {cap} pixels per side", "size")
        for name, value in (("width", width), ("height", height)):
            if value is not None and value > cap:
                raise bad_request(f"{name} {value} exceeds {cap} pixels per side", name)
        return width, height

    async def render(self, target: Target, body: ImageGenerationRequest) -> Images:
        """An image request checked against the frontend's limits, rendered by the target's model."""
        config = self.config
        if body.n > config.max_images:
            raise bad_request(f"n must be <= {config.max_images}, got {body.n}", "n")
        if not body.prompt.strip():
            raise bad_request("prompt must be a non-empty string", "prompt")
        if len(body.prompt) > config.max_prompt_chars:
            raise bad_request(f"prompt exceeds {config.max_prompt_chars} characters", "prompt")
        width, height = self._dimensions(body)
        fields = {"prompt": body.prompt, "negative_prompt": body.negative_prompt or "", "height": height,
                  "width": width, "num_inference_steps": body.num_inference_steps,
                  "guidance_scale": body.guidance_scale, "true_cfg_scale": body.true_cfg_scale, "seed": body.seed,
                  "num_images": body.n}
        images = await self.gateway.images(target.base.name, fields, target.lora_parameters())
        self.metrics.images.labels(target.base.name).inc(len(images.pngs))
        return images
