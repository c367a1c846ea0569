"""Triton request tensors -> Python values, and our typed errors -> `pb_utils.TritonError` with the right code.

Only imported inside the Triton Python-backend stub, where `triton_python_backend_utils` exists.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.errors import BackendError, InvalidArgument, NotFound, Unavailable
from backends.lora.manager.request import LoRAFields, fields_from_lists, parameter_list
from backends.protocol import INTERNAL_PREFIX, PROBE_PARAMETER, UNAVAILABLE_PREFIX


def _array(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _one(array: np.ndarray, name: str) -> Any:
    if array.size != 1:
        raise InvalidArgument(f"input '{name}' must hold exactly one value, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _text(raw: Any, name: str) -> str:
    if not isinstance(raw, (bytes, np.bytes_)):
        return str(raw)
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"input '{name}' is not valid UTF-8: {exc}") from None


def get_string(request, name: str) -> str | None:
    array = _array(request, name)
    return None if array is None else _text(_one(array, name), name)


def get_strings(request, name: str) -> list[str] | None:
    array = _array(request, name)
    return None if array is None else [_text(v, name) for v in array.reshape(-1)]


def get_int(request, name: str) -> int | None:
    array = _array(request, name)
    return None if array is None else int(_one(array, name))


def get_ints(request, name: str) -> list[int] | None:
    array = _array(request, name)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def get_float(request, name: str) -> float | None:
    array = _array(request, name)
    return None if array is None else float(_one(array, name))


def get_floats(request, name: str) -> list[float] | None:
    array = _array(request, name)
    return None if array is None else [float(v) for v in array.reshape(-1)]


def get_bool(request, name: str) -> bool | None:
    array = _array(request, name)
    return None if array is None else bool(_one(array, name))


def request_parameters(request) -> dict[str, Any]:
    """Triton request parameters (JSON), e.g. `perf_analyzer --request-parameter lora_name:x:string`."""
    raw = request.parameters()
    if not raw:
        return {}
    try:
        params = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except (ValueError, TypeError):
        raise InvalidArgument("request parameters are not a JSON object") from None
    return params if isinstance(params, dict) else {}


def is_probe(request) -> bool:
    """A supervisor's liveness probe (request parameter `multilora_probe`): answered at once, no model work."""
    try:
        return bool(request_parameters(request).get(PROBE_PARAMETER))
    except InvalidArgument:
        return False


def get_lora_stack(request) -> list[LoRAFields]:
    """The LoRA contract (see `backends.lora.manager.request`): input tensors first, then request parameters of
    the same names (vllm_backend style), each a list for a LoRA stack."""
    params = request_parameters(request)

    def values(name: str, read, kind: type, nullable: bool = False) -> list | None:
        found = read(request, name)
        return found if found is not None else parameter_list(params, name, kind, nullable)

    return fields_from_lists(values("lora_name", get_strings, str), values("lora_path", get_strings, str),
                             values("lora_scale", get_floats, float), values("lora_int_id", get_ints, int, True))


def get_lora_fields(request) -> LoRAFields:
    """One adapter or none, for models that serve no LoRA stacks (the PEFT baselines of the benchmarks)."""
    stack = get_lora_stack(request)
    if len(stack) > 1:
        raise InvalidArgument(f"{len(stack)} LoRA adapters in one request: this model serves one at a time")
    return stack[0] if stack else LoRAFields()


def string_tensor(name: str, value: str) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))


def array_tensor(name: str, values, dtype) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.asarray(values, dtype=dtype))


def int_tensor(name: str, value: int) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([value], dtype=np.int32))


_CODES = {
    InvalidArgument: "INVALID_ARG",
    NotFound: "NOT_FOUND",
}


def to_triton_error(exc: Exception) -> "pb_utils.TritonError":
    """Our errors keep their message and get their code; anything else is an INTERNAL error naming its type."""
    if isinstance(exc, Unavailable):
        return pb_utils.TritonError(UNAVAILABLE_PREFIX + str(exc), pb_utils.TritonError.UNAVAILABLE)
    for cls, code in _CODES.items():
        if isinstance(exc, cls):
            return pb_utils.TritonError(str(exc), getattr(pb_utils.TritonError, code))
    message = str(exc) if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
    return pb_utils.TritonError(INTERNAL_PREFIX + message, pb_utils.TritonError.INTERNAL)


def send_error(response_sender, exc: Exception) -> None:
    response_sender.send(
        pb_utils.InferenceResponse(output_tensors=[], error=to_triton_error(exc)),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )
