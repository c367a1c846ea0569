"""Generate images with a diffusion LoRA using the official `openai` SDK; writes PNG files.

    python examples/openai_image_client.py --model tiny-sd3-a --out cat.png "a red cat"
    python examples/openai_image_client.py --lora-name style --scale 0.5 \
        --lora-path .cache/adapters/diffusion/tiny-sd3-b
"""

from __future__ import annotations

import argparse
import base64
import os
from pathlib import Path

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="a watercolor lighthouse at dusk")
    p.add_argument("--base-url", default=os.environ.get("BASE_URL", "http://127.0.0.1:9000") + "/v1")
    p.add_argument("--api-key", default=os.environ.get("API_KEY", "none"))
    p.add_argument("--model", default="diffusion", help="a diffusion base model or one of its adapters")
    p.add_argument("--lora-name")
    p.add_argument("--lora-path")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--size", default="64x64")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", type=Path, default=Path("image.png"))
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    extra = {"num_inference_steps": args.steps, "seed": args.seed}
    if args.lora_name and args.lora_path:
        extra["lora"] = {"name": args.lora_name, "path": str(Path(args.lora_path).resolve()), "scale": args.scale}
    result = client.images.generate(model=args.model, prompt=args.prompt, size=args.size, n=args.n,
                                    response_format="b64_json", extra_body=extra)
    for i, image in enumerate(result.data):
        out = args.out if args.n == 1 else args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}")
        out.write_bytes(base64.b64decode(image.b64_json))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
