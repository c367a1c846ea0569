"""Mixed-adapter diffusion batches: ours (the served code path) vs diffusers' own LoRA API, one process, same inputs.

For each pipeline (the tiny test pipeline and a larger random SD3-shaped one), a batch of 4 requests with
0, 1 and 4 distinct adapters (r=16 on the attention projections, diffusers-format files as people download them):
- ours: `DiffusionGenerator.run` (what Triton's `execute` calls): one denoising batch, rows mixed freely;
- diffusers by hand: `load_lora_weights` once per adapter, then `set_adapters([name])` and one pipeline call per
  request (diffusers applies one adapter set to the whole batch, so 4 distinct adapters mean 4 calls); with one
  adapter, one call for the batch. Both encode PNGs, as the server does.
Then the adapter switch: ours cold (read + validate + copy into a slot) and cached (host -> slot copy) vs
diffusers `load_lora_weights` (cold) and `set_adapters` (cached), next to the time to read the file itself.
With --triton (default: the tiny pipeline) the same batches also run end to end through tritonserver. Prints a
table; writes CSV and PNG.

With --locon, only this: on an SDXL-shaped UNet (bench-random-sdxl), a mixed batch [X, none, Y, X@0.5] through
`DiffusionGenerator.run` where X is a linear-only kohya adapter, then a LoCon adapter (the same linears plus the
ResNet, shortcut and resampler convolutions), Y a second linear-only adapter; next to the batch without LoRA.

    .venv/bin/python -m benchmarks.diffusion [--repeats 5] [--pipelines tiny-random-sd3 bench-random-sd3]
    .venv/bin/python -m benchmarks.diffusion --locon [--repeats 5]
    .venv/bin/python -m benchmarks.diffusion --stacks [--repeats 5] [--pipelines bench-random-sd3]

With --stacks, only this: on each of --pipelines, a batch of 4 requests each with a LoRA stack of 2 distinct
adapters (8 adapters in one batch) through `DiffusionGenerator.run`, next to the batch without LoRA, and diffusers
doing the same by hand: 4 pipeline calls with `set_adapters([a, b], adapter_weights=[0.7, 0.3])` between them.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from backends.diffusion.generate import DiffusionGenerator, ImageLimits, build_request, encode_png
from backends.diffusion.lora import PipelineLoRA
from backends.diffusion.pipeline import load_pipeline
from backends.lora.manager.cache import LoRACache
from backends.lora.manager.request import AdapterRef, LoRASelection
from backends.settings import REPO_ROOT, adapters_dir
from tools.fixtures.pipelines import (
    BENCH_SD3,
    BENCH_SDXL,
    TINY_SD3,
    AdapterFixture,
    _random_lora,
    fixtures_dir,
    make_adapter,
    make_pipeline,
)

console = Console(width=150)
RANK = 16
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class Setting:
    size: int
    steps: int


SETTINGS = {TINY_SD3: Setting(64, 4), BENCH_SD3: Setting(256, 4)}


def bench_adapters(pipeline: str, n: int) -> list[Path]:
    """n random diffusers-format adapters for `pipeline` (made once, cached)."""
    out = []
    for i in tqdm(range(n), desc=f"adapters for {pipeline}"):
        folder = adapters_dir() / "bench_diffusion" / pipeline / f"lora{i}"
        file = folder / "pytorch_lora_weights.safetensors"
        if not file.is_file():
            loaded = load_pipeline(str(fixtures_dir() / pipeline))
            config, state = _random_lora(loaded.pipe.transformer, RANK, RANK, ATTENTION, seed=100 + i, std=0.05)
            meta = {"r": RANK, "lora_alpha": RANK, "target_modules": list(ATTENTION)}
            type(loaded.pipe).save_lora_weights(folder, transformer_lora_layers=state,
                                                transformer_lora_adapter_metadata=meta)
        out.append(folder)
    return out


def timed(fn, repeats: int) -> list[float]:
    return interleaved({"fn": fn}, repeats)["fn"]


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call for each function, taking turns within every repeat so drift hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc="repeats", leave=False):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_pipeline(name: str, repeats: int) -> tuple[list[dict], list[dict]]:
    setting = SETTINGS[name]
    make_pipeline(name)
    paths = bench_adapters(name, 5)
    prompts = ["a red cat", "a blue dog", "a green tree", "a yellow house"]
    common = dict(height=setting.size, width=setting.size, num_inference_steps=setting.steps)

    # --- ours: the served code path ---
    loaded = load_pipeline(str(fixtures_dir() / name))
    lora = PipelineLoRA(loaded, max_loras=8, max_rank=RANK)
    cache = LoRACache(lora.context, lambda ref: lora.load(ref.path), max_cpu_loras=16)
    gen = DiffusionGenerator(loaded, ImageLimits(), lora, cache)
    refs = [AdapterRef(i + 1, f"lora{i}", str(p)) for i, p in enumerate(paths)]

    def ours(adapters: list[int | None]):
        batch = [build_request(loaded, gen.limits, prompt=p, height=setting.size, width=setting.size,
                               steps=setting.steps, seed=i,
                               lora=() if a is None else (LoRASelection(refs[a], 1.0),))
                 for i, (p, a) in enumerate(zip(prompts, adapters))]
        return lambda: gen.run(batch)

    # --- diffusers, as a user writes it by hand ---
    ref_loaded = load_pipeline(str(fixtures_dir() / name))
    pipe = ref_loaded.pipe
    plain = load_pipeline(str(fixtures_dir() / name)).pipe  # never had LoRA layers injected

    def gens(n):
        return [torch.Generator().manual_seed(i) for i in range(n)]

    def diffusers_base():
        for img in plain(prompts, generator=gens(4), **common).images:
            encode_png(img)

    def diffusers_one():
        pipe.set_adapters(["lora0"])
        for img in pipe(prompts, generator=gens(4), **common).images:
            encode_png(img)

    def diffusers_four():
        for i, p in enumerate(prompts):
            pipe.set_adapters([f"lora{i}"])
            encode_png(pipe(p, generator=torch.Generator().manual_seed(i), **common).images[0])

    for i in range(4):
        pipe.load_lora_weights(str(paths[i]), adapter_name=f"lora{i}")

    cases = [
        ("ours", 0, ours([None] * 4)), ("ours", 1, ours([0] * 4)), ("ours", 4, ours([0, 1, 2, 3])),
        ("diffusers", 0, diffusers_base), ("diffusers", 1, diffusers_one), ("diffusers", 4, diffusers_four),
    ]
    console.print(f"{name}: {setting.size}x{setting.size}, {setting.steps} steps, {repeats} repeats")
    timings = interleaved({(system, k): fn for system, k, fn in cases}, repeats)
    rows = []
    for (system, k), samples in timings.items():
        rows.append(dict(pipeline=name, system=system, adapters=k, p50_s=statistics.median(samples),
                         p99_s=pct(samples, 0.99), images_per_s=4 / statistics.median(samples)))
    base = {r["system"]: r["p50_s"] for r in rows if r["adapters"] == 0}
    for r in rows:
        r["vs_own_base"] = r["p50_s"] / base[r["system"]]
        r["vs_ours_base"] = r["p50_s"] / base["ours"]

    # --- adapter switch ---
    from safetensors.torch import load_file

    file = paths[4] / "pytorch_lora_weights.safetensors"
    read_ms = statistics.median(timed(lambda: load_file(str(file)), repeats)) * 1e3
    def switch_to(c: LoRACache, ref: AdapterRef) -> float:
        started = time.perf_counter()
        c.acquire([ref])
        c.release([ref])
        return time.perf_counter() - started

    cold = []
    for i in range(repeats):  # a fresh id each time: read, validate, convert, copy into a slot
        ref = AdapterRef(1000 + i, "cold", str(paths[4]))
        cold.append(switch_to(cache, ref))
        cache.remove(ref.key)
    # One slot: every switch between two host-cached adapters evicts the other from the slot and copies in.
    one_slot_lora = PipelineLoRA(load_pipeline(str(fixtures_dir() / name)), max_loras=1, max_rank=RANK)
    one_slot = LoRACache(one_slot_lora.context, lambda ref: one_slot_lora.load(ref.path), max_cpu_loras=16)
    for r in refs[:2]:
        one_slot.get(r)
    switches = [switch_to(one_slot, refs[i % 2]) for i in range(repeats * 2)]
    d_cold = []
    for i in range(min(repeats, 3)):
        started = time.perf_counter()
        pipe.load_lora_weights(str(paths[4]), adapter_name=f"cold{i}")
        d_cold.append(time.perf_counter() - started)
        pipe.delete_adapters([f"cold{i}"])
    d_switch = timed(lambda: pipe.set_adapters(["lora1"]) or pipe.set_adapters(["lora0"]), repeats)
    switch = [
        dict(pipeline=name, what="file read (safetensors load_file)", ms=read_ms),
        dict(pipeline=name, what="ours: cold load (read, validate, convert, into a slot)",
             ms=statistics.median(cold) * 1e3),
        dict(pipeline=name, what="ours: cached switch (host -> slot copy)", ms=statistics.median(switches) * 1e3),
        dict(pipeline=name, what="diffusers: load_lora_weights (cold)", ms=statistics.median(d_cold) * 1e3),
        dict(pipeline=name, what="diffusers: set_adapters (cached switch)",
             ms=statistics.median(d_switch) * 1e3 / 2),
    ]
    return rows, switch


UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out")
LOCON_ADAPTERS = {
    "linear": AdapterFixture("bench-sdxl-linear", BENCH_SDXL, r=RANK, alpha=RANK, targets=UNET_LINEARS,
                             formats=("kohya",), seed=200, std=0.05),
    "other": AdapterFixture("bench-sdxl-other", BENCH_SDXL, r=RANK, alpha=RANK, targets=UNET_LINEARS,
                            formats=("kohya",), seed=201, std=0.05),
    "locon": AdapterFixture("bench-sdxl-locon", BENCH_SDXL, r=RANK, alpha=RANK,
                            targets=UNET_LINEARS + ("conv1", "conv2", "conv_shortcut", "conv"), formats=("kohya",),
                            seed=202, std=0.05),
}


def run_locon(repeats: int, size: int = 256, steps: int = 4) -> list[dict]:
    make_pipeline(BENCH_SDXL)
    folders = {k: make_adapter(f)[0] for k, f in LOCON_ADAPTERS.items()}
    loaded = load_pipeline(str(fixtures_dir() / BENCH_SDXL))
    lora = PipelineLoRA(loaded, max_loras=4, max_rank=RANK)
    cache = LoRACache(lora.context, lambda ref: lora.load(ref.path), max_cpu_loras=4)
    gen = DiffusionGenerator(loaded, ImageLimits(), lora, cache)
    refs = {k: AdapterRef(i + 1, k, str(folder)) for i, (k, folder) in enumerate(folders.items())}
    prompts = ["a red cat", "a blue dog", "a green tree", "a yellow house"]

    def batch(x: str | None):
        rows = [(x, 1.0), (None, 0.0), ("other", 1.0), (x, 0.5)] if x else [(None, 0.0)] * 4
        reqs = [build_request(loaded, gen.limits, prompt=p, height=size, width=size, steps=steps, seed=i,
                              lora=() if a is None else (LoRASelection(refs[a], scale),))
                for i, (p, (a, scale)) in enumerate(zip(prompts, rows))]
        return lambda: gen.run(reqs)

    console.print(f"{BENCH_SDXL}: {size}x{size}, {steps} steps, batch of 4 (8 UNet rows under CFG), r={RANK}, "
                  f"{len(lora.context.spec.kernels)} LoRA-enabled convs, {repeats} repeats")
    cases = {"no LoRA": batch(None), "X = linear-only": batch("linear"), "X = LoCon": batch("locon")}
    timings = interleaved(cases, repeats)
    linear = statistics.median(timings["X = linear-only"])
    return [dict(pipeline=BENCH_SDXL, batch=k, p50_s=statistics.median(v), p99_s=pct(v, 0.99),
                 vs_linear=statistics.median(v) / linear) for k, v in timings.items()]


def run_stacks(repeats: int, name: str) -> list[dict]:
    """A batch of 4 requests, each with a LoRA stack of 2 distinct adapters (8 adapters in the batch, scales 0.7
    and 0.3), next to the batch without LoRA; diffusers needs one call per request with `set_adapters` between."""
    setting = SETTINGS[name]
    make_pipeline(name)
    paths = bench_adapters(name, 8)
    prompts = ["a red cat", "a blue dog", "a green tree", "a yellow house"]
    pairs = [(2 * i, 2 * i + 1) for i in range(4)]
    scales = (0.7, 0.3)
    loaded = load_pipeline(str(fixtures_dir() / name))
    lora = PipelineLoRA(loaded, max_loras=8, max_rank=RANK)
    cache = LoRACache(lora.context, lambda ref: lora.load(ref.path), max_cpu_loras=16)
    gen = DiffusionGenerator(loaded, ImageLimits(), lora, cache)
    refs = [AdapterRef(i + 1, f"lora{i}", str(p)) for i, p in enumerate(paths)]

    def ours(stacked: bool):
        batch = [build_request(loaded, gen.limits, prompt=p, height=setting.size, width=setting.size,
                               steps=setting.steps, seed=i,
                               lora=tuple(LoRASelection(refs[a], c) for a, c in zip(pair, scales)) if stacked else ())
                 for i, (p, pair) in enumerate(zip(prompts, pairs))]
        assert len(gen.plan(batch)) == 1  # the 8 adapters fit the 8 slots: one denoising batch
        return lambda: gen.run(batch)

    pipe = load_pipeline(str(fixtures_dir() / name)).pipe
    plain = load_pipeline(str(fixtures_dir() / name)).pipe
    for i, path in enumerate(paths):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
    common = dict(height=setting.size, width=setting.size, num_inference_steps=setting.steps)

    def diffusers_base():
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        for img in plain(prompts, generator=gens, **common).images:
            encode_png(img)

    def diffusers_stacks():
        for i, (p, pair) in enumerate(zip(prompts, pairs)):
            pipe.set_adapters([f"lora{a}" for a in pair], adapter_weights=list(scales))
            encode_png(pipe(p, generator=torch.Generator().manual_seed(i), **common).images[0])

    console.print(f"{name}: {setting.size}x{setting.size}, {setting.steps} steps, 4 requests x a stack of 2 "
                  f"adapters (r={RANK}), {repeats} repeats")
    timings = interleaved({"ours, no LoRA": ours(False), "ours, 4 stacks of 2": ours(True),
                           "diffusers, no LoRA": diffusers_base,
                           "diffusers, 4 calls with set_adapters": diffusers_stacks}, repeats)
    base = statistics.median(timings["ours, no LoRA"])
    stacked = statistics.median(timings["ours, 4 stacks of 2"])
    return [dict(pipeline=name, case=k, p50_s=statistics.median(v), p99_s=pct(v, 0.99),
                 vs_ours_base=statistics.median(v) / base, vs_ours_stacks=statistics.median(v) / stacked)
            for k, v in timings.items()]


def report(rows: list[dict], title: str, columns: dict[str, str], out: Path) -> None:
    """Print rows as a table (column title -> key; floats as seconds or ratios) and write them as CSV."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(f"{r[k]:.2f}x" if k.startswith("vs_") else f"{r[k]:.3f}" if isinstance(r[k], float)
                        else str(r[k]) for k in columns.values()))
    console.print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out}")


def run_triton(name: str, repeats: int) -> list[dict]:
    """The same batches end to end: 4 clients send at once, Triton's dynamic batcher hands them to the diffusion
    model together (preferred batch 4), LoRA fields travel as request parameters. Latency = until all 4 answered."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.http as httpclient

    from tools.clients.diffusion import generate
    from tools.launchers.triton import TritonServer, copy_model, free_port

    setting = SETTINGS[name]
    paths = bench_adapters(name, 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy_model(Path(tmp), "diffusion", "diffusion", {
            "model_path": str(fixtures_dir() / name), "max_lora_rank": str(RANK),
            "lora_modules": " ".join(f"lora{i}={p}" for i, p in enumerate(paths)),
        }, {"max_queue_delay_microseconds: 20000":
            "max_queue_delay_microseconds: 2000000\n  preferred_batch_size: [ 4 ]"})
        server = TritonServer(model_repository=Path(tmp), models=["diffusion"], http_port=free_port(),
                              grpc_port=free_port(), metrics_port=free_port(), log_file=Path(tmp) / "triton.log",
                              env=dict(os.environ))
        local = threading.local()  # tritonclient.http (gevent) clients must stay on the thread that made them

        def client():
            if not hasattr(local, "client"):
                local.client = httpclient.InferenceServerClient(server.http_url, network_timeout=600)
            return local.client

        with server, ThreadPoolExecutor(4) as pool:
            prompts = ["a red cat", "a blue dog", "a green tree", "a yellow house"]

            def batch(adapters: list[int | None]):
                def one(i: int):
                    lora = {} if adapters[i] is None else {"lora_name": f"lora{adapters[i]}"}
                    generate(client(), prompt=prompts[i], seed=i, height=setting.size, width=setting.size,
                             num_inference_steps=setting.steps, **lora)
                return lambda: list(pool.map(one, range(4)))

            sets = {0: [None] * 4, 1: [0] * 4, 4: [0, 1, 2, 3]}
            timings = interleaved({k: batch(adapters) for k, adapters in sets.items()}, repeats)
            for k, samples in timings.items():
                rows.append(dict(pipeline=name, system="ours via Triton", adapters=k,
                                 p50_s=statistics.median(samples), p99_s=pct(samples, 0.99),
                                 images_per_s=4 / statistics.median(samples)))
            barrier = threading.Barrier(4)  # one task per thread: each closes its own client

            def close(_):
                barrier.wait()
                client().close()
            list(pool.map(close, range(4)))
    base = rows[0]["p50_s"]
    for r in rows:
        r["vs_own_base"] = r["p50_s"] / base
    return rows


COLORS = {"ours": "tab:blue", "ours via Triton": "tab:cyan", "diffusers": "tab:orange"}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipelines = list(dict.fromkeys(r["pipeline"] for r in rows))
    fig, axes = plt.subplots(1, len(pipelines), figsize=(6 * len(pipelines), 4))
    for ax, name in zip(axes if len(pipelines) > 1 else [axes], pipelines):
        systems = [s for s in ("ours", "ours via Triton", "diffusers")
                   if any(r["pipeline"] == name and r["system"] == s for r in rows)]
        width = 0.8 / len(systems)
        for j, system in enumerate(systems):
            sel = [r for r in rows if r["pipeline"] == name and r["system"] == system]
            ax.bar([i + (j - (len(systems) - 1) / 2) * width for i in range(len(sel))],
                   [r["images_per_s"] for r in sel], width=width, label=system, color=COLORS[system])
        ax.set_xticks(range(3), ["no LoRA", "1 adapter", "4 distinct adapters"])
        ax.set_ylabel("images/s (batch of 4)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipelines", nargs="+", default=[TINY_SD3, BENCH_SD3], choices=list(SETTINGS))
    p.add_argument("--repeats", type=int, default=5, help="per case (x6 for the tiny pipeline)")
    p.add_argument("--triton", nargs="*", default=[TINY_SD3], choices=list(SETTINGS),
                   help="pipelines to also run end to end through tritonserver (default: the tiny one)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out")
    p.add_argument("--locon", action="store_true", help="only the LoCon vs linear-only batch on bench-random-sdxl")
    p.add_argument("--stacks", action="store_true",
                   help="only 4 requests x a LoRA stack of 2 adapters (on --pipelines), vs no LoRA and diffusers")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" per load: expected here
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch of 4, r={RANK}")
    if args.locon:
        report(run_locon(args.repeats), "Mixed batch [X, none, Y, X@0.5], Y linear-only (p50/p99 over repeats)",
               {"pipeline": "pipeline", "batch": "batch", "p50 s": "p50_s", "p99 s": "p99_s",
                "vs linear-only": "vs_linear"}, args.out / "diffusion_locon.csv")
        return
    if args.stacks:
        report([r for name in args.pipelines for r in run_stacks(args.repeats, name)],
               "Batch of 4 requests, each a LoRA stack of 2 adapters (p50/p99)",
               {"pipeline": "pipeline", "case": "case", "p50 s": "p50_s", "p99 s": "p99_s",
                "vs ours no LoRA": "vs_ours_base", "vs ours stacks": "vs_ours_stacks"},
               args.out / "diffusion_stacks.csv")
        return
    rows, switch = [], []
    for name in args.pipelines:
        r, s = run_pipeline(name, args.repeats * (6 if name == TINY_SD3 else 1))
        rows += r
        switch += s
    for name in args.triton:
        ours_base = next(r["p50_s"] for r in rows if r["pipeline"] == name and r["system"] == "ours" and
                         r["adapters"] == 0) if name in args.pipelines else None
        for r in run_triton(name, args.repeats * (6 if name == TINY_SD3 else 1)):
            r["vs_ours_base"] = r["p50_s"] / ours_base if ours_base else float("nan")
            rows.append(r)

    table = Table(title="Diffusion: batch of 4 requests (p50/p99 over repeats)")
    for col in ("pipeline", "system", "adapters", "p50 s", "p99 s", "images/s", "vs own base", "vs ours base"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["pipeline"], r["system"], str(r["adapters"]), f"{r['p50_s']:.3f}", f"{r['p99_s']:.3f}",
                      f"{r['images_per_s']:.2f}", f"{r['vs_own_base']:.2f}x", f"{r['vs_ours_base']:.2f}x")
    console.print(table)
    table = Table(title="Adapter switch (median ms)")
    for col in ("pipeline", "what", "ms"):
        table.add_column(col)
    for s in switch:
        table.add_row(s["pipeline"], s["what"], f"{s['ms']:.2f}")
    console.print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    for file, data in (("diffusion.csv", rows), ("diffusion_switch.csv", switch)):
        with open(args.out / file, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    plot(rows, args.out / "diffusion.png")
    console.print(f"wrote {args.out / 'diffusion.csv'}, {args.out / 'diffusion_switch.csv'}, "
                  f"{args.out / 'diffusion.png'}")


if __name__ == "__main__":
    main()
