"""Client helpers for the `diffusion` Triton model (tritonclient HTTP /infer: the model is not decoupled); used by
scripts/verify_lora.py, the benchmarks and the tests."""

from __future__ import annotations

import io
import json

import numpy as np
import tritonclient.http as httpclient
from PIL import Image

_INT64 = {"seed", "lora_int_id"}
LORA_FIELDS = ("lora_name", "lora_path", "lora_scale", "lora_int_id")


def image_inputs(prompt: str | None = "a red cat", lora_as_tensors: bool = False, **fields) -> tuple[list, dict]:
    """Triton inputs of shape [1, 1] for every field given (None = left out; a list of k LoRA values, a stack:
    [1, k]), and request parameters.

    LoRA fields go in request parameters unless `lora_as_tensors`: Triton's dynamic batcher only batches requests
    that carry the same set of input tensors, and parameters do not count, so requests for different adapters (or
    none) still share a batch."""
    values = {"prompt": prompt, **fields}
    parameters = {}
    if not lora_as_tensors:  # a list (a LoRA stack) travels as a JSON array in a string
        parameters = {k: json.dumps(v) if isinstance(v, list) else v
                      for k in LORA_FIELDS if (v := values.pop(k, None)) is not None}
    inputs = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):  # a LoRA stack as tensors: [1, k]
            kind = "BYTES" if isinstance(value[0], str) else "INT64" if name in _INT64 else "FP32"
            array = np.array([[v.encode() if isinstance(v, str) else v for v in value]],
                             dtype={"BYTES": np.object_, "INT64": np.int64, "FP32": np.float32}[kind])
        elif isinstance(value, str):
            array, kind = np.array([[value.encode()]], dtype=np.object_), "BYTES"
        elif name in _INT64:
            array, kind = np.array([[value]], dtype=np.int64), "INT64"
        elif isinstance(value, float):
            array, kind = np.array([[value]], dtype=np.float32), "FP32"
        else:
            array, kind = np.array([[value]], dtype=np.int32), "INT32"
        tensor = httpclient.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs, parameters


def generate(client, model: str = "diffusion", prompt: str | None = "a red cat", lora_as_tensors: bool = False,
             **fields):
    """PNG bytes list, seed used, pipeline name; raises InferenceServerException on a model error."""
    inputs, parameters = image_inputs(prompt, lora_as_tensors, **fields)
    return decode(client.infer(model, inputs, parameters=parameters or None))


def decode(result) -> tuple[list[bytes], int, str]:
    images = [bytes(b) for b in result.as_numpy("images").reshape(-1)]
    seed = int(result.as_numpy("seed").reshape(-1)[0])
    pipeline = bytes(result.as_numpy("pipeline").reshape(-1)[0]).decode()
    return images, seed, pipeline


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
