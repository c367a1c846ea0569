"""Constrained decoding with xgrammar: constraints compiled into token-level grammars on a compile thread (never the
engine thread, so a slow schema stalls no other row's decode step), cached by constraint (the tokenizer is the
engine's own), single-flight; and the per-step masking of the constrained rows' logits.

Why xgrammar: vLLM, SGLang and TensorRT-LLM use it, it runs on CPU and CUDA, and its masks take ~0.1 ms per row
here; llguidance would serve too, but nothing here needs its lazier compilation.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

import torch
import xgrammar as xgr

from backends.errors import InternalError, InvalidArgument, Unavailable
from backends.structured import Constraint

log = logging.getLogger(__name__)

MAX_CACHED = 512  # compiled grammars kept (least recently used dropped); a repeated schema costs nothing
# ... and at most this much host memory for them: a 12k-character schema over a 49k vocabulary compiles to ~13 MB.
MAX_CACHED_BYTES = 512 << 20
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    if isinstance(exc, UnicodeDecodeError):  # its error text cut a multi-byte character in two
        return "a syntax error next to a non-ASCII character (xgrammar could not quote it)"
    return _XGR_PREFIX.sub("", str(exc).strip()).strip()


class GrammarCompiler:
    """Compiles constraints for one tokenizer. `compile` returns a future; `on_compiled(seconds | None)` sees each
    compile (None: served from the cache)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int],
                 on_compiled: Callable[[float | None], None] | None = None):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[Constraint, Future] = OrderedDict()
        self._on_compiled = on_compiled or (lambda _seconds: None)
        # Building the tokenizer's info reads the whole vocabulary (~1 s): on the compile thread, at start.
        self._compiler: Future = self._pool.submit(self._make_compiler, tokenizer, vocab_size, sorted(stop_token_ids))
        self.vocab_size = vocab_size

    @staticmethod
    def _make_compiler(tokenizer, vocab_size: int, stop_token_ids: list[int]) -> xgr.GrammarCompiler:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile(self, constraint: Constraint) -> Future:
        with self._lock:
            future = self._cache.get(constraint)
            if future is not None:
                self._cache.move_to_end(constraint)
                if future.done() and future.exception() is None:
                    self._on_compiled(None)
                return future
            try:
                future = self._pool.submit(self._compile, constraint)
            except RuntimeError:  # the pool was shut down: the model is going away
                raise Unavailable("the model is shutting down; retry on another instance") from None
            self._cache[constraint] = future
            self._evict()
        return future

    def _evict(self) -> None:
        """Least recently used first, beyond MAX_CACHED grammars or MAX_CACHED_BYTES of compiled ones."""
        def size(f: Future) -> int:
            return f.result().memory_size_bytes if f.done() and f.exception() is None else 0

        total = sum(size(f) for f in self._cache.values())
        while len(self._cache) > 1 and (len(self._cache) > MAX_CACHED or total > MAX_CACHED_BYTES):
            _, dropped = self._cache.popitem(last=False)
            total -= size(dropped)

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        started = time.perf_counter()
        try:
            compiler = self._compiler.result()
        except Exception as exc:
            with self._lock:
                self._cache.pop(constraint, None)
            raise InternalError(f"structured output: the tokenizer's grammar index could not be built: {exc}") \
                from None
        try:
            if constraint.kind == "json":
                compiled = compiler.compile_json_schema(constraint.value, any_whitespace=False)
            elif constraint.kind == "json_object":
                compiled = compiler.compile_builtin_json_grammar()
            elif constraint.kind == "regex":
                compiled = compiler.compile_regex(constraint.value)
            elif constraint.kind == "choice":
                # ensure_ascii=False: xgrammar reads a \\ud83d\\ude00 escape as two lone surrogates (no token fits)
                rule = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(constraint.value))
                compiled = compiler.compile_grammar(f"root ::= {rule}")
            else:
                compiled = compiler.compile_grammar(constraint.value)
        except (RuntimeError, ValueError) as exc:  # ValueError: UnicodeDecodeError, see _reason
            with self._lock:  # a failure is not cached: the next request gets its own answer
                self._cache.pop(constraint, None)
            raise InvalidArgument(f"structured output: the {constraint.kind} constraint does not compile: "
                                  f"{_reason(exc)}") from None
        seconds = time.perf_counter() - started
        self._on_compiled(seconds)
        with self._lock:
            self._evict()
        log.info("compiled a %s constraint (%d characters) in %.1f ms", constraint.kind, len(constraint.value),
                 seconds * 1e3)
        return compiled

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarMasks:
    """The masking step for a batch: one bitmask row per constrained row, applied to a copy of the logits (the
    returned logprobs stay the model's own)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._bitmask: torch.Tensor | None = None

    def apply(self, logits: torch.Tensor, matchers: list) -> tuple[torch.Tensor, dict[int, Exception]]:
        """`matchers[i]`: row i's GrammarMatcher or None. Returns the logits with the constrained rows masked (the
        same tensor when no row is constrained) and the rows that cannot go on, with why: a grammar whose mask
        admits no token, or a matcher that failed. Call on the device's context (CUDA: xgrammar's kernel launches on
        the current device)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        failed: dict[int, Exception] = {}
        if not rows:
            return logits, failed
        if self._bitmask is None or self._bitmask.shape[0] < len(matchers):
            self._bitmask = xgr.allocate_token_bitmask(max(len(matchers), 16), self.vocab_size)
        for i in rows:
            try:
                matchers[i].fill_next_token_bitmask(self._bitmask, i)
            except RuntimeError as exc:  # this row alone
                failed[i] = InternalError(f"structured output: the grammar matcher failed: {_reason(exc)}")
        masked = logits.float().clone()
        xgr.apply_token_bitmask_inplace(masked, self._bitmask[: len(matchers)].to(masked.device),
                                        vocab_size=min(self.vocab_size, masked.shape[-1]), indices=rows)
        admits = torch.isfinite(masked[rows]).any(-1).tolist()
        for i, ok in zip(rows, admits):
            if not ok and i not in failed:
                failed[i] = InvalidArgument("structured output: no token of this model's vocabulary can continue "
                                            "the constraint (e.g. a character no token holds)")
        return masked, failed

    def warm_up(self, device: torch.device) -> None:
        """On CUDA, xgrammar's mask kernel compiles on first use (per row-count shape): here, not in a step."""
        if device.type != "cuda":
            return
        for rows in (1, 16):
            bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size).to(device)
            logits = torch.zeros(rows, self.vocab_size, device=device)
            xgr.apply_token_bitmask_inplace(logits, bitmask, indices=list(range(rows)))


def new_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(compiled)
