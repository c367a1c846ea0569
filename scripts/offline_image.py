"""Text-to-image with LoRA, offline (no server): vLLM-Omni's offline example flags over our diffusion engine.

    PYTHONPATH=. .venv/bin/python -m scripts.offline_image --prompt "a red cat" --seed 7 \\
        --num_inference_steps 4 --lora-path .cache/adapters/diffusion/tiny-sd3-a --lora-scale 0.8 --output cat.png

--lora-path pre-loads an adapter (pinned, with a stable id derived from its path) and uses it; --lora-request-path
(with an optional --lora-request-id) loads one for this request only; neither = the base model. The image equals
what the `diffusion` model serves for the same request.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from backends.errors import BackendError
from backends.offline import ImageGenerator, LoRA


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers pipeline folder (default: the tiny SD3 pipeline)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative_prompt", "--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num_inference_steps", "--num-inference-steps", type=int, default=None)
    p.add_argument("--guidance_scale", "--guidance-scale", type=float, default=None)
    p.add_argument("--true_cfg_scale", "--true-cfg-scale", type=float, default=None,
                   help="true-CFG pass scale (Flux-style pipelines; elsewhere the same as --guidance_scale)")
    p.add_argument("--num_images", "--num-images", type=int, default=1)
    p.add_argument("--lora-path", default=None, help="pre-load this adapter and use it")
    p.add_argument("--lora-request-path", default=None, help="load this adapter for this request only")
    p.add_argument("--lora-request-id", type=int, default=None, help="stable id for --lora-request-path")
    p.add_argument("--lora-scale", type=float, default=None)
    p.add_argument("--output", type=Path, default=Path("output.png"),
                   help="PNG file (several images: name_0.png, name_1.png, ...)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.lora_path and args.lora_request_path:
        p.error("give --lora-path or --lora-request-path, not both")
    for flag in ("lora_path", "lora_request_path"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            print(f"error: --{flag.replace('_', '-')} {path} does not exist", file=sys.stderr)
            return 2
    preload = {Path(args.lora_path).name: args.lora_path} if args.lora_path else None
    lora = None
    if args.lora_path:
        lora = LoRA(name=Path(args.lora_path).name, scale=args.lora_scale)
    elif args.lora_request_path:
        lora = LoRA(path=args.lora_request_path, int_id=args.lora_request_id, scale=args.lora_scale)
    elif args.lora_scale is not None or args.lora_request_id is not None:
        p.error("--lora-scale and --lora-request-id need --lora-path or --lora-request-path")
    try:
        generator = ImageGenerator(args.model, preload=preload, device=args.device)
        pngs = generator.generate(args.prompt, lora=lora, negative_prompt=args.negative_prompt, seed=args.seed,
                                  height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                                  guidance_scale=args.guidance_scale, true_cfg_scale=args.true_cfg_scale,
                                  num_images=args.num_images)
    except (BackendError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.output.parent.mkdir(parents=True, exist_ok=True)
    paths = [args.output] if len(pngs) == 1 else [
        args.output.with_name(f"{args.output.stem}_{i}{args.output.suffix}") for i in range(len(pngs))]
    for path, png in zip(paths, pngs):
        path.write_bytes(png)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
