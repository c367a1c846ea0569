#!/usr/bin/env python3
"""Like vLLM-Omni's lora_inference chat client: chat completions on a diffusion server with the image options and
the per-request adapter in a literal `extra_body` object, and no `model` (the server's own is meant)."""

import argparse
import base64
import sys
from pathlib import Path

import httpx


def generate_image(server: str, prompt: str, lora_path: str | None, lora_name: str | None,
                   lora_scale: float | None, lora_int_id: int | None, height: int, width: int, steps: int,
                   seed: int) -> bytes:
    extra_body = {"height": height, "width": width, "num_inference_steps": steps, "seed": seed,
                  "num_outputs_per_prompt": 1}
    if lora_path:
        lora = {"local_path": lora_path, "name": lora_name or Path(lora_path).name}
        if lora_scale is not None:
            lora["scale"] = lora_scale
        if lora_int_id is not None:
            lora["int_id"] = lora_int_id
        extra_body["lora"] = lora
    payload = {"messages": [{"role": "user", "content": prompt}], "extra_body": extra_body}
    response = httpx.post(f"{server}/v1/chat/completions", json=payload, timeout=300)
    response.raise_for_status()
    content = response.json()["choices"][0]["message"]["content"]
    url = content[0]["image_url"]["url"]
    if not url.startswith("data:image"):
        raise SystemExit(f"unexpected response: {content}")
    return base64.b64decode(url.split(",", 1)[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="http://localhost:8091")
    parser.add_argument("--prompt", default="A piece of cheesecake")
    parser.add_argument("--lora-path")
    parser.add_argument("--lora-name")
    parser.add_argument("--lora-scale", type=float)
    parser.add_argument("--lora-int-id", type=int)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default="output.png")
    args = parser.parse_args()
    image = generate_image(args.server, args.prompt, args.lora_path, args.lora_name, args.lora_scale,
                           args.lora_int_id, args.height, args.width, args.steps, args.seed)
    Path(args.output).write_bytes(image)
    print(f"Image saved to: {args.output} ({len(image)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
