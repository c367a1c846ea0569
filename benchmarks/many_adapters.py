"""Thousands of adapters through the OpenAI frontend: throughput against the base model with 2,000 distinct adapters
(Zipf popularity) and 64 uniformly used ones, the TTFT a cold adapter adds to its own request, what cold loads do to
other streams' inter-token latency, and the size of /metrics after every adapter was seen.

    .venv/bin/python -m benchmarks.many_adapters                      # the figures in docs/benchmarks.md (~20 min)
    .venv/bin/python -m benchmarks.many_adapters --adapters 200 --requests 64 --rounds 1   # a quick look

Adapters: one random PEFT adapter made by PEFT (r 8 on q_proj), and --adapters copies with the same config and fresh
random weights (distinct contents: no two share a prefix-cache entry), cached under .cache/bench/many_adapters.
All are registered through `/v1/load_lora_adapter` and asked for by name (`model=<adapter>`), as a vLLM user does.
Every request streams exactly --max-tokens tokens (`ignore_eos`) from a distinct prompt. One tritonserver (`llm`
with its defaults, 16 slots and 64 adapters in host memory, but without the static demo adapters: pinned, they
would hold 2 slots that nobody here asks for; `--keep-static` keeps them) and one frontend serve every case; cases
take turns --rounds times and each keeps its best round (the least disturbed one on a shared machine).

Cases: base (no adapter); uniform over 64 adapters; Zipf(--alpha) over all adapters (request share of adapter i ~
1 / i ** alpha, so most requests go to a few and the tail is cold). Then: cold TTFT (an idle server, a request for a
never-seen adapter against one for a resident adapter, alternated); others' ITL (--concurrency/4 base streams
while an adapter request arrives every 0.5 s, warm adapters against never-seen ones); a sweep asking every adapter
once (the burst of distinct adapters), after which /metrics of the frontend and of Triton are measured.
Prints a table, writes CSV.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from backends.settings import ALLOWED_LORA_ROOTS_ENV, LORA_REGISTRY_ENV, cache_dir
from tools.fixtures.adapters import load_smollm2, make_random_adapter
from tools.launchers.frontend import FrontendProcess
from tools.launchers.triton import TritonServer, copy_model, free_port

console = Console(width=150)
ADMIN = "bench-admin"
TOPICS = ["a dragon who bakes bread", "a lighthouse keeper", "a robot learning to paint", "the first snow",
          "a lost cat in Paris", "two friends on a train", "a garden on Mars", "an old violin"]
WEIGHTS = "adapter_model.safetensors"


def make_adapters(root: Path, count: int, rank: int) -> list[Path]:
    """`count` distinct adapters (PEFT's files for the first; the rest fresh random weights in its layout)."""
    root.mkdir(parents=True, exist_ok=True)
    template = root / "a00000"
    if not (template / WEIGHTS).is_file():
        make_random_adapter(load_smollm2, template, seed=0, std=0.02, r=rank, lora_alpha=2 * rank,
                            target_modules=["q_proj"], base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    shapes = {k: v.shape for k, v in load_file(template / WEIGHTS).items()}
    folders = [root / f"a{i:05d}" for i in range(count)]
    gen = torch.Generator().manual_seed(1)
    for i, folder in enumerate(tqdm(folders, desc="adapters", unit="adapter")):
        if (folder / WEIGHTS).is_file():
            continue
        folder.mkdir(exist_ok=True)
        shutil.copy(template / "adapter_config.json", folder / "adapter_config.json")
        save_file({k: torch.randn(s, generator=gen) * 0.02 for k, s in shapes.items()}, folder / WEIGHTS)
    return folders


@dataclass
class Result:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def chat(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    out, start, last = Result(), time.perf_counter(), None
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                await reply.aread()
                out.error = f"{reply.status_code}: {reply.text[:200]}"
                return out
            async for line in reply.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    out.error = str(event["error"])[:200]
                    return out
                if event.get("usage"):
                    out.tokens = event["usage"]["completion_tokens"]
                if any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
                    now = time.perf_counter()
                    if last is None:
                        out.ttft = now - start
                    else:
                        out.gaps.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


@dataclass
class Row:
    case: str
    requests: int
    errors: int
    tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p99_ms: float
    distinct: int
    ratio: float = 1.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def load_case(url: str, name: str, models: list[str], concurrency: int, max_tokens: int,
                    seed: int) -> Row:
    """Every model in `models` once (in order), `concurrency` at a time."""
    queue = list(enumerate(models))
    results: list[Result] = []
    rng = random.Random(seed)

    async def worker(http):
        while queue:
            i, model = queue.pop(0)
            prompt = f"Story {seed}-{i}: write about {rng.choice(TOPICS)}."
            results.append(await chat(http, url, model, prompt, max_tokens))

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    if errors:
        console.print(f"[red]{name}: {len(errors)} errors, e.g. {errors[0]}")
    return Row(name, len(results), len(errors), sum(r.tokens for r in ok) / wall,
               1000 * pct([r.ttft for r in ok if r.ttft is not None], 0.5),
               1000 * pct([r.ttft for r in ok if r.ttft is not None], 0.99),
               1000 * pct([g for r in ok for g in r.gaps], 0.99), len(set(models)))


async def cold_ttft(url: str, warm: str, cold: list[str], max_tokens: int) -> tuple[float, float]:
    """Median TTFT of a resident adapter's request and of a never-seen adapter's, on an idle server, alternated."""
    warm_t, cold_t = [], []
    async with httpx.AsyncClient(timeout=600) as http:
        await chat(http, url, warm, "warm up", 2)
        for i, name in enumerate(cold):
            w = await chat(http, url, warm, f"Question {i}: name a colour.", max_tokens)
            c = await chat(http, url, name, f"Question {i}: name a colour.", max_tokens)
            if w.error or c.error:
                raise RuntimeError(w.error or c.error)
            warm_t.append(w.ttft)
            cold_t.append(c.ttft)
    return 1000 * statistics.median(warm_t), 1000 * statistics.median(cold_t)


async def others_itl(url: str, injected: list[str], streams: int, seconds: float, max_tokens: int) -> float:
    """ITL p99 of `streams` base streams while a request for the next of `injected` arrives every 0.5 s."""
    gaps: list[float] = []
    deadline = time.perf_counter() + seconds

    async def base_stream(http, k):
        i = 0
        while time.perf_counter() < deadline:
            r = await chat(http, url, "llm", f"Stream {k}-{i}: tell a story about {TOPICS[i % 8]}.", max_tokens)
            if r.error:
                raise RuntimeError(r.error)
            gaps.extend(r.gaps)
            i += 1

    async def injector(http):
        tasks = []
        for i, name in enumerate(injected):
            if time.perf_counter() >= deadline:
                break
            tasks.append(asyncio.create_task(chat(http, url, name, f"Injected {i}: say hi.", 4)))
            await asyncio.sleep(0.5)
        for r in await asyncio.gather(*tasks):
            if r.error:
                raise RuntimeError(r.error)

    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(injector(http), *(base_stream(http, k) for k in range(streams)))
    return 1000 * pct(gaps, 0.99)


def zipf(names: list[str], n: int, alpha: float, rng: random.Random) -> list[str]:
    weights = [1 / (i + 1) ** alpha for i in range(len(names))]
    return rng.choices(names, weights=weights, k=n)


async def register(url: str, folders: list[Path]) -> float:
    start = time.perf_counter()
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(timeout=120) as http:
        for folder in tqdm(folders, desc="register (/v1/load_lora_adapter)", unit="adapter"):
            reply = await http.post(url + "/v1/load_lora_adapter", headers=headers,
                                    json={"lora_name": folder.name, "lora_path": str(folder)})
            if reply.status_code != 200:
                raise RuntimeError(f"loading {folder}: {reply.status_code} {reply.text}")
    return time.perf_counter() - start


def metrics_bytes(url: str) -> int:
    return len(httpx.get(url, timeout=30).content)


async def run(args) -> None:
    extra = 2 * args.cold  # never-seen adapters for the cold-TTFT and ITL phases
    folders = make_adapters(cache_dir() / "bench" / "many_adapters" / f"r{args.rank}_q", args.adapters + extra,
                            args.rank)
    served, spare = folders[:args.adapters], folders[args.adapters:]
    work = Path(tempfile.mkdtemp(prefix="many-adapters-"))
    root = folders[0].parent
    registry = work / "registry.json"
    env = {**os.environ, ALLOWED_LORA_ROOTS_ENV: str(root), LORA_REGISTRY_ENV: str(registry)}
    repo = work / "repo"
    params = {"lora_registry_file": str(registry), "allowed_lora_roots": str(root), "max_loras": str(args.max_loras)}
    if not args.keep_static:
        params["lora_modules"] = ""  # the demo adapters would hold 2 of the slots (pinned) for nobody here
    copy_model(repo, "llm", "llm", params)
    server = TritonServer(model_repository=repo, models=["llm"], http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), log_file=work / "tritonserver.log", env=env)
    server.start(600)
    frontend = FrontendProcess(server.grpc_url, server.metrics_url, work / "frontend.log", "--admin-key", ADMIN,
                               "--allow-runtime-lora-updating", "--lora-registry-file", str(registry), env=env)
    frontend.start()
    url = frontend.url
    try:
        sizes = {"frontend /metrics, start": metrics_bytes(url + "/metrics"),
                 "triton metrics, start": metrics_bytes(server.metrics_url)}
        seconds = await register(url, folders)
        console.print(f"registered {len(folders)} adapters in {seconds:.1f} s")
        names = [f.name for f in served]
        rng = random.Random(args.seed)
        cases = {"base": ["llm"] * args.requests,
                 f"uniform over {args.uniform}": [rng.choice(names[:args.uniform]) for _ in range(args.requests)],
                 f"Zipf {args.alpha} over {len(names)}": zipf(names, args.requests, args.alpha, rng)}
        # Warm-up: the uniform set's adapters once each (resident in host memory as any long-running server's
        # working set would be) and one round of base.
        await load_case(url, "warm-up", names[:args.uniform] + ["llm"] * args.concurrency, args.concurrency, 4, 0)
        best: dict[str, Row] = {}
        for round_ in range(args.rounds):
            for name, models in cases.items():
                row = await load_case(url, name, models, args.concurrency, args.max_tokens, seed=round_ + 1)
                console.print(f"round {round_ + 1}: {name}: {row.tok_s:.1f} tok/s")
                if name not in best or row.tok_s > best[name].tok_s:
                    best[name] = row
        for row in best.values():
            row.ratio = row.tok_s / best["base"].tok_s

        cold_names = [f.name for f in spare[:args.cold]]
        warm_ms, cold_ms = await cold_ttft(url, names[0], cold_names, args.max_tokens)
        streams = max(1, args.concurrency // 4)
        itl_base = await others_itl(url, [], streams, args.itl_seconds, args.max_tokens)
        itl_warm = await others_itl(url, [names[i % args.uniform] for i in range(100)], streams, args.itl_seconds,
                                    args.max_tokens)
        itl_cold = await others_itl(url, [f.name for f in spare[args.cold:]] + names[:args.uniform - 1:-1], streams,
                                    args.itl_seconds, args.max_tokens)
        sweep = await load_case(url, "sweep: every adapter once (max_tokens 2)", names, args.concurrency, 2, 99)
        sizes["frontend /metrics, after every adapter"] = metrics_bytes(url + "/metrics")
        sizes["triton metrics, after every adapter"] = metrics_bytes(server.metrics_url)
    finally:
        frontend.stop()
        server.stop()

    table = Table(title=f"{len(names)} adapters through the frontend, c={args.concurrency}, {args.max_tokens} tokens "
                        f"per request (best of {args.rounds} rounds)")
    for col in ("case", "requests", "errors", "distinct models", "tok/s", "vs base", "TTFT p50 ms", "TTFT p99 ms",
                "ITL p99 ms"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for row in [*best.values(), sweep]:
        table.add_row(row.case, str(row.requests), str(row.errors), str(row.distinct), f"{row.tok_s:.1f}",
                      f"{row.tok_s / best['base'].tok_s:.2f}x" if row is not sweep else "-", f"{row.ttft_p50_ms:.0f}",
                      f"{row.ttft_p99_ms:.0f}", f"{row.itl_p99_ms:.0f}")
    console.print(table)
    extra_table = Table(title="cold adapters and /metrics")
    extra_table.add_column("measure")
    extra_table.add_column("value", justify="right")
    extra_table.add_row("TTFT, resident adapter (idle server, median)", f"{warm_ms:.1f} ms")
    extra_table.add_row("TTFT, never-seen adapter (idle server, median)", f"{cold_ms:.1f} ms")
    extra_table.add_row("cold adapter adds to its own TTFT", f"{cold_ms - warm_ms:+.1f} ms")
    extra_table.add_row(f"others' ITL p99: {streams} base streams alone", f"{itl_base:.1f} ms")
    extra_table.add_row("  + a resident adapter's request every 0.5 s", f"{itl_warm:.1f} ms")
    extra_table.add_row("  + a never-seen adapter's request every 0.5 s", f"{itl_cold:.1f} ms")
    for name, size in sizes.items():
        extra_table.add_row(name, f"{size / 1000:.1f} kB")
    console.print(extra_table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(sweep)))
        writer.writeheader()
        for row in [*best.values(), sweep]:
            writer.writerow(asdict(row))
    extras = {"ttft_resident_ms": warm_ms, "ttft_cold_ms": cold_ms, "itl_p99_base_ms": itl_base,
              "itl_p99_warm_injected_ms": itl_warm, "itl_p99_cold_injected_ms": itl_cold,
              **{k: v for k, v in sizes.items()}}
    out.with_suffix(".json").write_text(json.dumps(extras, indent=1))
    console.print(f"wrote {out} and {out.with_suffix('.json')}; logs in {work}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=2000)
    parser.add_argument("--uniform", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=1.1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cold", type=int, default=8)
    parser.add_argument("--itl-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-loras", type=int, default=16)
    parser.add_argument("--keep-static", action="store_true",
                        help="keep the model's static (pinned) demo adapters: they hold 2 of the slots")
    parser.add_argument("--out", default=str(cache_dir() / "bench" / "many_adapters.csv"))
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
