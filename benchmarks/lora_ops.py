"""Mixed-adapter LoRA cost on SmolLM2: base model vs ours vs PEFT `adapter_names`, same inputs, one process.

For k distinct r=16 adapters (all 7 projections) assigned round-robin to the rows of a batch of 16 sequences,
times a decode step (1 new token per row over a 32-token KV cache) and a prefill (128 tokens per row). "ours"
includes the per-step batch setup our engine runs before every forward (`LoRAContext.use`: `LoRABatch.build`
turns the rows' slots and scales into the dense mask or gather indices), as PEFT's time includes its per-forward
grouping by adapter name. The k adapters sit in adjacent slots 0..k-1; "ours spread" uses k slots spread over
all `max(ks)` slots instead (first and last included; every slot holds an adapter of the same rank and targets),
which the dense decode path pays for: its shrink reads every slot between the lowest and the highest used one. Row order does not matter to either path
(a per-row mask, a per-sequence gather). Prints ratios, writes CSV + PNG.

    .venv/bin/python -m benchmarks.lora_ops [--ks 1 2 4 8 16] [--batch 16] [--prefill-len 128]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from backends.lora.adapters.peft import load_adapter
from backends.lora.layers.context import LoRAContext
from backends.lora.layers.linear import patch_model
from backends.lora.ops.batch import LoRABatch
from backends.settings import REPO_ROOT, cache_dir
from tools.fixtures.adapters import ALL_PROJECTIONS, load_smollm2, make_random_adapter

console = Console(width=200)
RANK = 16


def adapters(n: int) -> list[Path]:
    root = cache_dir() / "adapters" / f"bench_r{RANK}"
    out = []
    for i in tqdm(range(n), desc="bench adapters"):
        folder = root / f"lora{i}"
        if not (folder / "adapter_model.safetensors").is_file():
            make_random_adapter(load_smollm2, folder, seed=i, r=RANK, lora_alpha=2 * RANK,
                                target_modules=ALL_PROJECTIONS, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
        out.append(folder)
    return out


def compare(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per system, running the systems in turn within each repeat so drift hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - started)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


class Workload:
    """Fixed inputs: prefill ids, and a prefilled KV cache that each decode step is cropped back to."""

    def __init__(self, batch: int, prefill_len: int, past_len: int = 32, vocab: int = 49152):
        gen = torch.Generator().manual_seed(0)
        self.prefill_ids = torch.randint(0, vocab, (batch, prefill_len), generator=gen)
        self.past_ids = self.prefill_ids[:, :past_len]
        self.step_ids = torch.randint(0, vocab, (batch, 1), generator=gen)

    def decode_fn(self, model: Callable, **kw):
        with torch.inference_mode():
            cache = model(input_ids=self.past_ids, use_cache=True, **kw).cache

        def step():
            with torch.inference_mode():
                model(input_ids=self.step_ids, cache=cache, use_cache=True, **kw)
            cache.crop(-1)  # drop the token just added: every step sees the same past
        return step

    def prefill_fn(self, model: Callable, **kw):
        def run():
            with torch.inference_mode():
                model(input_ids=self.prefill_ids, use_cache=False, logits_to_keep=1, **kw)
        return run


def with_batch_setup(model: torch.nn.Module, ctx: LoRAContext, slots: list[int]) -> Callable:
    """Our model as the engine calls it each step: the rows' LoRA metadata built, the forward, the context
    cleared (`ModelRunner._forward`)."""
    scales = [1.0] * len(slots)

    def forward(**kw):
        with ctx.use(LoRABatch.build(slots, scales)):
            return model(**kw)
    return forward


def spread_slots(k: int, num_slots: int) -> list[int]:
    """k slots evenly over 0..num_slots-1, the first and the last included."""
    return [round(i * (num_slots - 1) / (k - 1)) for i in range(k)] if k > 1 else [0]


def setup_ms(ctx: LoRAContext, slots: list[int], repeats: int = 200) -> float:
    """Median time of the per-step batch setup alone (build + clear)."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        with ctx.use(LoRABatch.build(slots, [1.0] * len(slots))):
            pass
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e3


def _evict_from_page_cache(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def load_costs(folders: list[Path], ctx) -> dict[str, float]:
    """Median ms over the adapters: read the weights file, load_adapter (read + validate + fold), promote to a
    slot; cold = the files evicted from the page cache first."""
    out: dict[str, list[float]] = {k: [] for k in ("read_cold", "load_cold", "read_warm", "load_warm", "promote")}

    def clock(key, fn):
        started = time.perf_counter()
        result = fn()
        out[key].append((time.perf_counter() - started) * 1e3)
        return result

    for folder in folders:
        weights = folder / "adapter_model.safetensors"
        _evict_from_page_cache(folder)
        clock("read_cold", weights.read_bytes)
        _evict_from_page_cache(folder)
        clock("load_cold", lambda: load_adapter(folder, ctx.spec, max_rank=RANK))
        clock("read_warm", weights.read_bytes)
        adapter = clock("load_warm", lambda: load_adapter(folder, ctx.spec, max_rank=RANK))
        clock("promote", lambda: ctx.load_slot(0, adapter))
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--decode-repeats", type=int, default=10)
    p.add_argument("--prefill-repeats", type=int, default=4)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_out")
    args = p.parse_args()
    torch.manual_seed(0)
    folders = adapters(max(args.ks))
    work = Workload(args.batch, args.prefill_len)

    base = load_smollm2()
    ours = load_smollm2()
    ctx = patch_model(ours, max_loras=max(args.ks), max_rank=RANK)
    for slot, folder in enumerate(folders):
        ctx.load_slot(slot, load_adapter(folder, ctx.spec, max_rank=RANK))
    peft = None
    if not args.skip_peft:
        from peft import PeftModel

        peft = PeftModel.from_pretrained(load_smollm2(), folders[0], adapter_name="lora0")
        for i, folder in enumerate(folders[1:], 1):
            peft.load_adapter(folder, adapter_name=f"lora{i}")
        peft.eval()

    costs = load_costs(folders, ctx)
    for slot, folder in enumerate(folders):  # load_costs used slot 0
        ctx.load_slot(slot, load_adapter(folder, ctx.spec, max_rank=RANK))
    size = (folders[0] / "adapter_model.safetensors").stat().st_size / 1e6
    load_table = Table(title=f"adapter load, r={RANK} all 7 projections ({size:.1f} MB file); median ms over "
                             f"{len(folders)} adapters")
    for c in ("", "read file", "load_adapter", "load / read"):
        load_table.add_column(c, justify="right")
    for temp in ("cold", "warm"):
        load_table.add_row(f"{temp} page cache", f"{costs['read_' + temp]:.1f}", f"{costs['load_' + temp]:.1f}",
                           f"{costs['load_' + temp] / costs['read_' + temp]:.1f}x")
    load_table.add_row("host -> slot promotion", "", f"{costs['promote']:.2f}", "")
    console.print(load_table)

    rows = []
    console.print(f"torch threads: {torch.get_num_threads()}")
    num_slots = max(args.ks)
    for k in tqdm(args.ks, desc="k"):
        slots = [i % k for i in range(args.batch)]
        names = [f"lora{s}" for s in slots]
        models = {"base": base, "ours": with_batch_setup(ours, ctx, slots)}
        if 1 < k < num_slots:  # k other adapters (every slot holds one, all of the same shape), spread slots
            spread = spread_slots(k, num_slots)
            models["ours_spread"] = with_batch_setup(ours, ctx, [spread[s] for s in slots])
        decode = {name: work.decode_fn(model) for name, model in models.items()}
        prefill = {name: work.prefill_fn(model) for name, model in models.items()}
        if peft is not None:
            decode["peft"] = work.decode_fn(peft, adapter_names=names)
            prefill["peft"] = work.prefill_fn(peft, adapter_names=names)
        times = compare(decode, args.decode_repeats)
        times_pre = compare(prefill, args.prefill_repeats)
        row = {"k": k, "ours_setup_ms": setup_ms(ctx, slots)}
        for system in decode:
            row[f"{system}_decode_ms"] = times[system]
            row[f"{system}_prefill_ms"] = times_pre[system]
        rows.append(row)

    table = Table(title=f"SmolLM2-135M fp32, batch {args.batch}, r={RANK} on all 7 projections, "
                        f"{torch.get_num_threads()} threads; ms are medians; ours includes the setup; spread = "
                        f"the k adapters in slots spread over 0..{num_slots - 1}")
    cols = ["k", "setup ms", "base dec ms", "ours dec ms", "ours/base dec", "spread/base dec", "PEFT/base dec",
            "PEFT/ours dec", "base pre ms", "ours pre ms", "ours/base pre", "spread/base pre", "PEFT/base pre",
            "PEFT/ours pre"]
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        for phase in ("decode", "prefill"):
            for system in ("ours", "ours_spread"):
                if f"{system}_{phase}_ms" in r:
                    r[f"{system}_over_base_{phase}"] = r[f"{system}_{phase}_ms"] / r[f"base_{phase}_ms"]
        if peft is not None:
            r["peft_over_base_decode"] = r["peft_decode_ms"] / r["base_decode_ms"]
            r["peft_over_ours_decode"] = r["peft_decode_ms"] / r["ours_decode_ms"]
            r["peft_over_base_prefill"] = r["peft_prefill_ms"] / r["base_prefill_ms"]
            r["peft_over_ours_prefill"] = r["peft_prefill_ms"] / r["ours_prefill_ms"]
        g = lambda key, fmt="{:.2f}x": fmt.format(r[key]) if key in r else "-"  # noqa: E731
        table.add_row(str(r["k"]), g("ours_setup_ms", "{:.3f}"), g("base_decode_ms", "{:.1f}"),
                      g("ours_decode_ms", "{:.1f}"), g("ours_over_base_decode"), g("ours_spread_over_base_decode"),
                      g("peft_over_base_decode"), g("peft_over_ours_decode"), g("base_prefill_ms", "{:.0f}"),
                      g("ours_prefill_ms", "{:.0f}"), g("ours_over_base_prefill"), g("ours_spread_over_base_prefill"),
                      g("peft_over_base_prefill"), g("peft_over_ours_prefill"))
    console.print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "lora_load.csv", "w", newline="") as f:
        csv.writer(f).writerows([["metric", "ms"], *[[k, f"{v:.3f}"] for k, v in costs.items()]])
    with open(args.out / "lora_ops.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for r in rows for key in r)))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "lora_ops.png", peft is not None)
    console.print(f"wrote {args.out / 'lora_ops.csv'} and {args.out / 'lora_ops.png'}")


def plot(rows, path: Path, with_peft: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, phase in zip(axes, ("decode", "prefill")):
        ax.plot(ks, [r[f"ours_over_base_{phase}"] for r in rows], "o-", label="ours / base")
        if with_peft:
            ax.plot(ks, [r[f"peft_over_base_{phase}"] for r in rows], "s--", label="PEFT adapter_names / base")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("distinct adapters in the batch (k)")
        ax.set_ylabel("time / base model")
        ax.set_title(f"{phase} step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
