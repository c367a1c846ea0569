"""Generation engine: one thread owns the model; `submit` only queues, so Triton's `execute` returns at once.

Each request becomes a `Sequence` that the loop advances token by token: sample, detokenise, check stop
conditions, stream the delta, check cancellation. Today the loop runs one sequence at a time; the
continuous-batching scheduler replaces `_run` and steps many sequences per forward through the same `Sequence`
and `ModelRunner` interfaces.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from backends.errors import Unavailable
from backends.llm.detokenizer import IncrementalDetokenizer
from backends.llm.params import GenerationRequest, SamplingParams, check_context_length
from backends.llm.runner import ModelRunner
from backends.llm.sampling import make_generator, sample_next_tokens

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_ABORT = "abort"  # the client cancelled


@dataclass
class GenerationChunk:
    text: str  # the new text (stream) or the whole completion (non-stream)
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int


class OutputSink(Protocol):
    """Where one request's results go (a Triton response sender in production)."""

    def send(self, chunk: GenerationChunk, final: bool) -> None: ...

    def fail(self, error: Exception) -> None: ...

    def is_cancelled(self) -> bool: ...


class EngineObserver(Protocol):
    def on_finished(self, finish_reason: str, num_input_tokens: int, num_output_tokens: int) -> None: ...

    def on_tokens(self, count: int) -> None: ...

    def on_queue(self, waiting: int, running: int) -> None: ...


class Sequence:
    """One request's generation state."""

    def __init__(self, request: GenerationRequest, tokenizer, eos_token_ids: set[int]):
        self.request = request
        self.params: SamplingParams = request.params
        self.generator = make_generator(self.params.seed)
        self.detok = IncrementalDetokenizer(tokenizer, self.params.stop)
        self.eos_token_ids = eos_token_ids
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.pending_text = ""  # non-stream: everything; stream: the delta since the last send

    def append(self, token_id: int) -> None:
        """Take one sampled token and decide whether the sequence is finished."""
        if token_id in self.eos_token_ids:
            self.finish_reason = FINISH_STOP
        else:
            self.output_ids.append(token_id)
            step = self.detok.add_token(token_id)
            self.pending_text += step.delta
            if step.stopped:
                self.finish_reason = FINISH_STOP
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = FINISH_LENGTH
        if self.finish_reason is not None:
            # Release text held back as a possible stop-string start (none is left after a real match).
            self.pending_text += self.detok.flush()

    def take_chunk(self) -> GenerationChunk:
        chunk = GenerationChunk(
            self.pending_text, self.finish_reason, len(self.request.prompt_token_ids), len(self.output_ids)
        )
        self.pending_text = ""
        return chunk


class LLMEngine:
    def __init__(
        self,
        runner: ModelRunner,
        default_max_tokens: int = 256,
        max_model_len: int | None = None,
        observer: EngineObserver | None = None,
    ):
        self.runner = runner
        self.default_max_tokens = default_max_tokens
        self.max_model_len = min(max_model_len or runner.max_model_len, runner.max_model_len)
        self._observer = observer
        self._queue: queue.Queue[tuple[GenerationRequest, OutputSink] | None] = queue.Queue()
        self._running = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # -- called from Triton's execute thread ------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Tokenise and check the context window now, so a bad request fails before it is queued."""
        request.prompt_token_ids = self.runner.encode(request.prompt)
        check_context_length(len(request.prompt_token_ids), request.params.max_tokens, self.max_model_len)
        return request

    def submit(self, request: GenerationRequest, sink: OutputSink) -> None:
        if self._closed:
            raise Unavailable("the model is shutting down; retry on another instance")
        self._queue.put((request, sink))
        self._report_queue()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- engine thread --------------------------------------------------------------------------------------
    def _report_queue(self) -> None:
        if self._observer:
            self._observer.on_queue(self._queue.qsize(), self._running)

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            item = self._queue.get()
            if item is None:
                break
            request, sink = item
            if self._closed:
                sink.fail(Unavailable("the model is shutting down; request not started"))
                continue
            self._running = 1
            self._report_queue()
            try:
                self._run(request, sink)
            except Exception as exc:  # a failed request must not take the engine down
                log.exception("request %s failed", request.request_id)
                sink.fail(exc)
            finally:
                self._running = 0
                self._report_queue()
        # Drain what arrived after shutdown began.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].fail(Unavailable("the model is shutting down; request not started"))

    def _run(self, request: GenerationRequest, sink: OutputSink) -> None:
        seq = Sequence(request, self.runner.tokenizer, self.runner.eos_token_ids)
        started = time.monotonic()
        if sink.is_cancelled():
            self._finish(seq, sink, FINISH_ABORT)
            return
        result = self.runner.prefill(request.prompt_token_ids)
        while True:
            token = sample_next_tokens(result.logits, [seq.params], [seq.generator])[0]
            seq.append(token)
            if self._observer:
                self._observer.on_tokens(1)
            if seq.finish_reason is not None:
                break
            if request.stream and seq.pending_text:
                sink.send(seq.take_chunk(), final=False)
            if sink.is_cancelled() or self._closed:
                seq.finish_reason = FINISH_ABORT
                break
            result = self.runner.decode(token, result.kv_cache)
        self._finish(seq, sink, seq.finish_reason)
        log.info(
            "request %s: %d prompt + %d generated tokens in %.2f s (%s)",
            request.request_id, len(request.prompt_token_ids), len(seq.output_ids),
            time.monotonic() - started, seq.finish_reason,
        )

    def _finish(self, seq: Sequence, sink: OutputSink, reason: str) -> None:
        seq.finish_reason = reason
        if reason == FINISH_ABORT:
            seq.pending_text = ""  # nobody is listening
        sink.send(seq.take_chunk(), final=True)
        if self._observer:
            self._observer.on_finished(reason, len(seq.request.prompt_token_ids), len(seq.output_ids))
