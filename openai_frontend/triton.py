"""Triton over `tritonclient.grpc.aio`: streamed text generation, image inference, repository index and model
control. Transport failures become 503 (Triton down or the model not ready); model errors keep their status."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from openai_frontend.errors import OpenAIError

log = logging.getLogger(__name__)

# Triton's gRPC status texts -> HTTP status (the backends set INVALID_ARG / NOT_FOUND / UNAVAILABLE).
_STATUS = {"StatusCode.INVALID_ARGUMENT": 400, "StatusCode.NOT_FOUND": 404, "StatusCode.UNAVAILABLE": 503,
           "StatusCode.UNIMPLEMENTED": 501, "StatusCode.RESOURCE_EXHAUSTED": 429}


def _http_status(exc: InferenceServerException) -> int:
    status = str(exc.status() or "")
    if status in _STATUS:
        return _STATUS[status]
    message = exc.message() or ""
    if "not found" in message.lower() and "LoRA" in message:
        return 404
    if any(s in message for s in ("failed to connect", "Socket closed", "unavailable", "Connection refused",
                                  "is not ready", "Request for unknown model")):
        return 503
    return 400


def to_openai_error(exc: Exception, model: str | None = None) -> OpenAIError:
    if isinstance(exc, InferenceServerException):
        status = _http_status(exc)
        message = exc.message() or str(exc)
        if status == 503:
            message = f"model '{model}' is not available: {message}" if model else f"Triton is unavailable: {message}"
        return OpenAIError(status, message)
    if isinstance(exc, (grpc.RpcError, ConnectionError, OSError)):
        return OpenAIError(503, f"Triton is unavailable: {exc}")
    raise exc


def _tensor(name: str, value, batched: bool = False) -> InferInput:
    """One input; `batched` adds the leading batch dimension of models with max_batch_size > 0."""
    if isinstance(value, str):
        array = np.array([value.encode()], dtype=np.object_)
    elif isinstance(value, list):
        array = np.array([v.encode() for v in value], dtype=np.object_)
    elif isinstance(value, bool):
        array = np.array([value], dtype=np.bool_)
    elif isinstance(value, int):
        array = np.array([value], dtype=np.int64 if name in ("seed", "lora_int_id") else np.int32)
    else:
        array = np.array([value], dtype=np.float32)
    if batched:
        array = array.reshape(1, -1)
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class TextChunk:
    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int


@dataclass
class Images:
    pngs: list[bytes]
    seed: int
    pipeline: str


@dataclass(frozen=True)
class ModelState:
    name: str
    state: str  # READY, UNAVAILABLE, ...
    reason: str = ""


class TritonGateway:
    def __init__(self, grpc_url: str):
        self.url = grpc_url
        self._client: grpcaio.InferenceServerClient | None = None

    @property
    def client(self) -> grpcaio.InferenceServerClient:
        if self._client is None:
            # A local subchannel pool: gRPC shares connections process-wide, so a fresh channel would otherwise
            # inherit the old one's reconnect backoff and keep failing for a while after Triton is back.
            self._client = grpcaio.InferenceServerClient(self.url, channel_args=[
                ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 1000),
            ])
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # a broken channel may fail to close; it is dropped either way
                log.debug("closing the Triton channel failed", exc_info=True)

    async def _failed(self, exc: Exception, model: str | None = None) -> OpenAIError:
        """Map the error; after a transport failure start a fresh channel next time, so that a restarted Triton
        is used at once instead of after gRPC's reconnect backoff."""
        error = to_openai_error(exc, model)
        if error.status == 503:
            await self.close()
        return error

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=2))
        except Exception as exc:  # any transport failure means "not ready", which is the answer
            log.info("Triton at %s is not ready: %s", self.url, exc)
            await self.close()
            return False

    async def index(self) -> list[ModelState]:
        try:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=5)
        except Exception as exc:
            raise await self._failed(exc) from None
        return [ModelState(m["name"], m.get("state", ""), m.get("reason", "")) for m in index.get("models", [])]

    async def config(self, model: str) -> dict:
        try:
            return (await self.client.get_model_config(model, as_json=True, client_timeout=5))["config"]
        except Exception as exc:
            raise await self._failed(exc, model) from None

    async def load(self, model: str) -> None:
        try:
            await self.client.load_model(model, client_timeout=600)
        except Exception as exc:
            raise await self._failed(exc, model) from None

    async def unload(self, model: str) -> None:
        try:
            await self.client.unload_model(model, client_timeout=60)
        except Exception as exc:
            raise await self._failed(exc, model) from None

    async def generate(self, model: str, fields: dict, parameters: dict) -> AsyncIterator[TextChunk]:
        """One streamed generation on a decoupled text model; yields chunks until Triton's final response.

        The stream is cancelled only when the consumer stops early: cancelling a stream whose request has already
        completed keeps the model referenced in Triton 2.51, and its unload then hangs until shutdown."""
        inputs = [_tensor(k, v) for k, v in fields.items() if v is not None]

        async def requests():
            yield {"model_name": model, "inputs": inputs,
                   "parameters": {**parameters, "triton_enable_empty_final_response": True}}

        stream = self.client.stream_infer(requests())
        try:
            async for result, error in stream:
                if error is not None:
                    raise await self._failed(error, model)
                final = result.get_response().parameters.get("triton_final_response")
                is_final = bool(final and final.bool_param)
                text = result.as_numpy("text_output")
                if text is not None:
                    reason = result.as_numpy("finish_reason").reshape(-1)[0].decode() or None
                    yield TextChunk(text.reshape(-1)[0].decode("utf-8", "replace"), reason,
                                    int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
                                    int(result.as_numpy("num_output_tokens").reshape(-1)[0]))
                if is_final:
                    break
        except OpenAIError:
            stream.cancel()
            raise
        except BaseException as exc:
            stream.cancel()  # the caller went away (or the transport failed): stop the generation
            if isinstance(exc, Exception):
                raise await self._failed(exc, model) from None
            raise

    async def images(self, model: str, fields: dict, parameters: dict) -> Images:
        """One request to a diffusion model (inputs of shape [1, 1]; LoRA fields as request parameters so that
        requests for different adapters share a batch)."""
        inputs = [_tensor(k, v, batched=True) for k, v in fields.items() if v is not None]
        try:
            result = await self.client.infer(model, inputs, parameters=parameters or None, client_timeout=3600)
        except Exception as exc:
            raise await self._failed(exc, model) from None
        return Images([bytes(b) for b in result.as_numpy("images").reshape(-1)],
                      int(result.as_numpy("seed").reshape(-1)[0]),
                      bytes(result.as_numpy("pipeline").reshape(-1)[0]).decode())
