#!/usr/bin/env python3
"""Like vLLM-Omni's verify_lora_online.py: render baseline, scale 0 and scale 1 with the same prompt and seed via
/v1/images/generations, save them and compare: baseline must equal scale 0, scale 1 must differ (LoRA applied)."""

import argparse
import base64
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def render(server: str, prompt: str, size: int, steps: int, lora: dict | None) -> bytes:
    body = {"prompt": prompt, "size": f"{size}x{size}", "num_inference_steps": steps, "seed": 42,
            "response_format": "b64_json"}
    if lora is not None:
        body["lora"] = lora
    response = httpx.post(f"{server}/v1/images/generations", json=body, timeout=300)
    response.raise_for_status()
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="http://localhost:8091")
    parser.add_argument("--lora-path", required=True)
    parser.add_argument("--prompt", default="MIA_char, standing in a new york city")
    parser.add_argument("--out-dir", default="lora_verify_output")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = {"baseline": render(args.server, args.prompt, args.size, args.steps, None)}
    for scale in (0.0, 1.0):
        images[f"lora_scale_{scale:g}"] = render(args.server, args.prompt, args.size, args.steps,
                                                 {"name": "verify_lora", "local_path": args.lora_path,
                                                  "scale": scale})
    for name, png in images.items():
        (out / f"{name}.png").write_bytes(png)
    base, zero, one = (pixels(images[k]) for k in ("baseline", "lora_scale_0", "lora_scale_1"))
    report = {"baseline_vs_scale0_max_abs": float(np.abs(base - zero).max()),
              "scale0_vs_scale1_mean_abs": float(np.abs(zero - one).mean()),
              "baseline_equals_scale0_bytes": images["baseline"] == images["lora_scale_0"]}
    print(json.dumps(report))
    ok = report["baseline_equals_scale0_bytes"] and report["scale0_vs_scale1_mean_abs"] > 0
    print("LoRA is applied" if ok else "LoRA check FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
