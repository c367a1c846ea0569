"""Structured outputs, measured in-process over the real SmolLM2: decode throughput at concurrency 16 with half the
requests JSON-schema constrained against the same load unconstrained (side by side, order A B B A, best of each),
and the compile time of a typical 10-property schema, first and repeated.

    .venv/bin/python -m benchmarks.structured [--concurrency 16] [--tokens 64] [--out .cache/bench/structured.csv]

Every request generates exactly --tokens tokens (free ones with ignore_eos; the schema asks for more JSON than
that), so both loads decode the same number of tokens. Prints a table, writes CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backends.llm.chat import apply_chat_template
from backends.llm.engine import LLMEngine
from backends.llm.params import GenerationRequest, SamplingParams
from backends.llm.runner import ModelRunner, RunnerSettings
from backends.llm.scheduler import SchedulerLimits
from backends.settings import REPO_ROOT, default_llm_model_path
from backends.structured import make_constraint
from tools.clients.engine import Collect

console = Console(width=140)
# Longer than any run's token budget: constrained rows decode --tokens tokens, as the free ones do.
LIST = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                                   "minItems": 200, "maxItems": 200}},
        "required": ["words"], "additionalProperties": False}


def ten_properties(tag: str) -> dict:
    """A typical extraction schema: 10 properties of the common kinds."""
    kinds = [{"type": "string"}, {"type": "integer", "minimum": 0}, {"type": "number"}, {"type": "boolean"},
             {"enum": ["a", "b", "c"]}, {"type": "array", "items": {"type": "string"}},
             {"type": "string", "maxLength": 32}, {"type": "integer"}, {"type": "string", "pattern": "^[A-Z]+$"},
             {"type": "object", "properties": {"x": {"type": "number"}}}]
    return {"type": "object", "title": tag, "properties": {f"p{i}": k for i, k in enumerate(kinds)},
            "required": [f"p{i}" for i in range(10)], "additionalProperties": False}


def run_load(engine: LLMEngine, concurrency: int, tokens: int, constrained: int) -> float:
    """Tokens per second of `concurrency` requests at once, the first `constrained` of them held to the schema."""
    constraint = make_constraint("json", LIST)
    engine.grammars.compile(constraint).result()  # compile time is measured apart
    sinks = []
    started = time.perf_counter()
    for i in range(concurrency):
        params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=i, ignore_eos=i >= constrained)
        prompt = apply_chat_template(f"List {tokens} words about topic {i}, as JSON.")
        request = engine.prepare(GenerationRequest(f"r{i}", prompt, params,
                                                   constraint=constraint if i < constrained else None))
        sink = Collect()
        engine.submit(request, sink)
        sinks.append(sink)
    for sink in sinks:
        assert sink.wait(600).error is None, sink.error
    seconds = time.perf_counter() - started
    total = sum(s.chunks[-1].num_output_tokens for s in sinks)
    assert total == concurrency * tokens, f"{total} tokens, expected {concurrency * tokens}"
    return total / seconds


def compile_times(engine: LLMEngine, repeats: int = 5) -> tuple[float, float]:
    """Median ms of a first compile (a schema never seen) and of a repeated one (the cache)."""
    first, again = [], []
    for i in range(repeats):
        constraint = make_constraint("json", ten_properties(f"bench-{time.time_ns()}-{i}"))
        t = time.perf_counter()
        engine.grammars.compile(constraint).result()
        first.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()
        engine.grammars.compile(constraint).result()
        again.append((time.perf_counter() - t) * 1e3)
    return statistics.median(first), statistics.median(again)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".cache" / "bench" / "structured.csv")
    args = p.parse_args()
    runner = ModelRunner(default_llm_model_path(), lora=None,
                         settings=RunnerSettings(max_model_len=1024, max_num_seqs=args.concurrency))
    engine = LLMEngine(lambda _engine: (runner, None), limits=SchedulerLimits(max_num_seqs=args.concurrency))
    try:
        console.print(f"dtype {runner.dtype}, concurrency {args.concurrency}, {args.tokens} tokens per request")
        run_load(engine, 4, 8, 2)  # warm-up
        free, half = [], []
        for label in ("free", "half", "half", "free"):
            rate = run_load(engine, args.concurrency, args.tokens, args.concurrency // 2 if label == "half" else 0)
            (half if label == "half" else free).append(rate)
            console.print(f"  {label}: {rate:.1f} tok/s")
        first_ms, again_ms = compile_times(engine)
    finally:
        engine.shutdown()
    rows = [("unconstrained", f"{max(free):.1f}", "1.00x"),
            ("half JSON-schema constrained", f"{max(half):.1f}", f"{max(half) / max(free):.2f}x")]
    table = Table(title=f"Decode throughput, concurrency {args.concurrency} (best of 2 each, order A B B A)")
    for column in ("load", "tok/s", "vs unconstrained"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    compiles = Table(title="Compile time of a 10-property JSON schema (median of 5)")
    compiles.add_column("first (ms)")
    compiles.add_column("repeated (ms)")
    compiles.add_row(f"{first_ms:.2f}", f"{again_ms:.3f}")
    console.print(compiles)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["metric", "value"])
        writer.writerows([("free_tok_s", max(free)), ("half_constrained_tok_s", max(half)),
                          ("ratio", max(half) / max(free)), ("compile_first_ms", first_ms),
                          ("compile_repeated_ms", again_ms), ("runs", json.dumps({"free": free, "half": half}))])
    console.print(f"CSV: {args.out}")


if __name__ == "__main__":
    main()
