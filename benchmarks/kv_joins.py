"""Requests that keep joining and leaving a running batch: engine throughput and time spent moving the KV cache.

48 greedy requests with mixed lengths (max_tokens 8..64, seeded) are queued at once on an engine limited to 16
running sequences, so every finished request lets a new one join: about 32 joins and 48 leaves mid-run. The
script times the engine end to end and every call that moves KV-cache memory on join/leave (the previous
left-padded design: `KVBatch.concat` / `KVBatch.keep`; the slot cache: nothing is copied, only the prefill writes
its own rows). To compare designs side by side, run it against another checkout's `backends`:

    .venv/bin/python benchmarks/kv_joins.py                       # this checkout
    git worktree add /tmp/before <rev> && PYTHONPATH=/tmp/before .venv/bin/python benchmarks/kv_joins.py
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # the other checkout's backends win when on PYTHONPATH


def _timed(cls, name: str, spent: dict) -> None:
    original = getattr(cls, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
            spent[name + "_calls"] = spent.get(name + "_calls", 0) + 1

    setattr(cls, name, wrapper)


class Collect:
    """Output sink: the last chunk, and an event set by the final response (an error fails the benchmark). Not
    tools.clients.engine.Collect: this script also runs against older checkouts, which do not have it."""

    def __init__(self) -> None:
        import threading

        self.done, self.last, self.error = threading.Event(), None, None

    def send(self, chunk, final: bool) -> None:
        self.last = chunk
        if final:
            self.done.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()

    def is_cancelled(self) -> bool:
        return False

    def tokens(self) -> int:
        if not self.done.wait(1200) or self.error is not None:
            raise RuntimeError(f"request failed: {self.error}")
        return self.last.num_output_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()

    import backends
    from backends.llm import kv_cache
    from backends.llm.chat import apply_chat_template
    from backends.llm.engine import LLMEngine
    from backends.llm.params import GenerationRequest, SamplingParams
    from backends.llm.runner import ModelRunner
    from backends.llm.scheduler import SchedulerLimits
    from backends.settings import default_llm_model_path

    spent: dict = {}
    if hasattr(kv_cache, "KVBatch"):  # the left-padded design: joins concat, leaves keep (both copy every row)
        design = "left-padded growable batch (before)"
        _timed(kv_cache.KVBatch, "concat", spent)
        _timed(kv_cache.KVBatch, "keep", spent)
    else:
        design = "slot cache (after)"
        _timed(kv_cache.SlotKVCache, "allocate", spent)
        _timed(kv_cache.SlotKVCache, "free", spent)
    _timed(ModelRunner, "prefill", spent)
    _timed(ModelRunner, "decode", spent)
    kwargs = {"lora": None}
    if "settings" in inspect.signature(ModelRunner).parameters:
        from backends.llm.runner import RunnerSettings

        kwargs["settings"] = RunnerSettings(max_model_len=1024, max_num_seqs=args.max_num_seqs)
    # Built on the engine thread, as the Triton model does: torch work on a second thread (the 0.7 GB zero-fill
    # of the KV cache here) slows every later forward on the engine thread ~1.6x (two OpenMP pools, 2 cores).
    engine = LLMEngine(lambda e: (ModelRunner(default_llm_model_path(), **kwargs), None),
                       limits=SchedulerLimits(max_num_seqs=args.max_num_seqs))
    rng = random.Random(0)
    topics = ["a dragon", "the sea", "a robot", "a city at night", "winter", "a lost key", "the moon", "a garden"]
    sinks = []
    started = time.perf_counter()
    for i in range(args.requests):
        params = SamplingParams(max_tokens=rng.randint(8, 64), temperature=0.0)
        prompt = apply_chat_template(f"Write a story about {topics[i % len(topics)]}.")
        sink = Collect()
        engine.submit(engine.prepare(GenerationRequest(f"r{i}", prompt, params)), sink)
        sinks.append(sink)
    tokens = sum(s.tokens() for s in sinks)
    elapsed = time.perf_counter() - started
    engine.shutdown()
    moved = sum(v for k, v in spent.items() if not k.endswith("_calls") and k not in ("prefill", "decode"))
    result = {"design": design, "backends": str(Path(backends.__file__).parent), "requests": args.requests,
              "tokens": tokens, "seconds": round(elapsed, 2), "tok_per_s": round(tokens / elapsed, 1),
              "kv_join_leave_ms": round(moved * 1e3, 1), "prefill_s": round(spent["prefill"], 2),
              "decode_s": round(spent["decode"], 2),
              "kv_calls": {k: v for k, v in spent.items() if k.endswith("_calls")}}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
