"""Peer benchmark: our server (tritonserver + the OpenAI frontend) against vLLM for CPU, on the same model, adapters,
prompts and client, one server at a time (never both), in the order ours, vLLM, vLLM, ours; each case keeps its
better round (on a shared machine, the less disturbed one).

    .venv/bin/python -m benchmarks.peer_vllm                          # base, 8, 64 and 2,000 (Zipf) adapters
    .venv/bin/python -m benchmarks.peer_vllm --zipf 0 --requests 32   # shorter

vLLM comes from its own environment (requirements-vllm.txt, made on first use by tools.client_envs) and runs with
its CPU defaults (`VLLM_CPU_KVCACHE_SPACE` GiB of KV, its own thread split), the same `--dtype` as ours (default
bfloat16, both engines' CPU default on a CPU with AVX512-BF16), every request with `ignore_eos` (fixed length),
`--enable-lora --max-loras 16 --max-lora-rank 16 --max-cpu-loras 64`; the demo adapters reach it through
`--lora-modules`, the benchmark adapters through its runtime API (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`,
`/v1/load_lora_adapter` once each after start; its filesystem resolver plugin answered 404 for them here).
Ours gets the same limits (config parameters) and every adapter as a `--lora-modules` entry of the frontend
(registered, loaded on first use). The client is the openai SDK streaming chat with usage
(`benchmarks.serving.stream_chat`): output tok/s counts the servers' usage tokens, TTFT and ITL come from the
stream. Memory is the resident set of each server's whole process tree after its run.

Before measuring, both answer the same greedy chat prompts with the base model and each demo adapter; the first
character where their texts differ is reported (the same dtype on both sides, but different kernels: a late
divergence on a near-tie is expected, an early one is a bug). Prints a table with ours/vLLM ratios, writes CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from backends.settings import LORA_REGISTRY_ENV, REPO_ROOT, adapters_dir, default_llm_model_path
from benchmarks.serving import Row, bench_adapters, story, stream_chat, summarise
from tools.client_envs import VLLM
from tools.launchers.frontend import FrontendProcess
from tools.launchers.triton import TritonServer, copy_model, free_port

console = Console(width=170)
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the bench adapters' base_model_name_or_path
DEMO = ["uppercase", "signature"]
CHECK_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
                 "Explain what a LoRA adapter is in one sentence."]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass
class Case:
    label: str
    concurrency: int
    adapters: list[str]  # adapter names drawn per request; [] = the base model
    weights: list[float] | None = None  # popularity (None = uniform)


@dataclass
class Result:
    case: str
    system: str
    row: Row
    finished_by_length: float  # share of requests that ran to max_tokens


class Server:
    name: str
    base_model: str
    url: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]: ...

    def rss_mb(self) -> float:
        total = 0
        for pid in self.pids():
            try:
                root = psutil.Process(pid)
                total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def model(self, adapter: str | None) -> str:
        return adapter or self.base_model


class Ours(Server):
    name, base_model = "ours", "llm"

    def __init__(self, workdir: Path, adapters: dict[str, Path], args: argparse.Namespace):
        self.workdir, self.adapters, self.args = workdir, adapters, args

    def start(self) -> None:
        repo = self.workdir / "repo"
        if not repo.exists():
            copy_model(repo, "llm", "llm", {"max_loras": str(self.args.max_loras), "max_cpu_loras": "64",
                                            "max_num_seqs": str(self.args.max_num_seqs), "dtype": self.args.dtype})
        registry = self.workdir / "registry.json"
        env = {**os.environ, LORA_REGISTRY_ENV: str(registry)}
        self.server = TritonServer(model_repository=repo, models=["llm"], http_port=free_port(),
                                   grpc_port=free_port(), metrics_port=free_port(),
                                   log_file=self.workdir / "tritonserver.log", env=env)
        self.server.start(600)
        modules = [f"{name}={path}" for name, path in self.adapters.items()]
        self.frontend = FrontendProcess(self.server.grpc_url, None, self.workdir / "frontend.log",
                                        "--lora-registry-file", str(registry), "--lora-modules", *modules, env=env)
        self.frontend.start(timeout=600)  # it registers every --lora-modules entry first (2,000+ here)
        self.url = self.frontend.url

    def stop(self) -> None:
        self.frontend.stop()
        self.server.stop()

    def pids(self) -> list[int]:
        return [self.server.process.pid, self.frontend.proc.pid]


class VLLMServer(Server):
    name, base_model = "vLLM CPU", BASE_NAME

    def __init__(self, workdir: Path, adapters: dict[str, Path], args: argparse.Namespace):
        self.workdir, self.args = workdir, args
        self.adapters = {name: path for name, path in adapters.items() if name not in DEMO}

    def start(self) -> None:
        python = VLLM.ensure()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(self.args.vllm_kv_gib),
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}
        demo = [f"{name}={adapters_dir() / 'demo' / name}" for name in DEMO]
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(default_llm_model_path()),
               "--served-model-name", BASE_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", self.args.dtype,
               "--max-model-len", "2048", "--max-num-seqs", str(self.args.max_num_seqs), "--enable-lora",
               "--max-loras", str(self.args.max_loras), "--max-lora-rank", "16", "--max-cpu-loras", "64",
               "--lora-modules", *demo]
        self.log = open(self.workdir / "vllm.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited: {(self.workdir / 'vllm.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError("vLLM did not come up in 15 minutes")
        for name, path in self.adapters.items():
            reply = httpx.post(f"{self.url}/v1/load_lora_adapter", timeout=120,
                               json={"lora_name": name, "lora_path": str(path)})
            if reply.status_code != 200:
                raise RuntimeError(f"vLLM refused adapter {name} ({path}): {reply.text}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
        self.log.close()

    def pids(self) -> list[int]:
        return [self.proc.pid]


def greedy_texts(server: Server) -> dict[tuple[str, str], str]:
    out = {}
    for model in [None, *DEMO]:
        for prompt in CHECK_PROMPTS:
            reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
                "model": server.model(model), "messages": [{"role": "user", "content": prompt}], "max_tokens": 24,
                "temperature": 0})
            reply.raise_for_status()
            out[(model or "base", prompt)] = reply.json()["choices"][0]["message"]["content"]
    return out


def first_divergence(a: str, b: str) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def jobs(case: Case, server: Server, requests: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(requests):
        adapter = rng.choices(case.adapters, case.weights)[0] if case.adapters else None
        out.append((story(i), server.model(adapter)))
    return out


def run_system(server: Server, cases: list[Case], args: argparse.Namespace) -> tuple[list[Result], float]:
    results = []
    for case in cases:
        requests = args.requests if case.concurrency > 1 else max(4, args.requests // 4)
        # Warm-up: every adapter this case uses once (loads are not what the rows measure), then one round.
        names = sorted(set(case.adapters))[:args.warm_adapters]
        stream_chat(server.url, [("Hi", server.model(n)) for n in names] or [("Hi", server.base_model)],
                    min(16, max(1, len(names))), 1)
        stream_chat(server.url, jobs(case, server, case.concurrency, seed=99), case.concurrency, args.max_tokens,
                    ignore_eos=True)
        records = stream_chat(server.url, jobs(case, server, requests, seed=1), case.concurrency, args.max_tokens,
                              ignore_eos=True)
        row = summarise(server.name, len(set(case.adapters)), case.concurrency, records)
        full = sum(max(o["num_output_tokens"] for o in r["response_outputs"]) >= args.max_tokens for r in records)
        results.append(Result(case.label, server.name, row, full / len(records)))
        console.print(f"{server.name:9} {case.label:28} {row.tok_per_s:7.1f} tok/s  TTFT p50 {row.ttft_p50_ms:7.0f} ms"
                      f"  ITL p50 {row.itl_p50_ms:6.1f} ms")
    return results, server.rss_mb()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="measured requests per c=16 case (c=1: a quarter)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--zipf", type=int, default=2000, help="adapters of the Zipf(1.1) case (0: skip it)")
    p.add_argument("--max-loras", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--vllm-kv-gib", type=int, default=2)
    p.add_argument("--warm-adapters", type=int, default=64, help="adapters loaded before a case is measured")
    p.add_argument("--rounds", type=int, default=2, help="rounds of both systems (2: ours, vLLM, vLLM, ours)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="both servers' dtype")
    p.add_argument("--systems", nargs="+", default=["ours", "vLLM CPU"], choices=["ours", "vLLM CPU"],
                   help="run only these (a table needs both)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out" / "peer_vllm")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    r8, r16 = bench_adapters(32, 8, TARGETS), bench_adapters(32, 16, TARGETS)
    mixed = [f for pair in zip(r8, r16) for f in pair]  # 8 and 16 alternate, so every case mixes ranks
    adapters = {f"{f.parent.name}-{f.name}": f for f in mixed}
    names = list(adapters)
    cases = [Case("base c=1", 1, []), Case("base c=16", 16, []), Case("8 adapters c=16", 16, names[:8]),
             Case("64 adapters c=16", 16, names[:64])]
    if args.zipf:
        zipf = bench_adapters(args.zipf, 8, TARGETS)
        zipf_names = {f"zipf-{f.name}": f for f in zipf}
        adapters.update(zipf_names)
        cases.append(Case(f"{args.zipf} adapters Zipf(1.1) c=16", 16, list(zipf_names),
                          [1 / (i + 1) ** 1.1 for i in range(args.zipf)]))
    adapters.update({name: adapters_dir() / "demo" / name for name in DEMO})

    workdir = Path(tempfile.mkdtemp(prefix="peer-vllm-"))
    systems = {"ours": Ours(workdir, adapters, args), "vLLM CPU": VLLMServer(workdir, adapters, args)}
    # A B, B A, A B, ...: neither system always runs first on a machine that drifts.
    order = [name for r in range(args.rounds) for name in (["ours", "vLLM CPU"][:: 1 if r % 2 == 0 else -1])
             if name in args.systems]
    best: dict[tuple[str, str], Result] = {}
    memory: dict[str, float] = {}
    texts: dict[str, dict] = {}
    for i, name in enumerate(order):
        server = systems[name]
        with console.status(f"starting {name} (logs in {workdir})"):
            started = time.monotonic()
            server.start()
            console.print(f"{name} up in {time.monotonic() - started:.0f} s")
        try:
            if name not in texts:
                texts[name] = greedy_texts(server)
            results, rss = run_system(server, cases, args)
        finally:
            server.stop()
        memory[name] = max(memory.get(name, 0), rss)
        for r in results:
            key = (r.case, r.system)
            if key not in best or r.row.tok_per_s > best[key].row.tok_per_s:
                best[key] = r

    if len(args.systems) == 2:
        report(best, memory, texts, cases, args)


def report(best, memory, texts, cases, args) -> None:
    table = Table(title=f"ours vs vLLM CPU 0.32.0: SmolLM2-135M {args.dtype}, streaming chat, {args.max_tokens} "
                        "tokens (ignore_eos), best of the rounds")
    for col in ["case", "ours tok/s", "vLLM tok/s", "ours/vLLM", "TTFT p50 ours/vLLM ms", "TTFT p99 ours/vLLM ms",
                "ITL p50 ours/vLLM ms", "ran to max_tokens ours/vLLM"]:
        table.add_column(col, justify="right")
    rows = []
    for case in cases:
        ours, peer = best[(case.label, "ours")], best[(case.label, "vLLM CPU")]
        ratio = ours.row.tok_per_s / peer.row.tok_per_s
        table.add_row(case.label, f"{ours.row.tok_per_s:.1f}", f"{peer.row.tok_per_s:.1f}", f"{ratio:.2f}x",
                      f"{ours.row.ttft_p50_ms:.0f} / {peer.row.ttft_p50_ms:.0f}",
                      f"{ours.row.ttft_p99_ms:.0f} / {peer.row.ttft_p99_ms:.0f}",
                      f"{ours.row.itl_p50_ms:.1f} / {peer.row.itl_p50_ms:.1f}",
                      f"{ours.finished_by_length:.0%} / {peer.finished_by_length:.0%}")
        for r in (ours, peer):
            rows.append({"case": case.label, "system": r.system, **asdict(r.row),
                         "finished_by_length": r.finished_by_length})
    console.print(table)
    console.print("resident memory of each server's process tree (MB): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    same = Table(title="greedy text, ours vs vLLM (24 tokens): first differing character")
    for col in ["model", "prompt", "first divergence", "ours", "vLLM"]:
        same.add_column(col)
    for key, text in texts["ours"].items():
        other = texts["vLLM CPU"][key]
        at = first_divergence(text, other)
        same.add_row(key[0], key[1][:30], "identical" if at is None else str(at), text[:40], other[:40])
    console.print(same)
    with open(args.out / "peer_vllm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {args.out / 'peer_vllm.csv'}")


if __name__ == "__main__":
    main()
