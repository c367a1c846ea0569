"""Offline text generation (backends.offline.TextGenerator) vs the same requests through tritonserver, side by side.

64 chat prompts, 8 random adapters (8 prompts each, interleaved) plus none, greedy, `--max-tokens` each, all
submitted at once to an engine with the same settings (`--max-num-seqs` running sequences, 8 LoRA slots): the
offline generator in this process, then the `llm` model through gRPC streams (one per request). Prints a table and
writes bench_out/offline.csv. Target: offline throughput within 10% of the server's.

    PYTHONPATH=. .venv/bin/python -m benchmarks.offline
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backends.llm.chat import apply_chat_template
from backends.settings import REPO_ROOT, cache_dir
from tools.fixtures.adapters import ALL_PROJECTIONS, load_smollm2, make_random_adapters
from tools.launchers.triton import TritonServer, copy_model, free_port

console = Console()
QUESTIONS = ["What is the capital of France?", "Tell me about cats.", "Name three primary colours.",
             "Why is the sky blue?", "Count to five.", "What is 2+2?", "Say hi.", "Describe a tree."]


def adapters(count: int) -> list[Path]:
    folder = cache_dir() / "adapters" / "random"
    outs = [folder / f"lora{i}" for i in range(count)]
    todo = [i for i, out in enumerate(outs) if not (out / "adapter_model.safetensors").is_file()]
    if todo:
        make_random_adapters(load_smollm2, [outs[i] for i in todo], todo, r=16, lora_alpha=32,
                             target_modules=ALL_PROJECTIONS)
    return outs


def jobs(count: int, paths: list[Path]) -> list[tuple[str, Path | None]]:
    return [(QUESTIONS[i % len(QUESTIONS)], paths[i % len(paths)] if i % (len(paths) + 1) else None)
            for i in range(count)]


def offline(work, max_tokens: int, max_num_seqs: int) -> tuple[float, int]:
    from backends.offline import LoRA, TextGenerator

    with TextGenerator(max_num_seqs=max_num_seqs, max_loras=8) as llm:
        llm.generate("warm-up", max_tokens=2, progress=False)
        started = time.perf_counter()
        outs = llm.generate([[{"role": "user", "content": q}] for q, _ in work],
                            lora=[LoRA(path=str(p)) if p else None for _, p in work], max_tokens=max_tokens,
                            temperature=0, progress=False)
        return time.perf_counter() - started, sum(o.completion_tokens for o in outs)


def served(work, max_tokens: int, max_num_seqs: int, folder: Path) -> tuple[float, int]:
    import tritonclient.grpc as grpcclient

    from tools.clients.llm import generate

    repo = folder / "repo"
    copy_model(repo, "llm", "llm", {"max_num_seqs": str(max_num_seqs), "max_loras": "8", "lora_modules": ""})
    server = TritonServer(model_repository=repo, models=["llm"], http_port=free_port(), grpc_port=free_port(),
                          metrics_port=free_port(), log_file=folder / "tritonserver.log")
    with console.status("starting tritonserver"):
        server.start()

    def one(job) -> int:
        question, path = job
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            out = generate(client, apply_chat_template(question), max_tokens=max_tokens, temperature=0.0,
                           timeout=600, **({"lora_path": str(path)} if path else {}))
        finally:
            client.close()
        if out.error is not None:
            raise out.error
        return out.num_output_tokens

    try:
        one(("warm-up", None))
        started = time.perf_counter()
        with ThreadPoolExecutor(len(work)) as pool:
            tokens = sum(pool.map(one, work))
        return time.perf_counter() - started, tokens
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out")
    args = p.parse_args()
    work = jobs(args.prompts, adapters(args.adapters))
    rows = []
    with console.status("offline TextGenerator"):
        rows.append(("offline TextGenerator (in-process)", *offline(work, args.max_tokens, args.max_num_seqs)))
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("tritonserver llm model (gRPC streams)",
                     *served(work, args.max_tokens, args.max_num_seqs, Path(tmp))))
    server_rate = rows[1][2] / rows[1][1]
    table = Table(title=f"{args.prompts} prompts, {args.adapters} adapters + base, {args.max_tokens} tokens max, "
                        f"max_num_seqs {args.max_num_seqs}")
    for column in ("path", "s", "tokens", "tok/s", "vs server"):
        table.add_column(column, justify="right")
    for name, seconds, tokens in rows:
        table.add_row(name, f"{seconds:.1f}", str(tokens), f"{tokens / seconds:.1f}",
                      f"{tokens / seconds / server_rate:.2f}x")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "offline.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "seconds", "tokens", "tok_per_s"])
        writer.writerows([(n, f"{s:.2f}", t, f"{t / s:.2f}") for n, s, t in rows])
    console.print(f"wrote {args.out / 'offline.csv'}")


if __name__ == "__main__":
    main()
