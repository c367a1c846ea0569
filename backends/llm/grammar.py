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

from backends.errors import InvalidArgument
from backends.structured import Constraint

log = logging.getLogger(__name__)

MAX_CACHED = 512  # compiled grammars kept (least recently used dropped); a repeated schema costs nothing
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


def _reason(exc: Exception) -> str:
    """xgrammar's message without its C++ source location."""
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
                self._on_compiled(None)
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint] = future
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return future

    def _compile(self, constraint: Constraint) -> xgr.CompiledGrammar:
        compiler = self._compiler.result()
        started = time.perf_counter()
        try:
            if constraint.kind == "json":
                compiled = compiler.compile_json_schema(constraint.value, any_whitespace=False)
            elif constraint.kind == "json_object":
                compiled = compiler.compile_builtin_json_grammar()
            elif constraint.kind == "regex":
                compiled = compiler.compile_regex(constraint.value)
            elif constraint.kind == "choice":
                rule = " | ".join(json.dumps(c) for c in json.loads(constraint.value))
                compiled = compiler.compile_grammar(f"root ::= {rule}")
            else:
                compiled = compiler.compile_grammar(constraint.value)
        except RuntimeError as exc:
            with self._lock:  # a failure is not cached: the next request gets its own answer
                self._cache.pop(constraint, None)
            raise InvalidArgument(f"structured output: the {constraint.kind} constraint does not compile: "
                                  f"{_reason(exc)}") from None
        seconds = time.perf_counter() - started
        self._on_compiled(seconds)
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

    def apply(self, logits: torch.Tensor, matchers: list) -> torch.Tensor:
        """`matchers[i]`: row i's GrammarMatcher or None. Returns logits with the constrained rows masked (the same
        tensor when no row is constrained)."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return logits
        if self._bitmask is None or self._bitmask.shape[0] < len(matchers):
            self._bitmask = xgr.allocate_token_bitmask(max(len(matchers), 16), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(self._bitmask, i)
        masked = logits.float().clone()
        xgr.apply_token_bitmask_inplace(masked, self._bitmask[: len(matchers)].to(masked.device),
                                        vocab_size=min(self.vocab_size, masked.shape[-1]), indices=rows)
        return masked


def new_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    return xgr.GrammarMatcher(compiled)
