"""Prove the GPU serving path on one GPU in one command, offline: tests, LoRA-ops and engine benchmarks, a report.

    scripts/gpu_check OUT_DIR [--cpu] [--model DIR] [--budget-s 450]

1. the gpu-marked tests (tests/llm/test_gpu_path.py, tests/lora/test_kernels.py, tests/lora/test_gpu.py): served
   greedy tokens vs transformers `generate`, mixed-adapter logits vs PEFT `adapter_names` per dtype, graphs vs eager
   through the engine, seeded sampling, the compiled kernels vs a float64 reference and replayed from CUDA graphs;
2. the LoRA-ops benchmark: one decode step (batches 1..64) and a prefill for the base model, ours with k = 1..16
   distinct r=16 adapters (CUDA graphs and eager) and PEFT `adapter_names`, side by side;
3. the engine serving benchmark: continuous batching at concurrency 1/16/64 with the base model, 8 and 64
   adapters (16 device slots), graphs on and off;
4. the tritonserver serving benchmark (benchmarks/serving.py) when tritonserver and tritonclient are installed.

Writes OUT_DIR/report.md and report.json. Without weights on the machine the model is a random-weight Llama with
SmolLM2-135M's shape (needs SmolLM2's tokenizer files: --tokenizer, default the converted model's folder).
`--cpu` runs everything small on CPU (the test suite does, so the script cannot rot). Stages that would overrun
--budget-s are skipped and say so.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

try:
    from rich.console import Console
    from rich.table import Table
except ImportError:  # the GPU machine's image may lack rich: plain text tables
    Console = Table = None

from backends.settings import REPO_ROOT, default_llm_model_path


class _Plain:
    def print(self, item) -> None:
        print(item)


console = Console(width=150) if Console else _Plain()
GPU_TESTS = ["tests/llm/test_gpu_path.py", "tests/lora/test_kernels.py", "tests/lora/test_gpu.py"]
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
           "Explain gravity in one sentence.", "Tell me a story about a dragon and a knight."]


@dataclass
class Sizes:
    decode_batches: list[int]
    ks: list[int]
    prefill: tuple[int, int]  # rows x tokens
    concurrency: list[int]
    adapter_sets: list[int]
    max_tokens: int
    max_num_seqs: int
    graphs: list[bool]
    repeats: int

    @classmethod
    def for_device(cls, cpu: bool) -> "Sizes":
        if cpu:
            return cls([1, 2], [1, 2], (2, 16), [1, 2], [0, 2], 4, 2, [False], 2)
        return cls([1, 8, 16, 64], [1, 2, 4, 8, 16], (8, 256), [1, 16, 64], [0, 8, 64], 64, 64, [True, False], 20)


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    sections: dict = field(default_factory=dict)
    markdown: list[str] = field(default_factory=list)

    def table(self, title: str, columns: list[str], rows: list[list], key: str) -> None:
        lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
        if Table is not None:
            table = Table(title=title)
            for c in columns:
                table.add_column(c, justify="right")
            for row in rows:
                table.add_row(*[str(v) for v in row])
            console.print(table)
        else:
            console.print("\n".join(lines))
        self.markdown += lines + [""]
        self.sections[key] = {"columns": columns, "rows": rows}

    def note(self, text: str) -> None:
        console.print(text)
        self.markdown += [text, ""]

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def environment(device: torch.device) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "missing"
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), capability=".".join(map(str, torch.cuda.get_device_capability(
            device))), cuda=torch.version.cuda, memory_gib=round(torch.cuda.get_device_properties(device).total_memory
                                                                  / 2**30, 1))
    else:
        env["cpu_threads"] = torch.get_num_threads()
    return env


# -- 1. tests ---------------------------------------------------------------------------------------------------
def run_tests(report: Report, out: Path, model: Path, cpu: bool) -> None:
    junit = out / "tests.xml"
    env = {**os.environ, "MULTILORA_CHECK_MODEL": str(model), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    select = ["-m", "gpu"]
    if cpu:  # the dry run: the cpu_dry_run tests on CPU, float32 only (bfloat16 is minutes on 2 cores)
        env["MULTILORA_CHECK_DEVICE"] = "cpu"
        select = ["-m", "gpu and cpu_dry_run", "-k", "not bfloat16"]
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", *GPU_TESTS, *select, "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    (out / "tests.log").write_text(proc.stdout + proc.stderr)
    rows = []
    if junit.is_file():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, detail = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome, detail = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag], \
                        (node.get("message") or "").splitlines()[0][:120] if node.get("message") else ""
            if outcome == "skipped" and "deselected" in detail:
                continue
            rows.append([case.get("name"), outcome, f"{float(case.get('time', 0)):.1f}", detail])
    report.table(f"gpu-marked tests ({'CPU dry run' if cpu else 'on the GPU'}), exit code {proc.returncode}, "
                 f"{time.monotonic() - started:.0f} s", ["test", "outcome", "s", "detail"], rows, "tests")
    report.sections["tests"]["exit_code"] = proc.returncode


# -- 2. LoRA ops ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device, repeats: int) -> float:
    fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def bench_ops(report: Report, model: Path, adapters: list[Path], device: torch.device, sizes: Sizes) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from backends.llm.runner import ModelRunner, RunnerSettings
    from backends.lora.adapters.peft import load_adapter
    from backends.lora.manager.config import LoRAServingConfig
    from backends.lora.ops.batch import RowLoRA
    from tools.clients.steps import HandBatch

    kmax = max(sizes.ks)
    runner = ModelRunner(model, device=str(device), lora=LoRAServingConfig(max_loras=kmax, max_lora_rank=16),
                         settings=RunnerSettings(max_model_len=512, max_num_seqs=max(sizes.decode_batches),
                                                 max_graph_batch=max(sizes.decode_batches)))
    for slot, folder in enumerate(adapters[:kmax]):
        runner.lora.load_slot(slot, load_adapter(folder, runner.lora.spec, 16, dtype=runner.dtype))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model, dtype=runner.dtype), adapters[0],
                                     adapter_name="a0")
    for i, folder in enumerate(adapters[1:kmax], 1):
        peft.load_adapter(folder, adapter_name=f"a{i}")
    peft = peft.to(device).eval()
    # The forward's KV-cache argument: `cache` in transformers >= 5.2x, `past_key_values` before (the GPU image's)
    kwarg = "cache" if "cache" in inspect.signature(peft.get_base_model().forward).parameters else "past_key_values"
    dtype = str(runner.dtype).removeprefix("torch.")
    gen = torch.Generator().manual_seed(0)
    past = 32
    rows_out = []
    for batch in tqdm(sizes.decode_batches, desc="decode batches"):
        prompts = torch.randint(0, 49152, (batch, past), generator=gen).tolist()
        hand = HandBatch(runner, prompts)
        hand.prefill([RowLoRA()] * batch)
        tokens = [1] * batch
        peft_ids = torch.tensor(prompts, device=device)
        with torch.inference_mode():
            out = peft(peft_ids, use_cache=True)
            peft_cache = out.cache if hasattr(out, "cache") else out.past_key_values
        step_ids = torch.ones(batch, 1, dtype=torch.long, device=device)

        def timed(lora, eager):
            graphs = runner.graphs
            if eager:
                runner.graphs = None
            try:
                return _median_ms(lambda: hand.decode(tokens, lora, advance=False), device, sizes.repeats)
            finally:
                runner.graphs = graphs

        def peft_step(names):
            def step():
                with torch.inference_mode():
                    peft(step_ids, use_cache=True, adapter_names=names, **{kwarg: peft_cache})
                peft_cache.crop(-1)  # drop the token just added: every step sees the same past
            return step

        base = [RowLoRA()] * batch
        modes = [False, True] if runner.graphs is not None else [True]
        base_ms = {eager: timed(base, eager) for eager in modes}
        with peft.disable_adapter():
            peft_base = _median_ms(peft_step(None), device, sizes.repeats)
        for k in sizes.ks:
            lora = [RowLoRA.one(i % k, 1.0) for i in range(batch)]
            names = [f"a{i % k}" for i in range(batch)]
            row = [batch, k]
            for eager in modes:
                ms = timed(lora, eager)
                row += [f"{base_ms[eager]:.2f}", f"{ms:.2f}", f"{ms / base_ms[eager]:.2f}x"]
            peft_ms = _median_ms(peft_step(names), device, sizes.repeats)
            row += [f"{peft_base:.2f}", f"{peft_ms:.2f}", f"{peft_ms / peft_base:.2f}x"]
            rows_out.append(row)
        hand.free()
    columns = ["batch", "k adapters"]
    for eager in ([False, True] if runner.graphs is not None else [True]):
        tag = "eager" if eager else "graphs"
        columns += [f"base {tag} ms", f"ours {tag} ms", f"ours/base {tag}"]
    columns += ["PEFT base ms", "PEFT k ms", "PEFT/base"]
    report.table(f"decode step, SmolLM2-135M shape, {dtype}, r=16 on all 7 projections, past {past} tokens",
                 columns, rows_out, "ops_decode")

    n, length = sizes.prefill
    prompts = torch.randint(0, 49152, (n, length), generator=gen).tolist()
    hand = HandBatch(runner, prompts)
    peft_ids = torch.tensor(prompts, device=device)
    prefill_rows = []
    base_ms = _median_ms(lambda: hand.prefill([RowLoRA()] * n), device, sizes.repeats)
    with peft.disable_adapter(), torch.inference_mode():
        peft_base = _median_ms(lambda: peft(peft_ids, logits_to_keep=1), device, sizes.repeats)
    for k in sizes.ks:
        lora = [RowLoRA.one(i % k, 1.0) for i in range(n)]
        names = [f"a{i % k}" for i in range(n)]
        ms = _median_ms(lambda: hand.prefill(lora), device, sizes.repeats)
        with torch.inference_mode():
            peft_ms = _median_ms(lambda: peft(peft_ids, adapter_names=names, logits_to_keep=1), device,
                                 sizes.repeats)
        prefill_rows.append([f"{n}x{length}", k, f"{base_ms:.2f}", f"{ms:.2f}", f"{ms / base_ms:.2f}x",
                             f"{peft_base:.2f}", f"{peft_ms:.2f}", f"{peft_ms / peft_base:.2f}x"])
    hand.free()
    report.table(f"prefill, {dtype}", ["rows x tokens", "k adapters", "base ms", "ours ms", "ours/base",
                                       "PEFT base ms", "PEFT k ms", "PEFT/base"], prefill_rows, "ops_prefill")
    runner = peft = None  # free the device memory before the next stage
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- 3. engine serving ------------------------------------------------------------------------------------------
def bench_engine(report: Report, model: Path, adapters: list[Path], device: torch.device, sizes: Sizes) -> None:
    from backends.llm.chat import apply_chat_template
    from backends.llm.engine import LLMEngine
    from backends.llm.params import GenerationRequest, SamplingParams
    from backends.llm.runner import ModelRunner, RunnerSettings
    from backends.lora.manager.config import LoRAServingConfig
    from backends.lora.manager.request import AdapterRef, LoRASelection
    from backends.lora.manager.selector import AdapterSelector
    from tools.clients.engine import Collect

    rows = []
    for graphs in sizes.graphs:
        runner = ModelRunner(model, device=str(device), lora=LoRAServingConfig(max_loras=16, max_lora_rank=16),
                             settings=RunnerSettings(max_model_len=512, max_num_seqs=sizes.max_num_seqs,
                                                     enforce_eager=not graphs,
                                                     max_graph_batch=sizes.max_num_seqs))
        config = LoRAServingConfig(max_loras=16, max_cpu_loras=max(16, *sizes.adapter_sets), registry_file=None)
        engine = LLMEngine(lambda e: (runner, AdapterSelector.build(runner.lora, config).cache))
        try:
            for n_adapters in sizes.adapter_sets:
                base_tps = None
                for concurrency in sizes.concurrency:
                    total = max(8, 2 * concurrency)
                    sinks, started = [], time.perf_counter()
                    for i in range(total):
                        lora = ()
                        if n_adapters:
                            folder = adapters[i % n_adapters]
                            lora = (LoRASelection(AdapterRef(1000 + i % n_adapters, folder.name, str(folder)), 1.0),)
                        request = GenerationRequest(f"r{i}", apply_chat_template(PROMPTS[i % len(PROMPTS)]),
                                                    SamplingParams(max_tokens=sizes.max_tokens, temperature=0.0),
                                                    lora=lora)
                        sink = Collect()
                        sinks.append(sink)
                        engine.submit(engine.prepare(request), sink)
                        if len(sinks) >= concurrency:  # closed loop: at most `concurrency` outstanding
                            sinks[len(sinks) - concurrency].wait(600)
                    tokens = sum(s.wait(600).chunks[-1].num_output_tokens for s in sinks if not s.error)
                    failed = sum(1 for s in sinks if s.error)
                    tps = tokens / (time.perf_counter() - started)
                    rows.append(["graphs" if graphs else "eager", n_adapters or "base", concurrency, total, failed,
                                 f"{tps:.1f}"])
                    if base_tps is None:
                        base_tps = tps
        finally:
            engine.shutdown()
        runner = engine = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    by_key = {(r[0], r[2]): float(r[5]) for r in rows if r[1] == "base"}
    for r in rows:
        r.append(f"{float(r[5]) / by_key[(r[0], r[2])]:.2f}x")
    report.table(f"engine serving (in-process continuous batching), {sizes.max_tokens} tokens per request, 16 LoRA "
                 f"slots, r=16 q/k/v/o", ["decode", "adapters", "concurrency", "requests", "failed", "output tok/s",
                                         "vs base"], rows, "engine")


# -- 4. tritonserver --------------------------------------------------------------------------------------------
def bench_tritonserver(report: Report, out: Path, cpu: bool) -> None:
    missing = [m for m in ("tritonclient", "pytriton") if shutil.which("tritonserver") is None and not _importable(m)]
    if cpu or missing:
        why = "--cpu (tests/ and benchmarks/serving.py cover the server on CPU)" if cpu else \
            f"not installed here: {', '.join(missing)}"
        report.note(f"tritonserver serving benchmark: skipped ({why}).")
        report.sections["tritonserver"] = {"skipped": why}
        return
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serving", "--concurrency", "1", "16", "64",
                           "--adapters", "8", "64", "--skip-peft", "--out", str(out / "bench_serving")],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    (out / "bench_serving.log").write_text(proc.stdout + proc.stderr)
    report.note(f"tritonserver serving benchmark: exit code {proc.returncode}; output in bench_serving.log\n\n```\n"
                f"{proc.stdout[-3000:]}\n```")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--cpu", action="store_true", help="small sizes on CPU (the test suite's dry run)")
    p.add_argument("--model", type=Path, help="a Hugging Face model folder (default: the converted SmolLM2, else "
                                              "a random SmolLM2-shaped model)")
    p.add_argument("--tokenizer", type=Path, default=default_llm_model_path())
    p.add_argument("--budget-s", type=float, default=450.0, help="skip stages that would start after this")
    p.add_argument("--skip", nargs="*", default=[], choices=["tests", "ops", "engine", "tritonserver"])
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu for the CPU dry run")
    sizes = Sizes.for_device(args.cpu)
    report = Report()
    env = environment(device)
    report.sections["environment"] = env
    report.markdown += [f"# GPU check: {env.get('gpu', 'CPU dry run')}", "",
                        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        from tools.fixtures.adapters import ALL_PROJECTIONS, make_random_adapters, random_smollm2

        model = args.model or (default_llm_model_path() if (default_llm_model_path() / "model.safetensors").is_file()
                               else random_smollm2(work / "smollm2-random", tokenizer_dir=args.tokenizer))
        report.note(f"Model: {model}")
        from transformers import AutoModelForCausalLM

        factory = lambda: AutoModelForCausalLM.from_pretrained(model)  # noqa: E731
        n = max(max(sizes.ks), max(sizes.adapter_sets))
        all_proj = make_random_adapters(factory, [work / f"all{i}" for i in range(max(sizes.ks))],
                                        list(range(max(sizes.ks))), r=16, lora_alpha=32,
                                        target_modules=ALL_PROJECTIONS)
        attn = make_random_adapters(factory, [work / f"qkvo{i}" for i in range(n)], list(range(100, 100 + n)),
                                    r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        stages = [("tests", lambda: run_tests(report, args.out, model, args.cpu)),
                  ("ops", lambda: bench_ops(report, model, all_proj, device, sizes)),
                  ("engine", lambda: bench_engine(report, model, attn, device, sizes)),
                  ("tritonserver", lambda: bench_tritonserver(report, args.out, args.cpu))]
        for name, stage in stages:
            if name in args.skip:
                report.note(f"{name}: skipped (--skip)")
                continue
            if report.elapsed() > args.budget_s:
                report.note(f"{name}: skipped (the {args.budget_s:.0f} s budget is spent)")
                continue
            started = time.monotonic()
            try:
                stage()
            except Exception as exc:  # one broken stage must not cost the others' figures
                report.note(f"{name}: FAILED {type(exc).__name__}: {exc}")
                report.sections[name] = {"error": f"{type(exc).__name__}: {exc}"}
            console.print(f"{name} took {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report.markdown.append(f"Total {report.elapsed():.0f} s.")
        (args.out / "report.md").write_text("\n".join(report.markdown) + "\n")
        (args.out / "report.json").write_text(json.dumps(report.sections, indent=2, default=str))
        console.print(f"report: {args.out / 'report.md'}")
    tests = report.sections.get("tests", {})
    failed = tests.get("exit_code", 0) not in (0, 5) or any("error" in v for v in report.sections.values()
                                                            if isinstance(v, dict))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
