"""Continuous-batching generation engine: one thread owns the model; `submit` only queues.

Every step the engine admits waiting requests (see `scheduler.py`), prefills the new ones in one left-padded
forward, then decodes one token for every running sequence in one batched forward with mixed LoRA adapters. Each
row samples with its own parameters and generator, streams its text, and leaves the batch as soon as it finishes
or its client cancels (its KV-cache slot and LoRA slot are freed at once, nobody else's cache moves).

Failures are contained: an error while prefilling fails the requests being admitted, an error while decoding
fails the running batch, a row with non-finite logits fails alone; each gets one final error response and gives
back its LoRA and KV slots, and the engine keeps serving. If the engine thread itself dies, every request it holds
is failed, `submit` refuses new work at once (UNAVAILABLE) and `on_dead` is told.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Callable, Protocol, TypeVar

import torch

from backends.errors import InternalError, InvalidArgument, Unavailable
from backends.llm.detokenizer import IncrementalDetokenizer
from backends.llm.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from backends.llm.params import GenerationRequest, SamplingParams, check_context_length
from backends.llm.runner import ModelRunner
from backends.llm.sampling import make_generator, sample_next_tokens
from backends.llm.scheduler import Scheduler, SchedulerLimits
from backends.lora.manager.cache import LoRACache, NoFreeSlot
from backends.lora.manager.request import AdapterRef
from backends.lora.ops.batch import RowLoRA

log = logging.getLogger(__name__)
T = TypeVar("T")

FINISH_STOP = "stop"  # EOS or a stop string
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_ABORT = "abort"  # the client cancelled
FINISH_ERROR = "error"  # failed with an error response (metrics only)
# Prefills that score prompts (echo + logprobs) hold every position's logits at once: at most this many bytes
# (a longer prompt is refused up front; several shorter ones share a prefill while they fit).
PROMPT_LOGITS_BYTES = 1 << 30


@dataclass
class GenerationChunk:
    text: str  # the new text (stream) or the whole completion (non-stream)
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    token_ids: tuple[int, ...] = ()  # the generated ids this chunk covers (EOS excluded)
    logprobs: tuple[TokenLogprob, ...] = ()  # with `logprobs`: one per generated token of this chunk, EOS included
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # with `prompt_logprobs`: in the first chunk


class OutputSink(Protocol):
    """Where one request's results go (a Triton response sender in production)."""

    def send(self, chunk: GenerationChunk, final: bool) -> None: ...

    def fail(self, error: Exception) -> None: ...

    def is_cancelled(self) -> bool: ...


class EngineObserver(Protocol):
    def on_finished(self, finish_reason: str, num_input_tokens: int, num_output_tokens: int) -> None: ...

    def on_tokens(self, count: int) -> None: ...

    def on_queue(self, waiting: int, running: int, kv_usage: float) -> None: ...

    def on_lora(self, cache: LoRACache, running: list[AdapterRef], waiting: list[AdapterRef]) -> None:
        """After every step: the cache, and one adapter ref per request and adapter running / waiting."""


class Sequence:
    """One request's generation state."""

    def __init__(self, request: GenerationRequest, sink: OutputSink, tokenizer, eos_token_ids: set[int],
                 device: torch.device):
        self.request = request
        self.sink = sink
        self.params: SamplingParams = request.params
        self.generator = None if self.params.greedy else make_generator(self.params.seed, device)
        self.detok = IncrementalDetokenizer(tokenizer, self.params.stop)
        self.eos_token_ids = eos_token_ids
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.pending_text = ""  # non-stream: everything; stream: the delta since the last send
        self._sent_ids = 0  # output_ids already covered by a sent chunk
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.adapter_keys = frozenset(selection.ref.key for selection in request.lora)
        self.bypassed_steps = 0
        self.row_lora = RowLoRA()
        self.kv_slot = -1  # its KV-cache slot while admitted
        self.cached = 0  # tokens in that slot = the position of the next token fed to the model
        self.started = time.monotonic()
        self.error: Exception | None = None  # set when this row failed; the engine retires it with the error
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_entries: tuple[TokenLogprob, ...] | None = None  # sent once, with the next chunk
        self.done = False  # the final response (or error) was sent: nothing more may go to the sink

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
        chunk = GenerationChunk(self.pending_text, self.finish_reason, self.num_prompt_tokens, len(self.output_ids),
                                tuple(self.output_ids[self._sent_ids:]), tuple(self.pending_logprobs),
                                self.prompt_entries)
        self.pending_text, self._sent_ids = "", len(self.output_ids)
        self.pending_logprobs, self.prompt_entries = [], None
        return chunk

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


def _adapter_refs(seqs: "list[Sequence] | deque[Sequence]") -> list[AdapterRef]:
    """One ref per sequence and adapter: a LoRA stack counts for each of its adapters."""
    return [selection.ref for seq in seqs for selection in seq.request.lora]


@dataclass
class _Call:
    fn: Callable[[], object]
    future: Future

    def run(self) -> None:
        try:
            self.future.set_result(self.fn())
        except BaseException as exc:
            self.future.set_exception(exc)


class LLMEngine:
    def __init__(
        self,
        setup: Callable[["LLMEngine"], tuple[ModelRunner, LoRACache | None]],
        default_max_tokens: int = 256,
        observer: EngineObserver | None = None,
        limits: SchedulerLimits = SchedulerLimits(),
        load_timeout: float = 600.0,
        on_dead: Callable[[BaseException], None] | None = None,
    ):
        """`setup` runs on the engine thread and returns the runner and the LoRA cache (None = no LoRA).

        All torch work happens on that one thread: measured here (2 cores), once a second thread has run torch
        parallel regions, every forward on the engine thread runs ~1.6x slower (each thread gets its own OpenMP
        pool and they fight over the cores). Other threads hand their torch work over with `call`."""
        self.default_max_tokens = default_max_tokens
        self._limits = limits
        self._observer = observer
        self._queue: queue.Queue[Sequence | _Call | None] = queue.Queue()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._closed = False
        self._dead: BaseException | None = None  # why the engine thread stopped serving, once it has
        self._on_dead = on_dead
        self._accept_lock = threading.Lock()  # orders `submit` against the thread's death
        self._admitting: list[Sequence] = []  # admitted this step, not yet running (failed with the step)
        self._stalled = False  # requests wait but none could be admitted: wait for news instead of spinning
        self._setup_done: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(setup,), name="llm-engine", daemon=True)
        self._thread.start()
        self._setup_done.result(timeout=load_timeout)  # re-raises a failed model/adapter load

    def _main(self, setup) -> None:
        torch.set_grad_enabled(False)
        try:
            self.runner, self.lora_cache = setup(self)
            self.max_model_len = self.runner.max_model_len
            fits = self.lora_cache.fits if self.lora_cache else (lambda adapters: not adapters)
            # A running sequence holds a KV slot: the budget may allow fewer than max_num_seqs; the rest wait.
            self._limits = replace(self._limits, max_num_seqs=min(self._limits.max_num_seqs, self.runner.kv.num_slots))
            self.scheduler = Scheduler(self._limits, fits)
        except BaseException as exc:
            self._setup_done.set_exception(exc)
            return
        self._setup_done.set_result(None)
        try:
            self._loop()
        except BaseException as exc:  # a bug outside the per-step handling: stop taking work, fail what is held
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        log.critical("the engine thread stopped: %s: %s; failing every request it holds", type(exc).__name__, exc,
                     exc_info=exc)
        with self._accept_lock:
            self._dead = exc
        error = Unavailable(f"the model's engine stopped ({self.death_reason}); retry after the model reloads")
        for seq in [*self._running, *self._admitting, *self._waiting]:
            self._fail(seq, error)
        self._running, self._admitting = [], []
        self._waiting.clear()
        self._drain(error)
        if self._on_dead is not None:
            try:
                self._on_dead(exc)
            except Exception:
                log.exception("on_dead callback failed")

    def _drain(self, error: Exception) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                item.future.set_exception(error)
            elif item is not None:
                self._fail(item, error)

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closed

    @property
    def death_reason(self) -> str:
        return f"{type(self._dead).__name__}: {self._dead}" if self._dead is not None else ""

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread (between steps) and return its result; direct when already there."""
        if threading.current_thread() is self._thread:
            return fn()
        task = _Call(fn, Future())
        self._enqueue(task)
        return task.future.result()

    def _enqueue(self, item: "Sequence | _Call") -> None:
        with self._accept_lock:  # after `_die` took the lock nothing more is queued, so nothing is stranded
            if self._dead is not None:
                raise Unavailable(f"the model's engine stopped ({self.death_reason}); retry after the model "
                                  f"reloads")
            if self._closed:
                raise Unavailable("the model is shutting down; retry on another instance")
            self._queue.put(item)

    # -- called from Triton's execute thread ------------------------------------------------------------------
    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Tokenise (unless the client sent token ids) and check the context window now, so a bad request fails
        before it is queued."""
        if request.prompt_token_ids:
            vocab = self.runner.vocab_size
            bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidArgument(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        else:
            request.prompt_token_ids = self.runner.encode(request.prompt)
        if not request.prompt_token_ids:
            raise InvalidArgument("the prompt has no tokens")
        if request.params.prompt_logprobs is not None:
            need = len(request.prompt_token_ids) * self.runner.logits_bytes_per_token
            if need > PROMPT_LOGITS_BYTES:
                raise InvalidArgument(
                    f"scoring a prompt of {len(request.prompt_token_ids)} tokens needs {need >> 20} MiB of logits, "
                    f"over the {PROMPT_LOGITS_BYTES >> 20} MiB limit; send at most "
                    f"{PROMPT_LOGITS_BYTES // self.runner.logits_bytes_per_token} tokens")
        check_context_length(len(request.prompt_token_ids), request.params.max_tokens, self.max_model_len)
        return request

    def submit(self, request: GenerationRequest, sink: OutputSink) -> None:
        if request.lora and self.lora_cache is None:
            raise Unavailable("LoRA is disabled for this model (max_loras is 0)")
        self._enqueue(Sequence(request, sink, self.runner.tokenizer, self.runner.eos_token_ids, self.runner.device))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # -- engine thread --------------------------------------------------------------------------------------
    def _report_queue(self) -> None:
        try:
            self._observe_queue()
        except Exception:  # metrics must never take the engine down
            log.exception("reporting engine metrics failed")

    def _observe_queue(self) -> None:
        if self._observer:
            running = [*self._running, *self._admitting]
            # The adapters first: once the queue gauges read idle, the adapter lists do too.
            if self.lora_cache is not None:
                self._observer.on_lora(self.lora_cache, _adapter_refs(running), _adapter_refs(self._waiting))
            self._observer.on_queue(len(self._waiting) + self._queue.qsize(), len(running), self.runner.kv.usage)

    def _pull_requests(self) -> bool:
        """Move queued requests to `waiting` and run handed-over calls, blocking while there is nothing to do.
        False once shut down."""
        if self._running or (self._waiting and not self._stalled):
            block, timeout = False, None
        else:  # idle: sleep until work arrives; stalled: wake now and then to notice cancelled waiters
            block, timeout = True, (0.1 if self._waiting else None)
        while True:
            try:
                item = self._queue.get(block=block, timeout=timeout)
            except queue.Empty:
                return True
            if item is None:
                return False
            if isinstance(item, _Call):
                item.run()
                continue
            self._waiting.append(item)
            block = False

    def _loop(self) -> None:
        while self._pull_requests() and not self._closed:
            try:
                self._step()
            except Exception as exc:  # a failed step fails its batch, never the engine
                involved = [*self._admitting, *self._running]
                log.exception("engine step failed; failing its %d requests", len(involved))
                error = InternalError(f"generation failed: {type(exc).__name__}: {exc}")
                for seq in involved:
                    self._fail(seq, error)
                self._running, self._admitting = [], []
            self._report_queue()
        with self._accept_lock:
            self._closed = True
        error = Unavailable("the model is shutting down; request not finished")
        for seq in [*self._running, *self._waiting]:
            self._fail(seq, error)
        self._drain(error)

    def _step(self) -> None:
        for seq in [s for s in self._waiting if s.sink.is_cancelled()]:
            self._waiting.remove(seq)
            self._finish(seq, FINISH_ABORT)
        admitted = self._admitting = self._admit()
        self._stalled = bool(self._waiting) and not admitted and not self._running
        if admitted:
            self._report_queue()  # they run from now on: a router sees them before their first token goes out
            scoring = any(s.params.prompt_logprobs is not None for s in admitted)
            try:
                logits = self.runner.prefill([s.request.prompt_token_ids for s in admitted],
                                             [s.kv_slot for s in admitted], [s.row_lora for s in admitted],
                                             all_positions=scoring)
            except Exception as exc:  # only the new requests fail; the running batch goes on
                log.exception("prefill of %d requests failed", len(admitted))
                error = InternalError(f"prefill failed: {type(exc).__name__}: {exc}")
                for seq in admitted:
                    self._fail(seq, error)
            else:
                for row, seq in enumerate(admitted):
                    seq.cached = seq.num_prompt_tokens
                    if seq.params.prompt_logprobs is not None:  # left-padded: the prompt is the last columns
                        seq.prompt_entries = tuple(prompt_logprobs(
                            logits[row, -seq.num_prompt_tokens:], seq.request.prompt_token_ids,
                            seq.params.prompt_logprobs))
                    if seq.params.max_tokens == 0:  # scoring only: nothing to generate
                        seq.finish_reason = FINISH_LENGTH
                last = logits[:, -1] if scoring else logits
                sampled = [row for row, seq in enumerate(admitted) if seq.finish_reason is None]
                if sampled:
                    self._sample([admitted[row] for row in sampled],
                                 last if len(sampled) == len(admitted) else last[sampled])
                self._running.extend(admitted)
            self._admitting = []
            self._retire()
        if self._running:
            running = self._running
            logits = self.runner.decode([s.kv_slot for s in running], [s.last_token for s in running],
                                        [s.cached for s in running], [s.row_lora for s in running])
            for seq in running:
                seq.cached += 1
            self._sample(running, logits)
            self._retire()

    def _admit(self) -> list[Sequence]:
        chosen = self._bound_prompt_logits(self.scheduler.admit(self._waiting, self._running))
        admitted = []
        for seq in chosen:
            seq.kv_slot = self.runner.kv.allocate()
            if seq.kv_slot is None:  # the scheduler's limit keeps this from happening; never overrun the cache
                seq.kv_slot = -1
                break
            lora = seq.request.lora
            if lora:
                try:
                    slots = self.lora_cache.acquire([selection.ref for selection in lora])
                except NoFreeSlot:
                    self._release(seq)
                    continue  # slots pinned elsewhere; it stays waiting
                except Exception as exc:  # e.g. the adapter file vanished since validation
                    self._waiting.remove(seq)
                    self._fail(seq, exc)
                    continue
                seq.row_lora = RowLoRA.stack([(slot, selection.scale) for slot, selection in zip(slots, lora)])
            self._waiting.remove(seq)
            admitted.append(seq)
        return admitted

    def _bound_prompt_logits(self, chosen: list[Sequence]) -> list[Sequence]:
        """A prefill that scores prompts keeps the logits of every position (rows x width x vocab floats): admit
        only as many as PROMPT_LOGITS_BYTES holds, at least one; the rest wait for the next step."""
        if not any(s.params.prompt_logprobs is not None for s in chosen):
            return chosen
        per_token = self.runner.logits_bytes_per_token
        kept: list[Sequence] = []
        width = 0
        for seq in chosen:
            width = max(width, seq.num_prompt_tokens)
            if kept and (len(kept) + 1) * width * per_token > PROMPT_LOGITS_BYTES:
                break
            kept.append(seq)
        return kept

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = sample_next_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if isinstance(token, Exception):
                log.error("request %s failed: %s", seq.request.request_id, token)
                seq.error = token
                continue
            if seq.params.logprobs is not None:
                seq.pending_logprobs += token_logprobs(logits[row : row + 1], [token], seq.params.logprobs)
            seq.append(token)
            if seq.finish_reason is None and seq.request.stream and seq.pending_text:
                self._send(seq, seq.take_chunk(), final=False)
        if self._observer:
            self._observer.on_tokens(len(seqs))

    def _retire(self) -> None:
        keep = []
        for row, seq in enumerate(self._running):
            if seq.error is not None:
                self._fail(seq, seq.error)
                continue
            if seq.finish_reason is None and (self._closed or seq.done or seq.sink.is_cancelled()):
                seq.finish_reason = FINISH_ABORT
            if seq.finish_reason is None:
                keep.append(row)
            else:
                self._finish(seq, seq.finish_reason)
        if len(keep) != len(self._running):
            self._running = [self._running[i] for i in keep]

    def _release(self, seq: Sequence, failed: bool = False) -> None:
        if seq.kv_slot >= 0:
            self.runner.kv.free(seq.kv_slot, scrub=failed)
            seq.kv_slot = -1
        if seq.row_lora:
            self.lora_cache.release([selection.ref for selection in seq.request.lora])
            seq.row_lora = RowLoRA()

    def _send(self, seq: Sequence, chunk: GenerationChunk, final: bool) -> None:
        """To the client; a sender that fails (client gone, stub shutting down) aborts this request alone."""
        if seq.done:
            return
        try:
            seq.sink.send(chunk, final)
        except Exception:
            log.warning("request %s: sending a response failed; aborting it", seq.request.request_id,
                        exc_info=True)
            seq.done = True
        if final:
            seq.done = True

    def _fail(self, seq: Sequence, error: Exception) -> None:
        """One final error response (never after the final response), and the request's slots back."""
        self._release(seq, failed=True)
        if seq.done:
            return
        seq.done = True
        try:
            seq.sink.fail(error)
        except Exception:
            log.warning("request %s: sending its error failed", seq.request.request_id, exc_info=True)
        if self._observer:
            try:
                self._observer.on_finished(FINISH_ERROR, seq.num_prompt_tokens, len(seq.output_ids))
            except Exception:
                log.exception("reporting engine metrics failed")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._release(seq)
        seq.finish_reason = reason
        if reason == FINISH_ABORT:
            seq.pending_text = ""  # nobody is listening
        self._send(seq, seq.take_chunk(), final=True)
        if self._observer:
            self._observer.on_finished(reason, seq.num_prompt_tokens, len(seq.output_ids))
        log.info(
            "request %s: %d prompt + %d generated tokens in %.2f s (%s%s)",
            seq.request.request_id, seq.num_prompt_tokens, len(seq.output_ids), time.monotonic() - seq.started,
            reason, f", LoRA '{'+'.join(sel.ref.name for sel in seq.request.lora)}'" if seq.request.lora else "",
        )
