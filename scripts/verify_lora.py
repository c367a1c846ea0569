"""Check that a LoRA adapter really changes a served diffusion pipeline, and only by its scale.

For one prompt and seed it asks the running server for: the base image, the adapter at scale 0, 0.5 and 1.0, and
the base image again; prints MSE/PSNR between the pairs that matter and writes a PNG contact sheet. Exits 1 if
  - the two base images differ (the server is not deterministic for a fixed seed),
  - scale 0 differs from the base image (scale 0 must be exactly the base model), or
  - scale 1 is (nearly) identical to scale 0 (the adapter has no effect: wrong targets, zero weights, ...);
exits 2 if the server refuses a request (the error is printed).

    python -m scripts.verify_lora --lora-name tiny-sd3-a
    python -m scripts.verify_lora --lora-path /adapters/my_style --prompt "a lighthouse" --steps 20 --size 512
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table
from tritonclient.utils import InferenceServerException

from scripts.diffusion_client import generate, pixels

# PSNR at or above this between scale 1 and scale 0 means the adapter changed (almost) nothing.
INEFFECTIVE_PSNR_DB = 50.0


@dataclass(frozen=True)
class Shot:
    label: str
    scale: float | None  # None: no adapter


SWEEP = (Shot("base", None), Shot("scale 0", 0.0), Shot("scale 0.5", 0.5), Shot("scale 1.0", 1.0),
         Shot("base again", None))


def mse_psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return mse, (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse))


def contact_sheet(images: list[np.ndarray], labels: list[str], out: Path) -> None:
    h, w = images[0].shape[:2]
    scale = max(1, 128 // max(h, w))  # tiny test images are enlarged so they can be seen
    tile_w, tile_h = w * scale, h * scale
    sheet = Image.new("RGB", (tile_w * len(images), tile_h + 16), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, label) in enumerate(zip(images, labels)):
        tile = Image.fromarray(img.astype(np.uint8)).resize((tile_w, tile_h), Image.NEAREST)
        sheet.paste(tile, (i * tile_w, 16))
        draw.text((i * tile_w + 2, 2), label, fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="127.0.0.1:8000", help="Triton HTTP address (host:port)")
    p.add_argument("--model", default="diffusion", help="Triton model name")
    p.add_argument("--lora-name", help="adapter name (registry / static)")
    p.add_argument("--lora-path", help="adapter path on the server (under an allowed root)")
    p.add_argument("--prompt", default="a watercolor painting of a lighthouse at dusk")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the server's)")
    p.add_argument("--size", type=int, default=None, help="height and width (default: the pipeline's)")
    p.add_argument("--out", type=Path, default=Path("bench_out/verify_lora.png"), help="contact sheet PNG")
    args = p.parse_args(argv)
    if not (args.lora_name or args.lora_path):
        p.error("give --lora-name or --lora-path")
    console = Console(width=120)
    common = dict(prompt=args.prompt, seed=args.seed, num_inference_steps=args.steps, height=args.size,
                  width=args.size)
    images: dict[str, np.ndarray] = {}
    client = httpclient.InferenceServerClient(args.url, network_timeout=600)
    try:
        for shot in SWEEP:
            lora = {} if shot.scale is None else dict(lora_name=args.lora_name, lora_path=args.lora_path,
                                                      lora_scale=shot.scale)
            pngs, _, pipeline = generate(client, args.model, **common, **lora)
            images[shot.label] = pixels(pngs[0])
    except InferenceServerException as exc:
        console.print(f"[red]server refused the request:[/] {exc}")
        return 2
    finally:
        client.close()

    adapter = args.lora_name or args.lora_path
    table = Table(title=f"LoRA scale sweep: {adapter} on {pipeline} (seed {args.seed})")
    for col in ("pair", "MSE", "PSNR dB", "expected", "ok"):
        table.add_column(col)
    checks = [
        ("base vs base again", "base", "base again", "identical", lambda m, _: m == 0),
        ("scale 0 vs base", "scale 0", "base", "identical", lambda m, _: m == 0),
        ("scale 0.5 vs scale 0", "scale 0.5", "scale 0", "differs", None),
        ("scale 1.0 vs scale 0", "scale 1.0", "scale 0", f"PSNR < {INEFFECTIVE_PSNR_DB:.0f}",
         lambda _, psnr: psnr < INEFFECTIVE_PSNR_DB),
        ("scale 1.0 vs scale 0.5", "scale 1.0", "scale 0.5", "differs", None),
    ]
    failed = []
    for label, a, b, expected, check in checks:
        mse, psnr = mse_psnr(images[a], images[b])
        ok = None if check is None else check(mse, psnr)
        if ok is False:
            failed.append(label)
        table.add_row(label, f"{mse:.3f}", "inf" if math.isinf(psnr) else f"{psnr:.2f}", expected,
                      "-" if ok is None else ("[green]yes[/]" if ok else "[red]NO[/]"))
    console.print(table)
    contact_sheet([images[s.label] for s in SWEEP], [s.label for s in SWEEP], args.out)
    console.print(f"contact sheet: {args.out}")
    if failed:
        console.print(f"[red]FAILED:[/] {', '.join(failed)}")
        return 1
    console.print("[green]LoRA verified:[/] scale 0 is the base model, scale 1 changes the image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
