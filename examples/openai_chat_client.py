"""Chat with a LoRA adapter using the official `openai` SDK (vLLM-Omni's openai_chat_client.py, on this server).

    python examples/openai_chat_client.py --model uppercase "What is the capital of France?"
    python examples/openai_chat_client.py --model llm --lora-name signature --lora-path .cache/adapters/demo/signature
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from openai import OpenAI


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", default="What is the capital of France?")
    p.add_argument("--base-url", default=os.environ.get("BASE_URL", "http://127.0.0.1:9000") + "/v1")
    p.add_argument("--api-key", default=os.environ.get("API_KEY", "none"))
    p.add_argument("--model", default="uppercase", help="a base model or an adapter name")
    p.add_argument("--lora-name", help="with --lora-path: per-request adapter on the base --model")
    p.add_argument("--lora-path")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--stream", action="store_true")
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    extra = {}
    if args.lora_name and args.lora_path:
        extra["lora"] = {"name": args.lora_name, "path": str(Path(args.lora_path).resolve()),
                         "scale": args.lora_scale}
    request = dict(model=args.model, messages=[{"role": "user", "content": args.prompt}],
                   max_tokens=args.max_tokens, temperature=0, extra_body=extra or None)
    if args.stream:
        for chunk in client.chat.completions.create(stream=True, **request):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
    else:
        reply = client.chat.completions.create(**request)
        print(reply.choices[0].message.content)
        print(f"[{reply.usage.prompt_tokens} prompt + {reply.usage.completion_tokens} completion tokens, "
              f"finish_reason={reply.choices[0].finish_reason}]")


if __name__ == "__main__":
    main()
