"""Test helper: one generation over a tritonclient gRPC stream, collecting every response."""

from __future__ import annotations

import queue
import uuid
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

_DTYPES = {
    "max_tokens": np.int32, "top_k": np.int32, "seed": np.int64,
    "temperature": np.float32, "top_p": np.float32, "stream": np.bool_, "ignore_eos": np.bool_,
    "lora_scale": np.float32, "lora_int_id": np.int64, "logprobs": np.int32, "prompt_logprobs": np.int32,
}
_STRINGS = {"lora_name", "lora_path"}


def make_inputs(text_input: str | bytes | None = None, **params) -> list[grpcclient.InferInput]:
    values: dict[str, np.ndarray] = {}
    if text_input is not None:
        raw = text_input.encode() if isinstance(text_input, str) else text_input
        values["text_input"] = np.array([raw], dtype=np.object_)
    for name, value in params.items():
        if value is None:
            continue
        if name == "input_ids":
            values[name] = np.array(value, dtype=np.int32)
        elif name == "stop":
            values[name] = np.array([s.encode() for s in value], dtype=np.object_)
        elif name in _STRINGS:  # a list: a LoRA stack
            listed = value if isinstance(value, (list, tuple)) else [value]
            values[name] = np.array([str(v).encode() for v in listed], dtype=np.object_)
        else:
            values[name] = np.array(value if isinstance(value, (list, tuple)) else [value], dtype=_DTYPES[name])
    inputs = []
    for name, array in values.items():
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass
class Generation:
    chunks: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None
    error: InferenceServerException | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def generate(
    client: grpcclient.InferenceServerClient,
    text_input: str | bytes | None,
    model: str = "llm",
    timeout: float = 120.0,
    cancel_after_chunks: int | None = None,
    parameters: dict | None = None,
    **params,
) -> Generation:
    """Send one request on a new stream and read until its final response (or an error, or a cancel).

    `params` become input tensors; `parameters` are Triton request parameters."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    out = Generation()
    try:
        client.async_stream_infer(
            model, make_inputs(text_input, **params), request_id=uuid.uuid4().hex, enable_empty_final_response=True,
            parameters=parameters,
        )
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                out.error = error
                return out
            text = result.as_numpy("text_output")
            if text is not None:
                out.chunks.append(text[0].decode())
                out.finish_reason = result.as_numpy("finish_reason")[0].decode() or None
                out.num_input_tokens = int(result.as_numpy("num_input_tokens")[0])
                out.num_output_tokens = int(result.as_numpy("num_output_tokens")[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
            if cancel_after_chunks is not None and len(out.chunks) >= cancel_after_chunks:
                client.stop_stream(cancel_requests=True)
                return out
    finally:
        client.stop_stream()
