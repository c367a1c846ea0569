"""DoRA rows against plain LoRA rows in mixed batches on SmolLM2, and against PEFT's own DoRA forward.

    .venv/bin/python -m benchmarks.dora [--batch 16] [--adapters 4] [--prefill-len 128]

k random r=16 adapters on all 7 projections, and the same weights as DoRA adapters (with magnitudes), assigned
round-robin to a batch of 16 rows; a decode step (1 token over a 32-token KV cache) and a prefill (128 tokens per
row), each with our per-step batch setup (`benchmarks.lora_ops.with_batch_setup`). Mixes: base, all plain LoRA,
all DoRA, half DoRA half plain. The issue's figure is the *LoRA cost* of DoRA rows over that of plain LoRA rows:
(DoRA - base) / (LoRA - base). PEFT's rows: one adapter for every row (PEFT runs no mixed batch with DoRA), plain
and DoRA, beside ours on the same adapter. fp32 (the models as served in the tests); prints a table, writes CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file, save_file

from backends.lora.adapters.peft import load_adapter
from backends.lora.layers.linear import patch_model
from backends.settings import cache_dir
from benchmarks.lora_ops import RANK, Workload, adapters, compare, with_batch_setup
from tools.fixtures.adapters import load_smollm2

console = Console(width=160)


def as_dora(folder: Path, out: Path, model, seed: int) -> Path:
    """The adapter's weights plus magnitudes near the base rows' norms (what PEFT initialises them to)."""
    if (out / "adapter_model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True
    (out / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(folder / "adapter_model.safetensors")
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in state if ".lora_A." in k]:
        module = key.split(".lora_A.")[0]
        weight = model.get_submodule(module.removeprefix("base_model.model.")).weight.detach()
        norm = weight.norm(dim=1)
        state[f"{module}.lora_magnitude_vector"] = norm * (1 + 0.2 * torch.randn(norm.shape, generator=gen))
    save_file(state, out / "adapter_model.safetensors")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--decode-repeats", type=int, default=20)
    p.add_argument("--prefill-repeats", type=int, default=5)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--out", type=Path, default=cache_dir() / "bench" / "dora.csv")
    args = p.parse_args()
    torch.manual_seed(0)
    k = args.adapters
    plain = adapters(k)
    base = load_smollm2()
    dora = [as_dora(f, cache_dir() / "adapters" / f"bench_dora_r{RANK}" / f.name, base, i) for i, f in enumerate(plain)]
    ours = load_smollm2()
    ctx = patch_model(ours, max_loras=2 * k, max_rank=RANK)
    for slot, folder in enumerate(plain + dora):  # plain in slots 0..k-1, DoRA in k..2k-1
        ctx.load_slot(slot, load_adapter(folder, ctx.spec, max_rank=RANK))
    rows = [i % k for i in range(args.batch)]
    mixes = {"base": None, "LoRA": rows, "DoRA": [k + s for s in rows],
             "half DoRA, half LoRA": [s + (k if i % 2 else 0) for i, s in enumerate(rows)]}
    models = {name: base if slots is None else with_batch_setup(ours, ctx, slots) for name, slots in mixes.items()}
    if not args.skip_peft:
        from peft import PeftModel

        models["PEFT LoRA (1 adapter)"] = PeftModel.from_pretrained(load_smollm2(), plain[0]).eval()
        models["PEFT DoRA (1 adapter)"] = PeftModel.from_pretrained(load_smollm2(), dora[0]).eval()
        models["ours LoRA (1 adapter)"] = with_batch_setup(ours, ctx, [0] * args.batch)
        models["ours DoRA (1 adapter)"] = with_batch_setup(ours, ctx, [k] * args.batch)
    work = Workload(args.batch, args.prefill_len)
    results = {"decode": compare({n: work.decode_fn(m) for n, m in models.items()}, args.decode_repeats),
               "prefill": compare({n: work.prefill_fn(m) for n, m in models.items()}, args.prefill_repeats)}

    table = Table(title=f"DoRA vs LoRA rows, SmolLM2 fp32, batch {args.batch}, {k} adapters r={RANK} on all 7 "
                        f"projections, torch threads {torch.get_num_threads()} (median ms)")
    for col in ("rows", "decode ms", "vs base", "prefill ms", "vs base"):
        table.add_column(col, justify="left" if col == "rows" else "right")
    out_rows = []
    for name in models:
        d, f = results["decode"][name], results["prefill"][name]
        table.add_row(name, f"{d:.1f}", f"{d / results['decode']['base']:.2f}x", f"{f:.1f}",
                      f"{f / results['prefill']['base']:.2f}x")
        out_rows.append({"rows": name, "decode_ms": d, "prefill_ms": f})
    console.print(table)
    for phase in ("decode", "prefill"):
        r = results[phase]
        console.print(f"{phase}: DoRA rows cost {r['DoRA'] / r['LoRA']:.2f}x plain LoRA rows in time; their LoRA "
                      f"cost (over base) {(r['DoRA'] - r['base']) / (r['LoRA'] - r['base']):.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out_rows[0]))
        writer.writeheader()
        writer.writerows(out_rows)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
