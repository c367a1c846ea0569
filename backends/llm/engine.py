"""Continuous-batching generation engine: one thread owns the model; `submit` only queues.

Every step the engine schedules a token budget (`max_num_batched_tokens`): one token for every decoding sequence
first, then prefill chunks of the sequences still reading their prompt, then newly admitted requests (see
`scheduler.py`), and runs them all in one forward with mixed LoRA adapters (`ModelRunner.step`). KV lives in
blocks (`kv_cache.py`, `blocks.py`): a new request starts from the longest cached prefix of its prompt computed
with the same adapter content, takes blocks as it grows, and when none are left the newest running sequence is
preempted (its blocks freed, recomputed from its tokens when it is readmitted; nothing it streamed is lost). Each
row samples with its own parameters and generator, streams its text, and leaves the batch as soon as it finishes
or its client cancels (its blocks and LoRA slots are freed at once, nobody else's cache moves).

Failures are contained: a step that fails while it holds prefills fails those and reruns its decode rows, an error
in a decode-only step fails the running batch, a row with non-finite logits fails alone; each gets one final error
response and gives back its LoRA slots and KV blocks, and the engine keeps serving. If the engine thread itself
dies, every request it holds is failed, `submit` refuses new work at once (UNAVAILABLE) and `on_dead` is told.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Callable, Protocol, TypeVar

import torch

from backends.errors import BackendError, InternalError, InvalidArgument, Unavailable
from backends.llm.blocks import adapter_identity, block_hashes
from backends.llm.detokenizer import IncrementalDetokenizer
from backends.llm.grammar import GrammarCompiler, GrammarMasks, new_matcher
from backends.llm.logprobs import TokenLogprob, prompt_logprobs, token_logprobs
from backends.llm.params import GenerationRequest, SamplingParams, check_context_length
from backends.llm.runner import ModelRunner, StepRow
from backends.llm.sampling import make_generator, sample_next_tokens
from backends.llm.scheduler import Scheduler, SchedulerLimits, Take
from backends.lora.adapters.peft import LoRAAdapter
from backends.lora.manager.cache import LoRACache, NoFreeSlot
from backends.lora.manager.prefetch import Hold
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

    def on_prefix_cache(self, queried_tokens: int, hit_tokens: int) -> None: ...

    def on_preemption(self) -> None: ...

    def on_grammar(self, seconds: float | None) -> None:
        """A structured-output constraint compiled in `seconds`, or (None) found compiled in the cache."""

    def on_lora(self, cache: LoRACache, running: list[AdapterRef], waiting: list[AdapterRef], slot_wait: float,
                rotations: int) -> None:
        """After every step: the cache, one adapter ref per request and adapter running / waiting, how long the
        oldest request passed over for want of a LoRA slot has waited (0: none), and the scheduler's rotations."""


class Sequence:
    """One request's generation state."""

    def __init__(self, request: GenerationRequest, sink: OutputSink, tokenizer, eos_token_ids: set[int],
                 device: torch.device):
        self.request = request
        self.sink = sink
        self.params: SamplingParams = request.params
        self.generator = None if self.params.greedy else make_generator(self.params.seed, device)
        self.matcher = new_matcher(request.grammar) if request.grammar is not None else None
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
        # Adapters read for it by the loader thread: their host copies (used if the cache evicted them before
        # admission) and their places in the loader's window, given back once they are in slots or it ends.
        self.loaded: dict[int, LoRAAdapter] = {}
        self.holds: list[Hold] = []
        self.blocks: list[int] = []  # its block table while admitted
        self.computed = 0  # tokens whose keys/values are in its blocks = the position of the next token fed
        self.hashes: list[bytes] | None = None  # its full blocks' prefix-cache hashes, from its admission
        self.published = 0  # of its blocks, how many are in the prefix cache
        self.prompt_logits: list[torch.Tensor] = []  # with prompt_logprobs: each prefill chunk's logits
        self.started = time.monotonic()
        self.error: Exception | None = None  # set when this row failed; the engine retires it with the error
        self.pending_logprobs: list[TokenLogprob] = []
        self.prompt_entries: tuple[TokenLogprob, ...] | None = None  # sent once, with the next chunk
        self.done = False  # the final response (or error) was sent: nothing more may go to the sink

    def append(self, token_id: int) -> None:
        """Take one sampled token and decide whether the sequence is finished."""
        if token_id in self.eos_token_ids and not self.params.ignore_eos:
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
            self.finish(self.finish_reason)

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
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
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + len(self.output_ids)

    @property
    def remaining(self) -> int:
        """Known tokens not yet in its blocks: the rest of its prompt, or the last sampled token."""
        return self.num_tokens - self.computed

    def tokens(self, start: int, count: int) -> list[int]:
        prompt = self.request.prompt_token_ids
        if start + count <= len(prompt):
            return list(prompt[start:start + count])
        return (list(prompt) + self.output_ids)[start:start + count]


def _outcome(future: Future) -> BaseException | None:
    """A settled future's error (CancelledError when cancelled), None when it has a result."""
    return CancelledError() if future.cancelled() else future.exception()


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
        # Requests whose adapters are being read or whose constraint compiles (not queued yet): they count as
        # waiting in the metrics, so a router sees an adapter's request from the moment it arrives.
        self._preparing: dict[int, GenerationRequest] = {}
        self._preparing_lock = threading.Lock()
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
            self.scheduler = Scheduler(self._limits, fits)
            self.grammars = GrammarCompiler(self.runner.tokenizer, self.runner.vocab_size, self.runner.eos_token_ids,
                                            getattr(self._observer, "on_grammar", None))
            self._masks = GrammarMasks(self.runner.vocab_size)
            with self.runner._on_device():
                self._masks.warm_up(self.runner.device)
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
        need = len(request.prompt_token_ids) + request.params.max_tokens
        if need > self.runner.kv.num_tokens:
            raise InvalidArgument(f"this request needs {need} tokens of KV cache ({len(request.prompt_token_ids)} in "
                                  f"the prompt + max_tokens {request.params.max_tokens}); the model's whole KV cache "
                                  f"holds {self.runner.kv.num_tokens} (kv_cache_memory_bytes)")
        return request

    def submit(self, request: GenerationRequest, sink: OutputSink) -> None:
        """Queue a prepared request. One whose adapters are being read (on the loader thread) or whose constraint
        compiles (on the compile thread) is queued once they are ready, other requests going on meanwhile; an
        adapter that fails to load or a constraint that does not compile fails that request alone."""
        if request.lora and self.lora_cache is None:
            raise Unavailable("LoRA is disabled for this model (max_loras is 0)")
        loading = [(s.ref.key, s.ready) for s in request.lora if s.ready is not None]
        compiling = (self.grammars.compile(request.constraint)
                     if request.constraint is not None and request.grammar is None else None)
        if not loading and compiling is None:
            self._enqueue(self._sequence(request, sink))
            return
        futures = [f for _, f in loading] + ([compiling] if compiling is not None else [])
        left, lock = [len(futures)], threading.Lock()
        with self._preparing_lock:
            self._preparing[id(request)] = request
        if self._observer is not None:  # wake an idle engine thread so that it reports the request as waiting
            self._queue.put(_Call(lambda: None, Future()))

        def settled(_: Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            with self._preparing_lock:
                self._preparing.pop(id(request), None)
            loaded = {key: f.result() for key, f in loading if _outcome(f) is None}
            holds = [item.hold for item in loaded.values()]
            adapters = {key: item.take() for key, item in loaded.items()}
            error = next((e for e in map(_outcome, futures) if e is not None), None)
            try:
                if error is not None:
                    raise error
                if compiling is not None:
                    request.grammar = compiling.result()
                seq = self._sequence(request, sink)
                seq.loaded, seq.holds = adapters, holds
                self._enqueue(seq)
            except Exception as exc:  # a bad adapter or constraint, or the engine stopped meanwhile
                for hold in holds:
                    hold.release()
                if isinstance(exc, CancelledError):  # shut down while it waited
                    exc = Unavailable("the model is shutting down; request not finished")
                elif not isinstance(exc, BackendError):
                    log.error("request %s: preparing its adapters or constraint failed", request.request_id,
                              exc_info=exc)
                sink.fail(exc)

        for future in futures:
            future.add_done_callback(settled)

    def _sequence(self, request: GenerationRequest, sink: OutputSink) -> Sequence:
        return Sequence(request, sink, self.runner.tokenizer, self.runner.eos_token_ids, self.runner.device)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closed = True
        if hasattr(self, "grammars"):
            self.grammars.shutdown()
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
            with self._preparing_lock:
                preparing = list(self._preparing.values())
            # The adapters first: once the queue gauges read idle, the adapter lists do too.
            if self.lora_cache is not None:
                now = time.monotonic()
                slot_wait = max((now - seq.started for seq in self._waiting if seq.bypassed_steps), default=0.0)
                waiting = _adapter_refs(self._waiting) + [s.ref for r in preparing for s in r.lora]
                self._observer.on_lora(self.lora_cache, _adapter_refs(running), waiting, slot_wait,
                                       self.scheduler.rotations)
            self._observer.on_queue(len(self._waiting) + self._queue.qsize() + len(preparing), len(running),
                                    self.runner.kv.usage)

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
                item.run()  # then report: a handed-over call may change what the metrics show (see `submit`)
            else:
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
        plan = self._schedule()
        self._stalled = bool(self._waiting) and not plan
        if not plan:
            return
        if self._admitting:
            self._report_queue()  # they run from now on: a router sees them before their first token goes out
        self._running.extend(self._admitting)
        self._admitting = []
        try:
            outputs = self._run(plan)
        except Exception as exc:  # fail the prefills alone and rerun the decode rows (a second failure fails all)
            prefills = [seq for seq, _ in plan if seq.remaining > 1 or not seq.output_ids]
            if not prefills or len(prefills) == len(plan):
                raise
            log.exception("a step with %d prefills failed; failing them, the running batch goes on", len(prefills))
            error = InternalError(f"prefill failed: {type(exc).__name__}: {exc}")
            for seq in prefills:
                self._running.remove(seq)
                self._fail(seq, error)
            plan = [(seq, n) for seq, n in plan if seq not in prefills]
            outputs = self._run(plan)
        to_sample, last = [], []
        for (seq, n), out in zip(plan, outputs):
            seq.computed += n
            self._publish(seq)
            if seq.params.prompt_logprobs is not None and seq.prompt_entries is None and not seq.output_ids:
                seq.prompt_logits.append(out)
                if seq.computed == seq.num_prompt_tokens:
                    seq.prompt_entries = tuple(prompt_logprobs(torch.cat(seq.prompt_logits),
                                                               seq.request.prompt_token_ids,
                                                               seq.params.prompt_logprobs))
                    seq.prompt_logits = []
                    if seq.params.max_tokens == 0:  # scoring only: nothing to generate
                        seq.finish_reason = FINISH_LENGTH
            if seq.remaining == 0 and seq.finish_reason is None:
                to_sample.append(seq)
                last.append(out if out.dim() == 1 else out[-1])
        if to_sample:
            self._sample(to_sample, torch.stack(last))
        self._retire()

    def _run(self, plan: list[tuple[Sequence, int]]) -> list[torch.Tensor | None]:
        return self.runner.step([StepRow(seq.tokens(seq.computed, n), seq.computed, seq.blocks, seq.row_lora,
                                         self._logits_kind(seq, n)) for seq, n in plan])

    def _logits_kind(self, seq: Sequence, n: int) -> str:
        if seq.params.prompt_logprobs is not None and seq.prompt_entries is None and not seq.output_ids:
            return "all"
        return "last" if seq.computed + n == seq.num_tokens else "none"

    def _publish(self, seq: Sequence) -> None:
        """Put its newly filled full blocks in the prefix cache (those its hashes cover: prompt blocks)."""
        if seq.hashes:
            full = min(seq.computed // self.runner.kv.block_size, len(seq.hashes))
            for i in range(seq.published, full):
                self.runner.kv.pool.cache(seq.blocks[i], seq.hashes[i])
            seq.published = max(seq.published, full)

    # -- scheduling -------------------------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, tokens) pairs: decode rows, then running prefills, then admissions, within the
        token budget and the free blocks; preempts the newest sequences when a running one needs a block."""
        budget = self._limits.max_num_batched_tokens
        plan: dict[int, tuple[Sequence, int]] = {}
        preempted = False
        for seq in sorted(self._running, key=lambda s: s.remaining > 1):
            if seq not in self._running:  # preempted for an older sequence this step
                continue
            n = min(seq.remaining, budget)
            if n <= 0:
                break
            n, freed = self._reserve(seq, n, plan)
            preempted |= freed
            if n:
                plan[id(seq)] = (seq, n)
                budget -= n
        budget = self._limits.max_num_batched_tokens - sum(n for _, n in plan.values())
        if not preempted and budget > 0:  # vLLM's rule too: a step that had to preempt admits nobody
            admitted: list[tuple[Sequence, int]] = []

            def take(seq: Sequence) -> Take:
                nonlocal budget
                verdict, n = self._try_admit(seq, budget)
                if verdict is Take.ADMITTED:
                    admitted.append((seq, n))
                    budget -= n
                    return Take.STOP if budget <= 0 else verdict
                return verdict

            self.scheduler.admit(self._waiting, self._running, take)
            self._admitting = [seq for seq, _ in admitted]
            for seq, n in admitted:
                plan[id(seq)] = (seq, n)
        return list(plan.values())

    def _reserve(self, seq: Sequence, n: int, plan: dict) -> tuple[int, bool]:
        """Blocks for `n` more tokens of a running sequence, preempting newer sequences when none are free; a
        prefill takes fewer tokens rather than preempt anyone but newer sequences. Returns (tokens, preempted)."""
        kv, pool = self.runner.kv, self.runner.kv.pool
        preempted = False
        while True:
            need = kv.blocks_for(seq.computed + n) - len(seq.blocks)
            if need <= pool.num_free:
                seq.blocks += pool.allocate(max(need, 0))
                return n, preempted
            victim = self._running[-1]
            if victim is not seq:
                self._preempt(victim)
                plan.pop(id(victim), None)
                preempted = True
                continue
            fit = (len(seq.blocks) + pool.num_free) * kv.block_size - seq.computed  # what its blocks can still take
            if fit > 0 and n > 1:
                n = min(n, fit)
                continue
            self._preempt(seq)  # the newest, and not even one token fits: make room for the older ones
            return 0, True

    def _preempt(self, seq: Sequence) -> None:
        log.warning("request %s preempted: KV cache full (%d blocks); it is recomputed when blocks free up",
                    seq.request.request_id, self.runner.kv.num_blocks)
        self._running.remove(seq)
        self._release(seq)
        seq.computed, seq.hashes, seq.published, seq.prompt_logits = 0, None, 0, []
        self._waiting.appendleft(seq)
        if self._observer:
            self._observer.on_preemption()

    def _identity(self, seq: Sequence) -> bytes:
        pairs = []
        for selection in seq.request.lora:
            digest = self.lora_cache.content_digest(selection.ref) if self.lora_cache else None
            pairs.append((digest or b"key:%d" % selection.ref.key, selection.scale))  # no digest: its files' key
        return adapter_identity(pairs)

    def _try_admit(self, seq: Sequence, budget: int) -> tuple[Take, int]:
        kv, pool = self.runner.kv, self.runner.kv.pool
        if seq.remaining > kv.num_tokens:  # checked at `prepare`; a preempted request cannot outgrow it either
            self._waiting.remove(seq)
            self._fail(seq, InvalidArgument(f"the request needs {seq.remaining} tokens of KV cache, the whole cache "
                                            f"holds {kv.num_tokens}"))
            return Take.SKIPPED, 0
        lora = seq.request.lora
        if lora:
            try:
                slots = self.lora_cache.acquire([selection.ref for selection in lora], seq.loaded)
                self._drop_holds(seq)  # in its slots now
            except NoFreeSlot:
                return Take.SKIPPED, 0  # slots pinned elsewhere; it stays waiting
            except Exception as exc:  # e.g. the adapter file vanished since validation
                self._waiting.remove(seq)
                self._fail(seq, exc)
                return Take.SKIPPED, 0
            seq.row_lora = RowLoRA.stack([(slot, selection.scale) for slot, selection in zip(slots, lora)])
        total = seq.num_tokens
        scoring = seq.params.prompt_logprobs is not None and seq.prompt_entries is None and not seq.output_ids
        hits: list[int] = []
        if pool.prefix_caching and not scoring:  # scoring needs every prompt position's logits
            seq.hashes = block_hashes(seq.tokens(0, total), kv.block_size, self._identity(seq))
            hits = pool.match(seq.hashes, (total - 1) // kv.block_size)  # the last token is always computed
        cached = len(hits) * kv.block_size
        # Room for the whole uncached prompt now, so an admitted prefill never waits for blocks.
        if kv.blocks_for(total) - len(hits) > pool.num_free:
            pool.release(hits)
            if seq.row_lora:
                self.lora_cache.release([selection.ref for selection in lora])
                seq.row_lora = RowLoRA()
            seq.hashes = None
            return Take.STOP, 0
        n = min(total - cached, budget)
        seq.blocks = hits + pool.allocate(kv.blocks_for(cached + n) - len(hits))
        seq.computed, seq.published = cached, len(hits)  # tokens computed; blocks already in the prefix cache
        if pool.prefix_caching and not scoring:
            pool.count_lookup(total, cached)
            if self._observer:
                self._observer.on_prefix_cache(total, cached)
        self._waiting.remove(seq)
        return Take.ADMITTED, n

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        # Constrained rows sample from their grammar's tokens only; logprobs stay the model's own (vLLM's default).
        with self.runner._on_device():
            masked, failed = self._masks.apply(logits, [s.matcher for s in seqs])
        tokens = sample_next_tokens(masked, [s.params for s in seqs], [s.generator for s in seqs])
        for row, error in failed.items():
            tokens[row] = error
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if isinstance(token, Exception):
                log.error("request %s failed: %s", seq.request.request_id, token)
                seq.error = token
                continue
            if seq.params.logprobs is not None:
                seq.pending_logprobs += token_logprobs(logits[row : row + 1], [token], seq.params.logprobs)
            if seq.matcher is not None and not seq.matcher.accept_token(token):
                seq.error = InternalError(f"structured output: token {token} broke the request's grammar")
                continue
            seq.append(token)
            if seq.matcher is not None and seq.matcher.is_terminated() and seq.finish_reason is None:
                seq.finish(FINISH_STOP)  # the grammar is complete (its end state admits nothing more)
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

    @staticmethod
    def _drop_holds(seq: Sequence) -> None:
        for hold in seq.holds:
            hold.release()
        seq.holds, seq.loaded = [], {}

    def _release(self, seq: Sequence, failed: bool = False) -> None:
        self._drop_holds(seq)
        if seq.blocks:
            self.runner.kv.pool.release(seq.blocks, keep_cached=not failed)
            seq.blocks = []
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
