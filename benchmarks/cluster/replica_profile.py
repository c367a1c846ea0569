"""One replica's service-time profile, measured in-process on our real engine: the input of the cluster simulation.

    .venv/bin/python -m benchmarks.cluster.replica_profile                       # about 75 s on 2 cores
    .venv/bin/python -m benchmarks.cluster.replica_profile --out docs/data/replica_profile.csv

Builds the `llm` model's engine exactly as the Triton model does (`backends.llm.service.start_llm` with the
config.pbtxt parameters; no static adapters, no registry) and runs every measurement on the engine's own thread
(`LLMEngine.call`: torch work on a second thread slows every forward on 2 cores). Adapters: random rank-16 PEFT
adapters on q/k/v/o (S-LoRA's setting, the ones `benchmarks.serving` makes and caches). It measures:

- `decode`: one decode step (`ModelRunner.decode` + greedy sampling, what the engine runs every step) for batch
  sizes x distinct adapters in the batch x context length. The adapters sit in slots drawn at random among all
  `max_loras` slots (a full cache in steady state: the dense decode shrink reads every slot between the lowest and
  the highest used one, so adjacent slots would flatter the figure).
- `prefill`: one prefill forward of `rows` prompts of `prompt_tokens` tokens each (the left-padded join the
  scheduler builds, bounded by `max_num_batched_tokens`), with and without one distinct adapter per row.
- `load_cold`: disk -> host -> device slot through the real `LoRACache` (`get` then `acquire`), the adapter's files
  evicted from the page cache first (`posix_fadvise(DONTNEED)`); `load_disk_warm`: the same with the files in the
  page cache; `load_warm`: host cache -> device slot (`acquire` of an adapter in host memory but in no slot).
- `engine_request` (with `--validate`, on by default): a burst of story requests with power-law adapters through
  the whole engine (`submit`, streaming sinks), each request's prompt/output tokens, adapter, TTFT and finish
  time: `benchmarks.cluster.simulate --validate` replays it through the simulated replica.

Every step row holds the median over `samples` repeats and the 10th/90th percentiles. Prints a table, writes the
CSV (long form: one row per measured configuration; columns unused by a kind are empty).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from backends.settings import REPO_ROOT

console = Console(width=160)
FIELDS = ["kind", "batch", "distinct_adapters", "context_tokens", "rows", "prompt_tokens", "padded_tokens",
          "slot_span", "samples", "ms", "ms_p10", "ms_p90", "adapter", "output_tokens", "ttft_ms", "finish_ms",
          "max_loras", "max_cpu_loras", "max_num_seqs", "max_num_batched_tokens", "threads", "adapter_mb"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _summary(samples_ms: list[float]) -> dict:
    return {"samples": len(samples_ms), "ms": round(statistics.median(samples_ms), 3),
            "ms_p10": round(_pct(samples_ms, 0.1), 3), "ms_p90": round(_pct(samples_ms, 0.9), 3)}


def _evict_from_page_cache(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


class Profiler:
    """Measurements against a started engine; every method runs on the engine thread (through `engine.call`)."""

    def __init__(self, engine, folders: list[Path], seed: int):
        from backends.lora.manager.request import AdapterRef
        from backends.lora.store.ids import stable_lora_int_id

        self.engine = engine
        self.runner = engine.runner
        self.cache = engine.lora_cache
        self.max_loras = self.cache.max_loras
        self.refs = [AdapterRef(stable_lora_int_id(str(f)), f.name, str(f)) for f in folders]
        self.folders = folders
        self.rng = random.Random(seed)

    # -- helpers ---------------------------------------------------------------------------------------------
    def _clear_cache(self) -> None:
        for key in list(dict.fromkeys([*self.cache.device_ids(), *self.cache.host_ids()])):
            self.cache.remove(key)

    def fill_slots(self) -> dict[int, int]:
        """Every device slot holds one adapter (a full cache, as in steady state): slot -> adapter index."""
        by_slot = {}
        for i, ref in enumerate(self.refs[: self.max_loras]):
            slot = self.cache.acquire([ref])[0]
            self.cache.release([ref])
            by_slot[slot] = i
        return by_slot

    def _rows_lora(self, batch: int, k: int, by_slot: dict[int, int]):
        """Row r uses the (r mod k)-th of k slots drawn at random; returns the RowLoRAs and the slot span."""
        from backends.lora.ops.batch import RowLoRA

        if k == 0:
            return [RowLoRA()] * batch, 0
        slots = sorted(self.rng.sample(sorted(by_slot), k))
        rows = [RowLoRA.one(slots[r % k], 1.0) for r in range(batch)]
        return rows, slots[-1] - slots[0] + 1

    def _sample(self, logits, n: int) -> None:
        from backends.llm.params import SamplingParams
        from backends.llm.sampling import sample_next_tokens

        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        sample_next_tokens(logits, [greedy] * n, [None] * n)

    # -- measurements ------------------------------------------------------------------------------------------
    def decode(self, batch: int, k: int, context: int, repeats: int, by_slot: dict[int, int]) -> dict:
        from backends.lora.ops.batch import RowLoRA
        from tools.clients.steps import HandBatch

        vocab = self.runner.vocab_size
        hand = HandBatch(self.runner, [[self.rng.randrange(vocab) for _ in range(context)] for _ in range(batch)])
        hand.prefill([RowLoRA()] * batch)
        try:
            samples = []
            span = 0
            for i in range(repeats + 1):  # the first one warms up
                rows, span = self._rows_lora(batch, k, by_slot)
                tokens = [self.rng.randrange(vocab) for _ in range(batch)]
                started = time.perf_counter()
                logits = hand.decode(tokens, rows, advance=False)
                self._sample(logits, batch)
                if i:
                    samples.append((time.perf_counter() - started) * 1e3)
        finally:
            hand.free()
        return {"kind": "decode", "batch": batch, "distinct_adapters": k, "context_tokens": context,
                "slot_span": span, **_summary(samples)}

    def prefill(self, rows: int, tokens: int, lora: bool, repeats: int, by_slot: dict[int, int]) -> dict:
        from tools.clients.steps import HandBatch

        vocab = self.runner.vocab_size
        hand = HandBatch(self.runner, [[0] * tokens for _ in range(rows)])
        try:
            samples = []
            for i in range(repeats + 1):
                row_lora, _ = self._rows_lora(rows, min(rows, self.max_loras) if lora else 0, by_slot)
                hand.prompts = [[self.rng.randrange(vocab) for _ in range(tokens)] for _ in range(rows)]
                started = time.perf_counter()
                logits = hand.prefill(row_lora)
                self._sample(logits, rows)
                if i:
                    samples.append((time.perf_counter() - started) * 1e3)
        finally:
            hand.free()
        return {"kind": "prefill", "rows": rows, "prompt_tokens": tokens, "padded_tokens": rows * tokens,
                "distinct_adapters": min(rows, self.max_loras) if lora else 0, **_summary(samples)}

    def loads(self, count: int) -> list[dict]:
        """Cold (page cache evicted), disk-warm and host -> slot times through the real cache, `count` adapters."""
        out: dict[str, list[float]] = {"load_cold": [], "load_disk_warm": [], "load_warm": []}
        refs = self.refs[:count]
        for ref, folder in zip(refs, self.folders):
            for kind in ("load_cold", "load_disk_warm"):
                self._clear_cache()
                if kind == "load_cold":
                    _evict_from_page_cache(folder)
                started = time.perf_counter()
                self.cache.acquire([ref])  # get (disk -> host) + place (host -> slot)
                out[kind].append((time.perf_counter() - started) * 1e3)
                self.cache.release([ref])
            # host -> slot: in host memory, in no slot
            self.cache.remove(ref.key)
            self.cache.get(ref)
            started = time.perf_counter()
            self.cache.acquire([ref])
            out["load_warm"].append((time.perf_counter() - started) * 1e3)
            self.cache.release([ref])
        self._clear_cache()
        return [{"kind": kind, **_summary(v)} for kind, v in out.items()]


class _Sink:
    """Streaming output sink: first-chunk and final times, output tokens."""

    def __init__(self, started: float, done: threading.Semaphore):
        self.started, self.done = started, done
        self.first: float | None = None
        self.finish: float | None = None
        self.tokens = 0
        self.error: Exception | None = None

    def send(self, chunk, final: bool) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        if final:
            self.finish, self.tokens = now, chunk.num_output_tokens
            self.done.release()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.release()

    def is_cancelled(self) -> bool:
        return False


def validate_run(engine, profiler: Profiler, requests: int, max_tokens: int, alpha: float, seed: int) -> list[dict]:
    """A burst of `requests` story requests (adapters by power-law popularity over the profile's adapters), all
    submitted at t=0 to the real engine with an empty LoRA cache and the files out of the page cache."""
    from backends.llm.chat import apply_chat_template
    from backends.llm.params import GenerationRequest, SamplingParams
    from backends.lora.manager.request import LoRASelection
    from benchmarks.serving import story

    engine.call(profiler._clear_cache)
    for folder in profiler.folders:
        _evict_from_page_cache(folder)
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(len(profiler.refs))]
    done = threading.Semaphore(0)
    sinks, picks = [], []
    prepared = []
    for i in range(requests):
        pick = rng.choices(range(len(profiler.refs)), weights)[0]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        request = GenerationRequest(f"v{i}", apply_chat_template(story(i)), params, stream=True,
                                    lora=(LoRASelection(profiler.refs[pick], 1.0),))
        prepared.append(engine.prepare(request))
        picks.append(pick)
    started = time.perf_counter()
    for request in prepared:
        sink = _Sink(started, done)
        engine.submit(request, sink)
        sinks.append(sink)
    for _ in tqdm(range(requests), desc="engine burst", unit="req"):
        done.acquire()
    rows = []
    for request, pick, sink in zip(prepared, picks, sinks):
        if sink.error is not None:
            raise RuntimeError(f"validation request failed: {sink.error}")
        rows.append({"kind": "engine_request", "prompt_tokens": len(request.prompt_token_ids), "adapter": pick,
                     "output_tokens": sink.tokens, "ttft_ms": round((sink.first - started) * 1e3, 1),
                     "finish_ms": round((sink.finish - started) * 1e3, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "replica_profile.csv")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32],
                   help="decode batch sizes (the config's max_num_seqs is 32)")
    p.add_argument("--ks", type=int, nargs="+", default=[0, 1, 4, 8, 16], help="distinct adapters in a decode batch")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512],
                   help="decode context lengths (tokens cached per row); the k grid runs at the first one, the "
                        "others with k in {0, 4}")
    p.add_argument("--prefills", nargs="+", default=["1x16", "1x64", "1x256", "1x1024", "4x64", "4x256", "8x128",
                                                       "16x64"], help="ROWSxTOKENS prefill shapes")
    p.add_argument("--decode-repeats", type=int, default=7)
    p.add_argument("--prefill-repeats", type=int, default=3)
    p.add_argument("--load-adapters", type=int, default=8, help="adapters timed for the load rows")
    p.add_argument("--adapters", type=int, default=64, help="adapters generated/used (bench_serving's set)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--validate", type=int, default=48, help="requests in the engine burst (0: skip it)")
    p.add_argument("--validate-max-tokens", type=int, default=32)
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of the burst's adapter popularity")
    p.add_argument("--max-model-len", type=int, default=1024,
                   help="KV slot length (eager step times do not depend on it; 2048 would zero-fill 2.9 GB)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from backends.llm.service import start_llm
    from backends.offline.common import service_params
    from benchmarks.serving import bench_adapters

    folders = bench_adapters(args.adapters, args.rank, args.targets)
    params = service_params("llm", None, None, {"max_model_len": args.max_model_len})
    config = {k: int(params[k]) for k in ("max_loras", "max_cpu_loras", "max_num_seqs", "max_num_batched_tokens")}
    if max(args.ks) > config["max_loras"]:
        p.error(f"--ks up to {max(args.ks)} but max_loras is {config['max_loras']}")
    console.print(f"starting the engine ({config}) ...")
    service = start_llm(params)
    engine = service.engine
    prof = Profiler(engine, folders, args.seed)
    threads = engine.call(torch.get_num_threads)
    common = {**config, "threads": threads,
              "adapter_mb": round((folders[0] / "adapter_model.safetensors").stat().st_size / 1e6, 2)}
    rows: list[dict] = []
    try:
        rows += engine.call(lambda: prof.loads(args.load_adapters))
        by_slot = engine.call(prof.fill_slots)
        decode_cases = [(b, k, args.contexts[0]) for b in args.batches for k in args.ks if k <= b]
        decode_cases += [(b, k, c) for c in args.contexts[1:] for b in args.batches for k in (0, 4) if k <= b]
        for b, k, c in tqdm(decode_cases, desc="decode steps", unit="case"):
            rows.append(engine.call(lambda: prof.decode(b, k, c, args.decode_repeats, by_slot)))
        prefill_cases = [tuple(int(x) for x in s.lower().split("x")) for s in args.prefills]
        for (n, t), lora in tqdm([(c, lo) for c in prefill_cases for lo in (False, True)], desc="prefills",
                                 unit="case"):
            rows.append(engine.call(lambda: prof.prefill(n, t, lora, args.prefill_repeats, by_slot)))
        if args.validate:
            rows += validate_run(engine, prof, args.validate, args.validate_max_tokens, args.alpha, args.seed)
    finally:
        engine.shutdown()
    for r in rows:
        r.update(common)

    show(rows, threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {args.out} ({len(rows)} rows)")


def show(rows: list[dict], threads: int) -> None:
    loads = Table(title="adapter loads through LoRACache (median ms)")
    for c in ("kind", "samples", "ms", "p10", "p90"):
        loads.add_column(c, justify="right")
    for r in rows:
        if r["kind"].startswith("load"):
            loads.add_row(r["kind"], str(r["samples"]), f"{r['ms']:.1f}", f"{r['ms_p10']:.1f}", f"{r['ms_p90']:.1f}")
    console.print(loads)
    dec = [r for r in rows if r["kind"] == "decode"]
    ks = sorted({r["distinct_adapters"] for r in dec})
    for ctx in sorted({r["context_tokens"] for r in dec}):
        table = Table(title=f"decode step ms (median), context {ctx}, {threads} threads; k = distinct adapters")
        table.add_column("batch", justify="right")
        for k in ks:
            table.add_column(f"k={k}", justify="right")
        for b in sorted({r["batch"] for r in dec}):
            by_k = {r["distinct_adapters"]: r["ms"] for r in dec if r["batch"] == b and r["context_tokens"] == ctx}
            table.add_row(str(b), *[f"{by_k[k]:.1f}" if k in by_k else "" for k in ks])
        console.print(table)
    pre = Table(title="prefill ms (median)")
    for c in ("rows x tokens", "padded tokens", "base", "one adapter per row"):
        pre.add_column(c, justify="right")
    shapes = list(dict.fromkeys((r["rows"], r["prompt_tokens"]) for r in rows if r["kind"] == "prefill"))
    for n, t in shapes:
        got = {r["distinct_adapters"] > 0: r["ms"] for r in rows if r["kind"] == "prefill" and r["rows"] == n
               and r["prompt_tokens"] == t}
        pre.add_row(f"{n} x {t}", str(n * t), f"{got.get(False, float('nan')):.1f}",
                    f"{got.get(True, float('nan')):.1f}")
    console.print(pre)
    burst = [r for r in rows if r["kind"] == "engine_request"]
    if burst:
        end = max(r["finish_ms"] for r in burst) / 1e3
        tokens = sum(r["output_tokens"] for r in burst)
        console.print(f"engine burst: {len(burst)} requests, {tokens} tokens in {end:.1f} s = {tokens / end:.1f} "
                      f"tok/s; TTFT median {statistics.median(r['ttft_ms'] for r in burst):.0f} ms")


if __name__ == "__main__":
    main()
