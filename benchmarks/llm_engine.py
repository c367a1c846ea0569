"""The engine's paged KV cache, prefix cache and chunked prefill, measured in-process over the real SmolLM2.

    .venv/bin/python -m benchmarks.llm_engine                       # all three, ~5 minutes on 2 cores
    .venv/bin/python -m benchmarks.llm_engine --only prefix chunked --budgets 64 256

- prefix: TTFT of requests that share a ~200-token system prompt, one at a time, prefix caching on vs off (the same
  runner, the cache toggled), with and without an adapter (the cache is keyed by adapter content);
- chunked: inter-token latency of 15 running streams, alone and while a 2,000-token prompt joins, per step token
  budget (`max_num_batched_tokens`); also the long prompt's own TTFT;
- capacity: sequences of 256 tokens running at once at one KV budget, against the sequences the previous design
  (one `max_model_len` slot each) fitted in that budget.

Prints tables, writes CSV to --out. The engine runs with `dtype` auto (bfloat16 on a CPU with AVX512-BF16/AMX).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backends.llm.chat import apply_chat_template
from backends.llm.engine import LLMEngine
from backends.llm.params import GenerationRequest, SamplingParams
from backends.llm.runner import ModelRunner, RunnerSettings
from backends.llm.scheduler import SchedulerLimits
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.manager.request import LoRAFields
from backends.lora.manager.selector import AdapterSelector
from backends.settings import REPO_ROOT, adapters_dir, default_llm_model_path

console = Console(width=140)
SYSTEM = ("You are the help desk of a large public library. " * 4 + "Opening hours: Monday to Friday nine to six, "
          "Saturday ten to four, closed on Sunday. Loans last three weeks and can be renewed twice online. " * 3
          + "Answer in one short sentence.")
QUESTIONS = [f"Question {i}: can I renew a loan for the {i}th time, and when are you open on day {i}?"
             for i in range(64)]


class Stamps:
    """An OutputSink recording when each streamed chunk arrived."""

    def __init__(self):
        self.times: list[float] = []
        self.first = threading.Event()
        self.done = threading.Event()
        self.error = None
        self.cancelled = False

    def send(self, chunk, final):
        self.times.append(time.perf_counter())
        self.first.set()
        if final:
            self.done.set()

    def fail(self, error):
        self.error = error
        self.done.set()

    def is_cancelled(self):
        return self.cancelled


class Peak:
    """Engine observer keeping the largest running count."""

    def __init__(self):
        self.running = 0

    def on_finished(self, *a): ...

    def on_tokens(self, n): ...

    def on_lora(self, *a): ...

    def on_prefix_cache(self, *a): ...

    def on_preemption(self): ...

    def on_queue(self, waiting, running, usage):
        self.running = max(self.running, running)


def _engine(runner, selector_config=None, observer=None, **limits):
    holder = []

    def setup(engine):
        if selector_config is not None:
            holder.append(AdapterSelector.build(runner.lora, selector_config))
            return runner, holder[0].cache
        return runner, None

    return LLMEngine(setup, observer=observer, limits=SchedulerLimits(**limits)), holder


def _request(engine, text, max_tokens, lora=(), stream=True):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.prepare(GenerationRequest("bench", text, params, stream=stream, lora=lora))


def prefix(runner, rows: list[dict]) -> None:
    config = LoRAServingConfig(max_loras=2, max_cpu_loras=4, registry_file=None, allowed_roots=(adapters_dir(),))
    engine, selector = _engine(runner, config, max_num_seqs=16, max_num_batched_tokens=2048)
    try:
        stack = selector[0].select_stack([LoRAFields(path=str(adapters_dir() / "demo" / "uppercase"))])
        table = Table(title="TTFT with a shared system prompt (one request at a time, 8 output tokens)")
        for col in ["adapter", "prompt tokens", "TTFT p50 cache off ms", "TTFT p50 cache on ms", "off / on"]:
            table.add_column(col, justify="right")
        for name, lora in (("none", ()), ("uppercase", stack)):
            ttft = {}
            for caching in (False, True):
                runner.kv.pool.prefix_caching = caching
                runner.kv.pool.reset_prefix_cache()
                samples = []
                for i, question in enumerate(QUESTIONS[:20]):
                    text = apply_chat_template([{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": question}])
                    sink = Stamps()
                    started = time.perf_counter()
                    engine.submit(_request(engine, text, 8, lora), sink)
                    sink.done.wait(120)
                    if i:  # the first one fills the cache (or warms up)
                        samples.append((sink.times[0] - started) * 1e3)
                ttft[caching] = statistics.median(samples)
            tokens = len(runner.encode(text))
            table.add_row(name, str(tokens), f"{ttft[False]:.0f}", f"{ttft[True]:.0f}",
                          f"{ttft[False] / ttft[True]:.1f}x")
            rows.append({"bench": "prefix", "adapter": name, "prompt_tokens": tokens,
                         "ttft_p50_off_ms": round(ttft[False], 1), "ttft_p50_on_ms": round(ttft[True], 1)})
        console.print(table)
    finally:
        runner.kv.pool.prefix_caching = True
        engine.shutdown()


def chunked(runner, budgets: list[int], rows: list[dict]) -> None:
    long_text = apply_chat_template("Summarise: " + "The reading room is quiet and the shelves are full. " * 180)
    long_ids = runner.encode(long_text)[:2000]
    table = Table(title=f"15 running streams, a {len(long_ids)}-token prompt joins: ITL by step token budget")
    for col in ["max_num_batched_tokens", "ITL p50 alone ms", "ITL p99 while joining ms", "p99 joining / p50",
                "long prompt TTFT ms"]:
        table.add_column(col, justify="right")
    for budget in budgets:
        runner.kv.pool.reset_prefix_cache()  # the long prompt of the budget before must not hit
        engine, _ = _engine(runner, max_num_seqs=16, max_num_batched_tokens=budget)
        try:
            streams = [Stamps() for _ in range(15)]
            for i, sink in enumerate(streams):
                engine.submit(_request(engine, apply_chat_template(QUESTIONS[i]), 400), sink)
            for sink in streams:
                sink.first.wait(120)
            time.sleep(3)  # steady decoding
            alone_from = time.perf_counter()
            time.sleep(3)
            join = Stamps()
            joined = time.perf_counter()
            long_request = GenerationRequest("long", "", SamplingParams(max_tokens=1, temperature=0.0), stream=True,
                                             prompt_token_ids=list(long_ids))
            engine.submit(engine.prepare(long_request), join)
            join.done.wait(600)
            first_long = join.times[0]
            for sink in streams:
                sink.cancelled = True
            for sink in streams:
                sink.done.wait(60)
        finally:
            engine.shutdown()

        def gaps(lo, hi):
            out = []
            for sink in streams:
                t = [x for x in sink.times if lo <= x <= hi]
                out += [(b - a) * 1e3 for a, b in zip(t, t[1:])]
            return out

        alone, during = gaps(alone_from, joined), gaps(joined, first_long)
        p50, p99 = statistics.median(alone), statistics.quantiles(during, n=100, method="inclusive")[98]
        ttft = (first_long - joined) * 1e3
        table.add_row(str(budget), f"{p50:.0f}", f"{p99:.0f}", f"{p99 / p50:.1f}x", f"{ttft:.0f}")
        rows.append({"bench": "chunked", "max_num_batched_tokens": budget, "itl_p50_alone_ms": round(p50, 1),
                     "itl_p99_joining_ms": round(p99, 1), "long_prompt_ttft_ms": round(ttft, 1)})
    console.print(table)


def capacity(rows: list[dict], max_model_len: int = 2048, slots: int = 4) -> None:
    probe = ModelRunner(default_llm_model_path(), lora=None, settings=RunnerSettings(max_model_len=64))
    budget = slots * max_model_len * probe.kv.shape.bytes_per_token
    del probe
    runner = ModelRunner(default_llm_model_path(), lora=None,
                         settings=RunnerSettings(max_model_len=max_model_len, max_num_seqs=64,
                                                 kv_cache_memory_bytes=budget))
    peak = Peak()
    engine, _ = _engine(runner, observer=peak, max_num_seqs=64, max_num_batched_tokens=2048)
    try:
        sinks = []
        for i in range(48):
            text = apply_chat_template(f"{i} " + " ".join(QUESTIONS[(i + j) % 64] for j in range(8)))
            ids = runner.encode(text)[:200]
            sink = Stamps()
            engine.submit(engine.prepare(GenerationRequest("cap", "", SamplingParams(max_tokens=256 - len(ids),
                                                                                     temperature=0.0,
                                                                                     ignore_eos=True),
                                                           prompt_token_ids=ids)), sink)
            sinks.append(sink)
        for sink in sinks:
            sink.done.wait(900)
    finally:
        engine.shutdown()
    table = Table(title=f"sequences of 256 tokens at one KV budget ({budget / 2**20:.0f} MiB = {slots} x max_model_len "
                        f"{max_model_len})")
    for col in ["slots (previous design)", "running at once (paged)", "ratio", "finished", "failed"]:
        table.add_column(col, justify="right")
    failed = sum(sink.error is not None or not sink.done.is_set() for sink in sinks)
    table.add_row(str(slots), str(peak.running), f"{peak.running / slots:.1f}x", str(len(sinks) - failed),
                  str(failed))
    console.print(table)
    rows.append({"bench": "capacity", "slots_before": slots, "running_paged": peak.running, "failed": failed,
                 "kv_mib": round(budget / 2**20)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=["prefix", "chunked", "capacity"],
                   choices=["prefix", "chunked", "capacity"])
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 256, 512])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "llm_engine")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    if {"prefix", "chunked"} & set(args.only):
        runner = ModelRunner(default_llm_model_path(), lora=LoRAServingConfig(max_loras=2, max_lora_rank=16),
                             settings=RunnerSettings(max_model_len=2048, max_num_seqs=16))
        console.print(f"SmolLM2-135M, {str(runner.dtype).removeprefix('torch.')}, {runner.kv.num_blocks} KV blocks")
        if "prefix" in args.only:
            prefix(runner, rows)
        if "chunked" in args.only:
            chunked(runner, args.budgets, rows)
    if "capacity" in args.only:
        capacity(rows)
    fields = sorted({k for r in rows for k in r})
    with open(args.out / "llm_engine.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"CSV: {args.out / 'llm_engine.csv'}")


if __name__ == "__main__":
    main()
