"""Benchmark the base `llm` model through tritonserver with perf_analyzer, side by side with plain HF `generate`.

Same prompts (chat-templated), greedy, max_tokens 32, on this machine, in one run:
  - baseline: transformers `model.generate` in-process, one request after another
  - triton:   perf_analyzer --async --streaming over gRPC at each concurrency (continuous batching), a fixed
              request count after a warm-up round; tokens from the responses' `num_output_tokens`

    .venv/bin/python -m benchmarks.llm_platform [--concurrency 1 4 16] [--max-tokens 32] [--out bench_out]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backends.settings import REPO_ROOT, default_llm_model_path
from benchmarks.serving import perf_analyzer, summarise
from tools.launchers.triton import TritonServer, free_port
from tools.perf_inputs import QUESTIONS, build

console = Console(width=130)


def hf_generate_baseline(max_tokens: int, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.llm.chat import apply_chat_template

    path = default_llm_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [apply_chat_template(q, tokenizer=tok) for q in QUESTIONS]
    latencies, tokens = [], 0
    with torch.inference_mode():
        for i in range(rounds * len(prompts) + 1):
            ids = tok(prompts[i % len(prompts)], return_tensors="pt", add_special_tokens=False)
            started = time.perf_counter()
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            if i == 0:
                continue  # warm-up
            latencies.append(time.perf_counter() - started)
            # EOS excluded: Triton's num_output_tokens does not count it either.
            tokens += int((out[0, ids.input_ids.shape[1]:] != model.generation_config.eos_token_id).sum())
    total = sum(latencies)
    return {
        "path": "HF generate, in-process", "concurrency": 1, "req_per_s": len(latencies) / total,
        "tok_per_s": tokens / total, "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1e3,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="baseline passes over the 8 prompts")
    p.add_argument("--requests-per-stream", type=int, default=4, help="perf_analyzer requests = this x concurrency")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out")
    args = p.parse_args()

    rows = []
    with console.status("baseline: HF generate"):
        rows.append(hf_generate_baseline(args.max_tokens, args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = build(args.max_tokens, 0.0, stream=True)
        server = TritonServer(models=["llm"], http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), log_file=workdir / "tritonserver.log")
        with console.status("starting tritonserver"):
            server.start()
        try:
            with console.status("warm-up"):
                perf_analyzer(server, "llm", data, max(args.concurrency), max(args.concurrency), workdir)
            for c in args.concurrency:
                count = max(args.min_requests, args.requests_per_stream * c)
                with console.status(f"perf_analyzer concurrency {c}, {count} requests"):
                    r = summarise("Triton llm, perf_analyzer gRPC stream", 0, c,
                                  perf_analyzer(server, "llm", data, c, count, workdir))
                rows.append({"path": r.system, "concurrency": c, "req_per_s": r.req_per_s,
                             "tok_per_s": r.tok_per_s, "p50_ms": r.lat_p50_ms, "p99_ms": r.lat_p99_ms})
        finally:
            server.stop()

    base = rows[0]["tok_per_s"]
    table = Table(title=f"llm, SmolLM2-135M fp32, greedy, max_tokens {args.max_tokens}")
    for col in ("path", "concurrency", "req/s", "tok/s", "tok/s vs HF", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        r["tok_vs_hf"] = r["tok_per_s"] / base
        table.add_row(r["path"], str(r["concurrency"]), f"{r['req_per_s']:.2f}", f"{r['tok_per_s']:.1f}",
                      f"{r['tok_vs_hf']:.2f}x", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "llm_platform.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {csv_path}")


if __name__ == "__main__":
    main()
