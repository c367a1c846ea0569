"""Multi-LoRA serving benchmark: perf_analyzer against the `llm` model with S-LoRA style adapter traces, side by
side with the base model and with a per-request PEFT server (the baseline a user would write by hand).

    .venv/bin/python -m scripts.bench_serving                     # full table (about 15 minutes)
    .venv/bin/python -m scripts.bench_serving --concurrency 1 16 --adapters 8 --skip-peft

Rows: base only; 1 adapter; n adapters (random, rank 16, generated once and cached) with popularity following a
power law (request share of adapter i ~ 1 / (i + 1) ** alpha, S-LoRA's trace); and the PEFT baseline
(`scripts/bench_peft_model.py`) on the largest adapter set. Every run is `perf_analyzer --async --streaming -i grpc`
with a fixed request count; its profile export gives TTFT and inter-token latency per request. One tritonserver
serves both models from a temporary repository; each adapter set is warmed up (every adapter loaded once) before
it is measured. Prints a table with ratios to base, writes CSV + PNG.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import statistics
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backends.llm.chat import apply_chat_template
from backends.settings import REPO_ROOT, adapters_dir
from scripts.make_adapters import load_smollm2, make_random_adapters
from scripts.triton_launcher import TritonServer, copy_model, free_port

console = Console(width=160)
TOPICS = ["a dragon who bakes bread", "a lighthouse keeper", "a robot learning to paint", "the first snow",
          "a lost cat in Paris", "two friends on a train", "a garden on Mars", "an old violin"]
PEFT_MODEL = "llm_peft"


@dataclass
class Row:
    system: str
    adapters: int
    concurrency: int
    requests: int
    tok_per_s: float
    req_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tok_vs_base: float = float("nan")


def bench_adapters(count: int, rank: int, targets: list[str]) -> list[Path]:
    root = adapters_dir() / "bench" / f"r{rank}-{'-'.join(t.split('_')[0] for t in targets)}"
    folders = [root / f"lora{i}" for i in range(count)]
    todo = [i for i, f in enumerate(folders) if not (f / "adapter_model.safetensors").is_file()]
    if todo:
        make_random_adapters(load_smollm2, [folders[i] for i in todo], [1000 + i for i in todo], r=rank,
                             lora_alpha=2 * rank, target_modules=targets,
                             base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    return folders


def trace(adapters: list[Path], entries: int, alpha: float, max_tokens: int, seed: int = 0) -> dict:
    """perf_analyzer input data: story prompts, each with an adapter drawn by power-law popularity."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** alpha for i in range(len(adapters))]
    data = []
    for i in range(entries):
        entry = {"text_input": [apply_chat_template(f"Write a story about {TOPICS[i % len(TOPICS)]}.")],
                 "max_tokens": [max_tokens], "temperature": [0.0], "stream": [True]}
        if adapters:
            folder = rng.choices(adapters, weights)[0]
            entry.update(lora_name=[folder.name], lora_path=[str(folder)])
        data.append(entry)
    return {"data": data}


def warmup_data(adapters: list[Path]) -> dict:
    prompt = apply_chat_template("Hi")
    return {"data": [{"text_input": [prompt], "max_tokens": [1], "stream": [True], "lora_name": [f.name],
                      "lora_path": [str(f)]} for f in adapters]}


def write_repository(root: Path, max_loras: int, max_cpu_loras: int, max_num_seqs: int) -> Path:
    repo = root / "repo"
    overrides = {"lora_modules": "", "max_loras": str(max_loras), "max_cpu_loras": str(max_cpu_loras),
                 "max_num_seqs": str(max_num_seqs)}
    text = (copy_model(repo, "llm", "llm", overrides) / "config.pbtxt").read_text()
    peft = repo / PEFT_MODEL
    (peft / "1").mkdir(parents=True)
    (peft / "config.pbtxt").write_text(re.sub(r'name: "llm"', f'name: "{PEFT_MODEL}"', text, count=1))
    (peft / "1" / "model.py").write_text("from scripts.bench_peft_model import TritonPythonModel  # noqa: F401\n")
    return repo


def perf_analyzer(server: TritonServer, model: str, data: dict, concurrency: int, requests: int,
                  workdir: Path) -> list[dict]:
    """Run perf_analyzer for `requests` requests; returns the per-request records of its profile export."""
    inputs, export = workdir / "inputs.json", workdir / "export.json"
    inputs.write_text(json.dumps(data))
    export.unlink(missing_ok=True)
    cmd = [str(REPO_ROOT / "scripts" / "perf_analyzer"), "-m", model, "-u", server.grpc_url, "-i", "grpc",
           "--async", "--streaming", "--input-data", str(inputs), f"--concurrency-range={concurrency}",
           f"--request-count={requests}", f"--profile-export-file={export}"]
    console.print(f"[dim]$ {' '.join(cmd)}[/dim]")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    experiments = json.loads(export.read_text())["experiments"]
    return [r for e in experiments for r in e["requests"]]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(system: str, n: int, concurrency: int, records: list[dict]) -> Row:
    ttft, itl, tokens = [], [], 0
    starts, ends = [], []
    for r in records:
        # Token responses; the last one is the final (empty) response that closes the stream.
        stamps = r["response_timestamps"][:-1] or r["response_timestamps"]
        tokens += len(stamps)
        ttft.append((stamps[0] - r["timestamp"]) / 1e6)
        itl += [(b - a) / 1e6 for a, b in zip(stamps, stamps[1:])]
        starts.append(r["timestamp"])
        ends.append(r["response_timestamps"][-1])
    seconds = (max(ends) - min(starts)) / 1e9
    return Row(system, n, concurrency, len(records), tokens / seconds, len(records) / seconds,
               statistics.median(ttft), _pct(ttft, 99), statistics.median(itl) if itl else float("nan"),
               _pct(itl, 99))


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for system in dict.fromkeys(r.system for r in rows):
        mine = [r for r in rows if r.system == system]
        ax.plot([r.concurrency for r in mine], [r.tok_per_s for r in mine], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency")
    ax.set_ylabel("generated tokens / s")
    ax.set_title("llm serving, SmolLM2-135M fp32, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64], help="adapter-set sizes")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law popularity exponent (0 = uniform)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                   help="adapter target modules (S-LoRA's setting by default)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=4, help="requests measured = this x concurrency")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--peft-concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out")
    args = p.parse_args()

    adapters = bench_adapters(max(args.adapters), args.rank, args.targets)
    scenarios = [("base", "llm", [])] + [(f"{n} adapter{'s' * (n > 1)}", "llm", adapters[:n])
                                          for n in args.adapters]
    if not args.skip_peft:
        scenarios.append((f"PEFT per-request, {max(args.adapters)} adapters", PEFT_MODEL,
                          adapters[: max(args.adapters)]))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        repo = write_repository(workdir, args.max_loras, max(64, max(args.adapters)), args.max_num_seqs)
        models = ["llm"] + ([] if args.skip_peft else [PEFT_MODEL])
        server = TritonServer(model_repository=repo, models=models, http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), log_file=workdir / "tritonserver.log")
        with console.status("starting tritonserver"):
            server.start()
        try:
            for system, model, subset in scenarios:
                if subset:
                    with console.status(f"{system}: warm-up (loading {len(subset)} adapters)"):
                        perf_analyzer(server, model, warmup_data(subset), min(16, len(subset)), len(subset),
                                      workdir)
                levels = args.peft_concurrency if model == PEFT_MODEL else args.concurrency
                for c in levels:
                    count = max(args.min_requests, args.requests_per_stream * c)
                    data = trace(subset, max(count, 64), args.alpha, args.max_tokens)
                    with console.status(f"{system}: concurrency {c}, {count} requests"):
                        records = perf_analyzer(server, model, data, c, count, workdir)
                    rows.append(summarise(system, len(subset), c, records))
                    console.print(rows[-1])
        finally:
            server.stop()

    base = {r.concurrency: r.tok_per_s for r in rows if r.system == "base"}
    for r in rows:
        r.tok_vs_base = r.tok_per_s / base[r.concurrency] if r.concurrency in base else float("nan")
    table = Table(title=f"llm serving: SmolLM2-135M fp32, greedy, max_tokens {args.max_tokens}, rank {args.rank} "
                        f"on {','.join(args.targets)}, popularity alpha {args.alpha}")
    for col in ("system", "conc.", "requests", "tok/s", "vs base", "req/s", "TTFT p50 ms", "TTFT p99 ms",
                "ITL p50 ms", "ITL p99 ms"):
        table.add_column(col, justify="left" if col == "system" else "right")
    for r in rows:
        table.add_row(r.system, str(r.concurrency), str(r.requests), f"{r.tok_per_s:.1f}", f"{r.tok_vs_base:.2f}x",
                      f"{r.req_per_s:.2f}", f"{r.ttft_p50_ms:.0f}", f"{r.ttft_p99_ms:.0f}", f"{r.itl_p50_ms:.0f}",
                      f"{r.itl_p99_ms:.0f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "llm_serving.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    plot(rows, args.out / "llm_serving.png")
    console.print(f"wrote {args.out / 'llm_serving.csv'} and {args.out / 'llm_serving.png'}")


if __name__ == "__main__":
    main()
