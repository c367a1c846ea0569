"""`TritonDiffusionModel`: the Triton Python model behind model_repository/diffusion (its model.py only delegates).

Triton's dynamic batcher hands over the requests that arrived together; `execute` validates each (a bad one gets
its own INVALID_ARG/NOT_FOUND error, the rest go on), plans mixed-adapter batches and answers every request with
its PNG images. All torch work runs on the stub's execute thread.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from backends import triton_io as tio
from backends.diffusion.generate import ImageRequest, build_request
from backends.diffusion.metrics import TritonDiffusionMetrics
from backends.diffusion.service import start_diffusion
from backends.errors import BackendError
from backends.lora.manager.selector import select_lora
from backends.model_params import model_parameters, param_str
from backends.settings import DIFFUSION_MODEL_PATH_ENV, default_diffusion_model_path

log = logging.getLogger(__name__)


def _refs(stacks) -> list:
    """One adapter ref per request and adapter (a LoRA stack counts for each of its adapters)."""
    return [selection.ref for stack in stacks for selection in stack]


class TritonDiffusionModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=os.environ.get("MULTILORA_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        model_config = json.loads(args["model_config"])
        params = model_parameters(model_config)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        log.info("model '%s' serving %s on %s (set parameter model_path or %s to change)", args["model_name"],
                 param_str(params, "model_path", None) or default_diffusion_model_path(), device,
                 DIFFUSION_MODEL_PATH_ENV)
        try:
            service = start_diffusion(params, device)
        except ValueError as exc:  # a bad parameter or pipeline: Triton shows the message
            raise pb_utils.TritonModelException(str(exc)) from exc
        self.loaded, self.limits, self.generator = service.loaded, service.limits, service.generator
        self.selector = service.selector
        self.metrics = TritonDiffusionMetrics(args["model_name"])
        if self.selector is not None:
            self.metrics.lora.start(self.selector.registry.static, self.selector.cache)

    def _parse(self, request) -> ImageRequest:
        lora = select_lora(self.selector, tio.get_lora_stack(request))
        self.metrics.lora.note(selection.ref for selection in lora)
        return build_request(
            self.loaded, self.limits,
            prompt=tio.get_string(request, "prompt"),
            negative_prompt=tio.get_string(request, "negative_prompt"),
            height=tio.get_int(request, "height"), width=tio.get_int(request, "width"),
            steps=tio.get_int(request, "num_inference_steps"),
            guidance_scale=tio.get_float(request, "guidance_scale"),
            true_cfg_scale=tio.get_float(request, "true_cfg_scale"),
            seed=tio.get_int(request, "seed"), num_images=tio.get_int(request, "num_images"),
            lora=lora,
        )

    def _response(self, request: ImageRequest, images: list[bytes]) -> "pb_utils.InferenceResponse":
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("images", np.array([images], dtype=np.object_)),
            pb_utils.Tensor("seed", np.array([[request.seed]], dtype=np.int64)),
            pb_utils.Tensor("pipeline", np.array([[self.loaded.name.encode()]], dtype=np.object_)),
        ])

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed: list[tuple[int, ImageRequest]] = []
        for i, request in enumerate(requests):
            try:
                if tio.is_probe(request):  # a supervisor's liveness probe: no images
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor("images", np.empty((1, 0), dtype=np.object_)),
                        pb_utils.Tensor("seed", np.array([[0]], dtype=np.int64)),
                        pb_utils.Tensor("pipeline", np.array([[self.loaded.name.encode()]], dtype=np.object_)),
                    ])
                    continue
                parsed.append((i, self._parse(request)))
            except BackendError as exc:
                log.info("rejected request %s: %s", request.request_id(), exc)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=tio.to_triton_error(exc))
            except Exception as exc:
                log.exception("request %s could not be parsed", request.request_id())
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=tio.to_triton_error(exc))
        items = [req for _, req in parsed]
        chunks = self.generator.plan(items)
        for n, chunk in enumerate(chunks):
            batch = [items[j] for j in chunk]
            self._report_lora(running=_refs(r.lora for r in batch),
                              waiting=_refs(items[j].lora for later in chunks[n + 1:] for j in later))
            try:
                result = self.generator.run(batch)
            except Exception as exc:
                if not isinstance(exc, BackendError):
                    log.exception("denoising batch of %d requests failed", len(batch))
                for j in chunk:
                    responses[parsed[j][0]] = pb_utils.InferenceResponse(
                        output_tensors=[], error=tio.to_triton_error(exc))
                continue
            for j, images in zip(chunk, result.images):
                responses[parsed[j][0]] = self._response(items[j], images)
            self.metrics.images.increment(sum(len(i) for i in result.images))
            self.metrics.batches.increment(1)
            self.metrics.seconds.increment(result.seconds)
        self._report_lora()
        return responses

    def _report_lora(self, running=(), waiting=()) -> None:
        """Requests per adapter as Triton hands them over: the batch being denoised runs, the later batches of
        the same call wait (requests still in Triton's own queue are not visible to the model)."""
        if self.selector is None:
            return
        try:
            self.metrics.lora.report(self.selector.cache, running, waiting)
        except Exception:  # metrics never cost the requests their answers
            log.exception("reporting LoRA metrics failed")

    def finalize(self) -> None:
        self.metrics.close()
        log.info("diffusion model %s unloaded", self.loaded.name)
