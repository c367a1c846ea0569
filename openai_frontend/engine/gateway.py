"""`TritonGateway`: Triton over `tritonclient.grpc.aio`: streamed text generation, image inference, repository
index and model control. `classify` decides what every error means: transport failures become 503 (Triton down
or the model not ready) and a fresh channel, a dead model is reported to the supervisor, model errors keep their
status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from backends.protocol import INTERNAL_PREFIX, UNAVAILABLE_PREFIX
from openai_frontend.errors import OpenAIError

log = logging.getLogger(__name__)
T = TypeVar("T")
ADMIN_HEADER = "multilora-admin-key"  # see scripts/serve: Triton's restricted-API key for model control

# Triton's gRPC status texts -> HTTP status (the backends set INVALID_ARG / NOT_FOUND / UNAVAILABLE / INTERNAL).
_STATUS = {"StatusCode.INVALID_ARGUMENT": 400, "StatusCode.NOT_FOUND": 404, "StatusCode.UNAVAILABLE": 503,
           "StatusCode.UNIMPLEMENTED": 501, "StatusCode.RESOURCE_EXHAUSTED": 429, "StatusCode.INTERNAL": 500,
           "StatusCode.UNKNOWN": 500, "StatusCode.DEADLINE_EXCEEDED": 504, "StatusCode.CANCELLED": 499}
# Messages that mean "the model (or Triton) cannot serve now, retry": stream errors carry no status code.
_RETRYABLE = ("failed to connect", "Socket closed", "unavailable", "Connection refused", "is not ready",
              "Request for unknown model", "is not healthy", "Stub process", "shutting down")
# A model's process is gone (Triton: the Python stub died) or cannot generate any more (our engine thread died):
# the supervisor reloads it.
_DEAD = ("is not healthy", "engine stopped")
# Transport failures: the channel itself is broken and a fresh one is needed (model errors are not).
_TRANSPORT = ("failed to connect", "Socket closed", "Connection refused", "Connection reset", "connections to all "
              "backends failing", "GOAWAY", "Broken pipe")


@dataclass(frozen=True)
class Failure:
    """What an error on the way to Triton means, decided in one place (`classify`)."""

    status: int  # the client's HTTP status
    transport: bool = False  # the channel itself broke: the next call needs a fresh one
    dead: bool = False  # the model's process died or its engine stopped: the supervisor reloads it


def _status(exc: InferenceServerException) -> int:
    status = str(exc.status() or "")
    message = exc.message() or ""
    if message.startswith(UNAVAILABLE_PREFIX) or any(s in message for s in _RETRYABLE):
        return 503
    if message.startswith(INTERNAL_PREFIX):
        return 500
    if status in _STATUS:
        return _STATUS[status]
    if "not found" in message.lower() and "LoRA" in message:
        return 404
    return 400  # a stream error without status: the backends' remaining errors are the request's fault


def classify(exc: Exception) -> Failure | None:
    """A Triton or transport error's meaning; None for anything else (a bug of ours, raised as is).

    Stream errors carry only a message, so the backends' prefixes (`backends.protocol`) and Triton's own texts
    are read here, and only here."""
    if isinstance(exc, InferenceServerException):
        message = exc.message() or ""
        return Failure(_status(exc), transport=any(s in message for s in _TRANSPORT),
                       dead=any(s in message for s in _DEAD))
    if isinstance(exc, (grpc.RpcError, ConnectionError, OSError)):
        return Failure(503, transport=True)
    return None


def to_openai_error(exc: Exception, model: str | None = None) -> OpenAIError:
    failure = classify(exc)
    if failure is None:
        raise exc
    if not isinstance(exc, InferenceServerException):
        return OpenAIError(503, f"Triton is unavailable: {exc}", headers={"Retry-After": "1"})
    message = exc.message() or str(exc)
    if failure.status == 503:
        message = f"model '{model}' is not available: {message}" if model else f"Triton is unavailable: {message}"
    elif failure.status == 500:
        message = f"model '{model}' failed: {message}" if model else message
    return OpenAIError(failure.status, message, headers={"Retry-After": "1"} if failure.status == 503 else None)


def _ints(name: str, values: list[int], dtype) -> np.ndarray:
    """Integers for an input of `dtype`; one out of its range is the request's fault (400), not an overflow."""
    info = np.iinfo(dtype)
    bad = next((v for v in values if not info.min <= v <= info.max), None)
    if bad is not None:
        raise OpenAIError(400, f"'{name}' must be between {info.min} and {info.max}, got {bad}", name)
    return np.array(values, dtype=dtype)


def _tensor(name: str, value, batched: bool = False) -> InferInput:
    """One input; `batched` adds the leading batch dimension of models with max_batch_size > 0."""
    if isinstance(value, str):
        array = np.array([value.encode()], dtype=np.object_)
    elif isinstance(value, list) and name == "input_ids":
        array = _ints(name, value, np.int32)
    elif isinstance(value, list):
        array = np.array([v.encode() for v in value], dtype=np.object_)
    elif isinstance(value, bool):
        array = np.array([value], dtype=np.bool_)
    elif isinstance(value, int):
        array = _ints(name, [value], np.int64 if name in ("seed", "lora_int_id") else np.int32)
    else:
        array = np.array([value], dtype=np.float32)
    if batched:
        array = array.reshape(1, -1)
    tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass(frozen=True)
class Logprobs:
    """Per-token log-probabilities from the backend: ids, logprob (None: a prompt's first token), top-N pairs."""

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]

    @classmethod
    def read(cls, result, prefix: str = "") -> "Logprobs | None":
        ids = result.as_numpy(f"{prefix}token_ids")
        if ids is None:
            return None
        values = result.as_numpy(f"{prefix}token_logprobs").reshape(-1).tolist()
        top_ids, top_values = result.as_numpy(f"{prefix}top_token_ids"), result.as_numpy(f"{prefix}top_token_logprobs")
        top = ([[(int(i), float(v)) for i, v in zip(row_i, row_v) if i >= 0]
                for row_i, row_v in zip(top_ids.tolist(), top_values.tolist())]
               if top_ids is not None else [[] for _ in values])
        return cls([int(i) for i in ids.reshape(-1)], [None if v != v else float(v) for v in values], top)

    def __add__(self, other: "Logprobs") -> "Logprobs":
        return Logprobs(self.token_ids + other.token_ids, self.logprobs + other.logprobs, self.top + other.top)


@dataclass
class TextChunk:
    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    logprobs: Logprobs | None = None  # the generated tokens of this chunk, when asked for
    prompt_logprobs: Logprobs | None = None  # the prompt's tokens, in the first chunk, when asked for


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


class _Channel:
    """One gRPC channel and the calls running on it: a channel retired after a transport failure is closed only
    when its last call ends, so replacing it never cancels another user's request."""

    def __init__(self, client: grpcaio.InferenceServerClient):
        self.client = client
        self.active = 0
        self.retired = False

    async def close(self) -> None:
        try:
            await self.client.close()
        except Exception:  # a broken channel may fail to close; it is dropped either way
            log.debug("closing a Triton channel failed", exc_info=True)


class TritonGateway:
    def __init__(self, grpc_url: str, admin_key: str | None = None):
        self.url = grpc_url
        self._channel: _Channel | None = None
        # Sent on model-repository calls: Triton restricts that API to this header when scripts/serve exposes it.
        # (Triton 2.51 expects restricted gRPC protocols' headers with the prefix `triton-grpc-protocol-`.)
        self._admin_headers = {f"triton-grpc-protocol-{ADMIN_HEADER}": admin_key} if admin_key else None
        self._dead: dict[str, asyncio.Future] = {}  # per model: resolved when its process is found dead
        self.on_model_dead: Callable[[str, str], None] | None = None  # the supervisor listens here

    def _dead_signal(self, model: str) -> asyncio.Future:
        signal = self._dead.get(model)
        if signal is None or signal.done():
            signal = self._dead[model] = asyncio.get_running_loop().create_future()
        return signal

    def model_died(self, model: str, reason: str) -> None:
        """End every request in flight on `model` at once with a retryable 503 (Triton never answers them)."""
        signal = self._dead.pop(model, None)
        if signal is not None and not signal.done():
            signal.set_result(reason)

    @staticmethod
    async def _unless_dead(work: Awaitable[T], dead: asyncio.Future, model: str) -> T:
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        raise OpenAIError(503, f"model '{model}' is not available: its process stopped while serving this request "
                               f"({dead.result()}); it is being restarted, retry", headers={"Retry-After": "5"})

    def _current(self) -> _Channel:
        if self._channel is None:
            # A local subchannel pool: gRPC shares connections process-wide, so a fresh channel would otherwise
            # inherit the old one's reconnect backoff and keep failing for a while after Triton is back.
            self._channel = _Channel(grpcaio.InferenceServerClient(self.url, channel_args=[
                ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1), ("grpc.max_reconnect_backoff_ms", 1000),
            ]))
        return self._channel

    @contextlib.asynccontextmanager
    async def _use(self) -> AsyncIterator[_Channel]:
        channel = self._current()
        channel.active += 1
        try:
            yield channel
        finally:
            channel.active -= 1
            if channel.retired and channel.active == 0:
                await channel.close()

    async def _retire(self, channel: _Channel) -> None:
        if self._channel is channel:
            self._channel = None
        if not channel.retired:
            channel.retired = True
            log.info("Triton at %s: transport failure, using a fresh channel from now on", self.url)
            if channel.active == 0:
                await channel.close()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.retired = True
            await channel.close()

    async def _failed(self, exc: Exception, channel: _Channel, model: str | None = None) -> OpenAIError:
        """Map the error; after a transport failure (only) start a fresh channel next time, so that a restarted
        Triton is used at once instead of after gRPC's reconnect backoff. A dead model is reported."""
        failure = classify(exc)
        if failure is not None and failure.transport:
            await self._retire(channel)
        if model and self.on_model_dead is not None and failure is not None and failure.dead:
            self.on_model_dead(model, exc.message())
        return to_openai_error(exc, model)

    async def ready(self) -> bool:
        async with self._use() as channel:
            try:
                return bool(await channel.client.is_server_ready(client_timeout=2))
            except Exception as exc:  # any failure means "not ready", which is the answer
                log.info("Triton at %s is not ready: %s", self.url, exc)
                failure = classify(exc)
                if failure is not None and failure.transport:
                    await self._retire(channel)
                return False

    async def _call(self, method: str, *args, model: str | None = None, **kwargs):
        async with self._use() as channel:
            try:
                work = getattr(channel.client, method)(*args, **kwargs)
                if method == "infer":
                    return await self._unless_dead(work, self._dead_signal(model), model)
                return await work
            except OpenAIError:
                raise
            except Exception as exc:
                raise await self._failed(exc, channel, model) from None

    async def index(self) -> list[ModelState]:
        index = await self._call("get_model_repository_index", as_json=True, headers=self._admin_headers,
                                 client_timeout=5)
        return [ModelState(m["name"], m.get("state", ""), m.get("reason", "")) for m in index.get("models", [])]

    async def config(self, model: str) -> dict:
        return (await self._call("get_model_config", model, as_json=True, client_timeout=5, model=model))["config"]

    async def load(self, model: str) -> None:
        await self._call("load_model", model, headers=self._admin_headers, client_timeout=600, model=model)

    async def unload(self, model: str) -> None:
        await self._call("unload_model", model, headers=self._admin_headers, client_timeout=60, model=model)

    async def generate(self, model: str, fields: dict, parameters: dict) -> AsyncIterator[TextChunk]:
        """One streamed generation on a decoupled text model; yields chunks until Triton's final response.

        The stream is cancelled only when the consumer stops early: cancelling a stream whose request has already
        completed keeps the model referenced in Triton 2.51, and its unload then hangs until shutdown."""
        inputs = [_tensor(k, v) for k, v in fields.items() if v is not None]

        async def requests():
            yield {"model_name": model, "inputs": inputs,
                   "parameters": {**parameters, "triton_enable_empty_final_response": True}}

        async with self._use() as channel:
            dead = self._dead_signal(model)
            complete = False
            stream = channel.client.stream_infer(requests())
            responses = stream.__aiter__()
            try:
                while True:
                    try:
                        result, error = await self._unless_dead(responses.__anext__(), dead, model)
                    except StopAsyncIteration:
                        break
                    if error is not None:  # a final error response: the request is over, nothing to cancel
                        complete = True
                        raise await self._failed(error, channel, model)
                    final = result.get_response().parameters.get("triton_final_response")
                    is_final = bool(final and final.bool_param)
                    text = result.as_numpy("text_output")
                    if text is not None:
                        reason = result.as_numpy("finish_reason").reshape(-1)[0].decode() or None
                        yield TextChunk(text.reshape(-1)[0].decode("utf-8", "replace"), reason,
                                        int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
                                        int(result.as_numpy("num_output_tokens").reshape(-1)[0]),
                                        Logprobs.read(result), Logprobs.read(result, "prompt_"))
                    if is_final:
                        return
            except OpenAIError:
                if not complete:  # the model died under it: stop the stream
                    stream.cancel()
                raise
            except BaseException as exc:
                stream.cancel()  # the caller went away (or the transport failed): stop the generation
                if isinstance(exc, Exception):
                    raise await self._failed(exc, channel, model) from None
                raise
            # The stream ended without Triton's final response: the model's process went away mid-request.
            raise OpenAIError(503, f"model '{model}' is not available: the generation stream ended before its "
                                   f"final response (the model process may have died); retry",
                              headers={"Retry-After": "1"})

    async def images(self, model: str, fields: dict, parameters: dict) -> Images:
        """One request to a diffusion model (inputs of shape [1, 1]; LoRA fields as request parameters so that
        requests for different adapters share a batch)."""
        inputs = [_tensor(k, v, batched=True) for k, v in fields.items() if v is not None]
        result = await self._call("infer", model, inputs, parameters=parameters or None, client_timeout=3600,
                                  model=model)
        return Images([bytes(b) for b in result.as_numpy("images").reshape(-1)],
                      int(result.as_numpy("seed").reshape(-1)[0]),
                      bytes(result.as_numpy("pipeline").reshape(-1)[0]).decode())
