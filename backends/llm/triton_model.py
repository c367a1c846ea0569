"""`TritonLLMModel`: the decoupled Triton Python model behind model_repository/llm (its model.py only delegates).

`execute` parses and validates each request, answers bad ones at once with an INVALID_ARG error, and queues good
ones on the engine; the engine thread streams responses back through each request's response sender.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from backends import triton_io as tio
from backends.errors import BackendError, InvalidArgument, Unavailable
from backends.llm.engine import GenerationChunk
from backends.llm.metrics import TritonEngineMetrics
from backends.llm.params import GenerationRequest, build_sampling_params
from backends.llm.service import start_llm
from backends.lora.manager.prefetch import abandon
from backends.lora.manager.selector import select_lora
from backends.model_params import model_parameters, param_str
from backends.settings import LLM_MODEL_PATH_ENV, default_llm_model_path
from backends.structured import parse_constraint

log = logging.getLogger(__name__)


def _logprob_tensors(prefix: str, entries) -> list:
    """`{prefix}token_ids` [T], `{prefix}token_logprobs` [T] (NaN: none, a prompt's first token) and, when top
    logprobs were asked for, `{prefix}top_token_ids` / `{prefix}top_token_logprobs` [T, N]."""
    tensors = [
        tio.array_tensor(f"{prefix}token_ids", [e.token_id for e in entries], np.int32),
        tio.array_tensor(f"{prefix}token_logprobs",
                         [np.nan if e.logprob is None else e.logprob for e in entries], np.float32),
    ]
    width = max(len(e.top) for e in entries)
    if width:  # a prompt's first token has no alternatives: pad its row (ids -1)
        top = [list(e.top) + [(-1, np.nan)] * (width - len(e.top)) for e in entries]
        tensors += [tio.array_tensor(f"{prefix}top_token_ids", [[i for i, _ in row] for row in top], np.int32),
                    tio.array_tensor(f"{prefix}top_token_logprobs", [[v for _, v in row] for row in top],
                                     np.float32)]
    return tensors


class TritonResponseSink:
    """Engine output -> Triton responses for one request."""

    def __init__(self, request):
        self._sender = request.get_response_sender()
        self._request = request

    def send(self, chunk: GenerationChunk, final: bool) -> None:
        outputs = [
            tio.string_tensor("text_output", chunk.text),
            tio.string_tensor("finish_reason", chunk.finish_reason or ""),
            tio.int_tensor("num_input_tokens", chunk.num_input_tokens),
            tio.int_tensor("num_output_tokens", chunk.num_output_tokens),
        ]
        if chunk.logprobs:
            outputs += _logprob_tensors("", chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            outputs += _logprob_tensors("prompt_", chunk.prompt_logprobs)
        response = pb_utils.InferenceResponse(output_tensors=outputs)
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self._sender.send(response, flags=flags)

    def fail(self, error: Exception) -> None:
        tio.send_error(self._sender, error)

    def is_cancelled(self) -> bool:
        return self._sender.is_cancelled()


class TritonLLMModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=os.environ.get("MULTILORA_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException(
                f"model '{args['model_name']}' must set model_transaction_policy {{ decoupled: true }}"
            )
        params = model_parameters(model_config)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        log.info("model '%s' serving %s on %s (set parameter model_path or %s to change)", args["model_name"],
                 param_str(params, "model_path", None) or default_llm_model_path(), device, LLM_MODEL_PATH_ENV)
        self.metrics = TritonEngineMetrics(args["model_name"])
        self.service = start_llm(
            params, device, observer=self.metrics,
            # Triton 2.51 cannot be told that a Python model went unready: new requests and the supervisor's
            # probes get UNAVAILABLE from now on, and the frontend's supervisor reloads the model.
            on_dead=lambda exc: log.critical("model '%s' cannot serve any more: its engine stopped (%s); reload "
                                             "it (the frontend's supervisor does)", args["model_name"], exc),
        )
        self.engine = self.service.engine
        self.metrics.on_started(self.engine.runner.kv, self.service.selector)

    def _parse(self, request) -> GenerationRequest:
        prompt = tio.get_string(request, "text_input")
        ids = tio.get_ints(request, "input_ids")
        if (prompt is None) == (ids is None):
            raise InvalidArgument("send exactly one of the inputs 'text_input' (text) and 'input_ids' (token ids)")
        if prompt is not None and not prompt:
            raise InvalidArgument("input 'text_input' must be a non-empty string")
        if ids is not None and not ids:
            raise InvalidArgument("input 'input_ids' must hold at least one token id")
        sampling = build_sampling_params(
            max_tokens=tio.get_int(request, "max_tokens"),
            temperature=tio.get_float(request, "temperature"),
            top_p=tio.get_float(request, "top_p"),
            top_k=tio.get_int(request, "top_k"),
            seed=tio.get_int(request, "seed"),
            stop=tio.get_strings(request, "stop"),
            default_max_tokens=self.engine.default_max_tokens,
            logprobs=tio.get_int(request, "logprobs"),
            prompt_logprobs=tio.get_int(request, "prompt_logprobs"),
            ignore_eos=tio.get_bool(request, "ignore_eos"),
        )
        stream = tio.get_bool(request, "stream")
        constraint = parse_constraint(tio.get_string(request, "structured_output"))
        lora = select_lora(self.service.selector, tio.get_lora_stack(request), wait=False)  # read off this thread
        self.metrics.note_adapters([selection.ref for selection in lora])
        return GenerationRequest(request.request_id() or "", prompt or "", sampling, stream=bool(stream),
                                 prompt_token_ids=ids or [], lora=lora, constraint=constraint)

    def execute(self, requests: list) -> None:
        for request in requests:
            sink = TritonResponseSink(request)
            try:
                if tio.is_probe(request):
                    if not self.engine.alive:  # the stub lives but cannot generate: tell the supervisor
                        raise Unavailable(f"the model's engine stopped ({self.engine.death_reason}); it needs a "
                                          f"reload")
                    sink.send(GenerationChunk("", None, 0, 0), final=True)
                    continue
                parsed = self._parse(request)
                try:
                    self.engine.submit(self.engine.prepare(parsed), sink)
                except BaseException:
                    abandon(parsed.lora)  # refused after its adapters were selected: their reads' places back
                    raise
            except BackendError as exc:
                log.info("rejected request %s: %s", request.request_id(), exc)
                sink.fail(exc)
            except Exception as exc:
                log.exception("request %s could not be queued", request.request_id())
                sink.fail(exc)
        return None

    def finalize(self) -> None:
        self.engine.shutdown()
        if self.service.selector is not None:
            self.service.selector.close()
        self.metrics.close()
