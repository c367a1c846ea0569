"""Check that a LoRA adapter (or a LoRA stack) really changes a served diffusion pipeline, and only by its scale.

For one prompt and seed it asks the running server for: the base image, the adapter at scale 0, 0.5 and 1.0, and
the base image again; prints MSE/PSNR between the pairs that matter and writes a PNG contact sheet. Exits 1 if
  - the two base images differ (the server is not deterministic for a fixed seed),
  - scale 0 differs from the base image (scale 0 must be exactly the base model), or
  - scale 1 is (nearly) identical to scale 0 (the adapter has no effect: wrong targets, zero weights, ...);
exits 2 if the server refuses a request (the error is printed).

Stack mode (`--stack a@0.7 b@0.3`, names or server paths, scale 1 if left out) asks for the base image, each
adapter alone at its scale, the stack, the stack with every scale 0 and the base again, and fails unless the
zero stack equals the base bit for bit, the stack changes the image and differs from each adapter alone.

    python -m scripts.verify_lora --lora-name tiny-sd3-a
    python -m scripts.verify_lora --lora-path /adapters/my_style --prompt "a lighthouse" --steps 20 --size 512
    python -m scripts.verify_lora --stack tiny-sd3-a@0.7 tiny-sd3-b@0.3
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import tritonclient.http as httpclient
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table
from tritonclient.utils import InferenceServerException

from tools.clients.diffusion import generate, pixels

# PSNR at or above this between scale 1 and scale 0 means the adapter changed (almost) nothing.
INEFFECTIVE_PSNR_DB = 50.0


@dataclass(frozen=True)
class Shot:
    label: str
    lora: dict  # LoRA request fields; {} = base model


@dataclass(frozen=True)
class Check:
    label: str
    a: str
    b: str
    expected: str
    ok: Callable[[float, float], bool] | None  # (mse, psnr) -> passed; None = shown only


IDENTICAL = lambda mse, _psnr: mse == 0  # noqa: E731
CHANGED = lambda _mse, psnr: psnr < INEFFECTIVE_PSNR_DB  # noqa: E731


def sweep(name: str | None, path: str | None) -> tuple[list[Shot], list[Check]]:
    """One adapter at scales 0, 0.5 and 1."""
    at = lambda scale: dict(lora_name=name, lora_path=path, lora_scale=scale)  # noqa: E731
    shots = [Shot("base", {}), Shot("scale 0", at(0.0)), Shot("scale 0.5", at(0.5)), Shot("scale 1.0", at(1.0)),
             Shot("base again", {})]
    checks = [Check("base vs base again", "base", "base again", "identical", IDENTICAL),
              Check("scale 0 vs base", "scale 0", "base", "identical", IDENTICAL),
              Check("scale 0.5 vs scale 0", "scale 0.5", "scale 0", "differs", None),
              Check("scale 1.0 vs scale 0", "scale 1.0", "scale 0", f"PSNR < {INEFFECTIVE_PSNR_DB:.0f}", CHANGED),
              Check("scale 1.0 vs scale 0.5", "scale 1.0", "scale 0.5", "differs", None)]
    return shots, checks


def stack_plan(specs: list[str]) -> tuple[list[Shot], list[Check]]:
    """`name@scale` or `path@scale` entries: each alone, the stack, the stack at scale 0."""
    adapters = []
    for spec in specs:
        target, _, scale = spec.rpartition("@") if "@" in spec else (spec, "", "1")
        adapters.append((target, float(scale)))
    key = "lora_path" if any("/" in t for t, _ in adapters) else "lora_name"
    if key == "lora_path" and not all("/" in t for t, _ in adapters):
        raise ValueError("give every stack entry as a name, or every one as a path")
    stack = lambda scales: {key: [t for t, _ in adapters], "lora_scale": scales}  # noqa: E731
    alone = [Shot(f"{t.rstrip('/').rsplit('/', 1)[-1]}@{c:g}", {key: t, "lora_scale": c}) for t, c in adapters]
    shots = [Shot("base", {}), *alone, Shot("stack", stack([c for _, c in adapters])),
             Shot("stack @ 0", stack([0.0] * len(adapters))), Shot("base again", {})]
    checks = [Check("base vs base again", "base", "base again", "identical", IDENTICAL),
              Check("stack @ 0 vs base", "stack @ 0", "base", "identical", IDENTICAL),
              Check("stack vs base", "stack", "base", f"PSNR < {INEFFECTIVE_PSNR_DB:.0f}", CHANGED),
              *(Check(f"stack vs {s.label}", "stack", s.label, "differs", lambda mse, _p: mse > 0) for s in alone)]
    return shots, checks


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
    p.add_argument("--stack", nargs="+", metavar="ADAPTER@SCALE", help="verify a LoRA stack (names or paths)")
    args = p.parse_args(argv)
    if bool(args.stack) == bool(args.lora_name or args.lora_path):
        p.error("give --lora-name or --lora-path, or --stack")
    try:
        shots, checks = stack_plan(args.stack) if args.stack else sweep(args.lora_name, args.lora_path)
    except ValueError as exc:
        p.error(f"--stack: {exc}")
    console = Console(width=120)
    common = dict(prompt=args.prompt, seed=args.seed, num_inference_steps=args.steps, height=args.size,
                  width=args.size)
    images: dict[str, np.ndarray] = {}
    client = httpclient.InferenceServerClient(args.url, network_timeout=600)
    try:
        for shot in shots:
            pngs, _, pipeline = generate(client, args.model, **common, **shot.lora)
            images[shot.label] = pixels(pngs[0])
    except InferenceServerException as exc:
        console.print(f"[red]server refused the request:[/] {exc}")
        return 2
    finally:
        client.close()

    adapter = " + ".join(args.stack) if args.stack else args.lora_name or args.lora_path
    table = Table(title=f"LoRA {'stack' if args.stack else 'scale sweep'}: {adapter} on {pipeline} "
                        f"(seed {args.seed})")
    for col in ("pair", "MSE", "PSNR dB", "expected", "ok"):
        table.add_column(col)
    failed = []
    for check in checks:
        mse, psnr = mse_psnr(images[check.a], images[check.b])
        ok = None if check.ok is None else check.ok(mse, psnr)
        if ok is False:
            failed.append(check.label)
        table.add_row(check.label, f"{mse:.3f}", "inf" if math.isinf(psnr) else f"{psnr:.2f}", check.expected,
                      "-" if ok is None else ("[green]yes[/]" if ok else "[red]NO[/]"))
    console.print(table)
    contact_sheet([images[s.label] for s in shots], [s.label for s in shots], args.out)
    console.print(f"contact sheet: {args.out}")
    if failed:
        console.print(f"[red]FAILED:[/] {', '.join(failed)}")
        return 1
    console.print("[green]LoRA verified:[/] " + ("the zero stack is the base model, the stack changes the image "
                                                 "and differs from each adapter alone" if args.stack else
                                                 "scale 0 is the base model, scale 1 changes the image"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
