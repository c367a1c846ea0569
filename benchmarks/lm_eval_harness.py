"""lm-eval's log-likelihood task through our server vs lm-eval's in-process Hugging Face backend, side by side.

A synthetic multiple-choice task (`--questions` arithmetic questions, 4 choices each: 4 log-likelihood requests per
question) runs twice with the same lm-eval: `local-completions` against tritonserver + our OpenAI frontend (token
ids, echo, logprobs; remote tokenizer), and `hf` with SmolLM2 loaded in lm-eval's own process. Both must give the
same accuracy (the same model, greedy scoring). Prints a table, writes bench_out/lm_eval.csv.

    PYTHONPATH=. .venv/bin/python -m benchmarks.lm_eval_harness [--questions 64]

lm-eval's `hf` backend needs torch and transformers in lm-eval's environment; they are installed there on first use
(the same torch pin as ours).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from backends.settings import REPO_ROOT, default_llm_model_path
from tools.client_envs import ensure_lm_eval
from tools.launchers.frontend import FrontendProcess
from tools.launchers.triton import TritonServer, free_port

console = Console()
TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


# lm-eval's local-completions settings measured: tokenizer backend (our /tokenize over HTTP, or the model folder's
# tokenizer in lm-eval's process) and concurrent requests.
CONFIGS = (("remote", 1), ("huggingface", 1), ("huggingface", 4))


def write_task(folder: Path, questions: int) -> None:
    rng = random.Random(0)
    with open(folder / "questions.jsonl", "w") as f:
        for _ in range(questions):
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            choices = sorted({a + b, a + b + 1, a + b - 1, a + b + 10})
            f.write(json.dumps({"question": f"What is {a} + {b}?", "choices": [str(c) for c in choices],
                                "answer": choices.index(a + b)}) + "\n")
    (folder / "bench_mc.yaml").write_text(TASK)


def torch_pin() -> str:
    return next(line.strip() for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if line.startswith("torch=="))


def ensure_hf_backend(lm_eval: Path) -> None:
    python = lm_eval.parent / "python"
    if subprocess.run([str(python), "-c", "import torch, transformers, accelerate"], capture_output=True).returncode:
        with console.status("installing torch + transformers into lm-eval's environment (once)"):
            subprocess.run([str(python), "-m", "pip", "install", "-q", torch_pin(), "lm_eval[hf]"], check=True)


def run(lm_eval: Path, folder: Path, model: str, model_args: str, batch_size: int, env: dict) -> tuple[float, float]:
    out = folder / f"out-{model}"
    started = time.perf_counter()
    proc = subprocess.run([str(lm_eval), "run", "--model", model, "--model_args", model_args, "--tasks", "bench_mc",
                           "--batch_size", str(batch_size), "--include_path", str(folder), "--output_path", str(out)],
                          cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"lm-eval ({model}) failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["bench_mc"]
    return seconds, results["acc,none"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per request / per hf forward")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out")
    args = p.parse_args()
    lm_eval = ensure_lm_eval()
    ensure_hf_backend(lm_eval)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_task(folder, args.questions)
        env = {**os.environ, "HF_HOME": str(folder / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OPENAI_API_KEY": "unused"}
        server = TritonServer(models=["llm"], http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                              log_file=folder / "tritonserver.log")
        with console.status("starting tritonserver and the frontend"):
            server.start()
            frontend = FrontendProcess(server.grpc_url, None, folder / "frontend.log").start()
        try:
            for tokenizer, concurrent in CONFIGS:
                local = f"tokenizer={default_llm_model_path()}" if tokenizer == "huggingface" else None
                served = ",".join(filter(None, [
                    "model=llm", f"base_url={frontend.url}/v1/completions", f"tokenizer_backend={tokenizer}", local,
                    "tokenized_requests=True", f"num_concurrent={concurrent}", "max_retries=1"]))
                name = f"ours: {tokenizer} tokenizer, {concurrent} concurrent"
                with console.status(f"lm-eval local-completions against our server ({name})"):
                    rows.append((name, *run(lm_eval, folder, "local-completions", served, args.batch_size, env)))
        finally:
            frontend.stop()
            server.stop()
        in_process = f"pretrained={default_llm_model_path()},dtype=float32"
        with console.status("lm-eval hf backend in-process"):
            rows.append(("lm-eval hf backend in-process", *run(lm_eval, folder, "hf", in_process, args.batch_size, env)))
    baseline = rows[-1][1]
    table = Table(title=f"lm-eval log-likelihood task: {args.questions} questions x 4 choices, batch "
                        f"{args.batch_size}")
    for column in ("backend", "wall s", "vs hf", "acc"):
        table.add_column(column, justify="right")
    for name, seconds, acc in rows:
        table.add_row(name, f"{seconds:.1f}", f"{seconds / baseline:.2f}x", f"{acc:.3f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lm_eval.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["backend", "wall_s", "vs_hf", "acc"])
        writer.writerows([(n, f"{s:.2f}", f"{s / baseline:.3f}", acc) for n, s, acc in rows])
    console.print(f"wrote {args.out / 'lm_eval.csv'}")


if __name__ == "__main__":
    main()
