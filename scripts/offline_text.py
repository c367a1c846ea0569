"""Text generation with LoRA over a JSONL file, offline (no server), through the serving engine.

Each input line: {"prompt": "..."} or {"messages": [...]}, optionally "adapter" (a pre-loaded or registered name,
or an adapter folder; or a list of them, a LoRA stack, with "scale" a list too), "scale", "max_tokens",
"temperature", "seed". Each output line: the input's line number and text, finish_reason, prompt_tokens,
completion_tokens; or its error. A bad line is reported with its number
and the others still run.

    PYTHONPATH=. .venv/bin/python -m scripts.offline_text --input prompts.jsonl --output results.jsonl \\
        --lora-modules uppercase=.cache/adapters/demo/uppercase
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from backends.errors import BackendError
from backends.offline import LoRA, TextGenerator


def _field(entry: dict, name: str, kind: type, default=None):
    """A line's optional field, type-checked (bools are not numbers here); null = the default."""
    value = entry.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise ValueError(f"'{name}' must be {'a number' if kind is float else 'an integer'}, got {value!r}")
    return value


def _adapter(adapter, scale: float | None) -> LoRA:
    if not isinstance(adapter, str) or not adapter:
        raise ValueError("'adapter' must be a name or a folder path, or a list of them")
    return LoRA(path=adapter, scale=scale) if "/" in adapter else LoRA(name=adapter, scale=scale)


def _lora(entry: dict) -> LoRA | tuple[LoRA, ...] | None:
    """"adapter": a name or folder with an optional "scale", or a list of them (a LoRA stack) with an optional
    list of scales."""
    adapter, scale = entry.get("adapter"), entry.get("scale")
    if adapter is None:
        if scale is not None:
            raise ValueError("'scale' was given without an 'adapter'")
        return None
    if not isinstance(adapter, list):
        return _adapter(adapter, _field(entry, "scale", float))
    if not adapter:
        raise ValueError("'adapter' is an empty list; leave it out for the base model")
    scales = [None] * len(adapter) if scale is None else scale
    if not isinstance(scales, list) or len(scales) != len(adapter):
        raise ValueError(f"'scale' must be a list of {len(adapter)} numbers for {len(adapter)} adapters")
    return tuple(_adapter(a, _field({"scale": s}, "scale", float)) for a, s in zip(adapter, scales))


def _prompt(entry: dict):
    if "messages" in entry:
        if not isinstance(entry["messages"], list):
            raise ValueError("'messages' must be a list of {role, content} objects")
        return entry["messages"]
    if not isinstance(entry.get("prompt"), str):
        raise ValueError("each line needs a 'prompt' string or 'messages'")
    return entry["prompt"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--model", default=None, help="causal-LM folder (default: the converted SmolLM2)")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH", help="adapters to pre-load")
    p.add_argument("--max-tokens", type=int, default=64, help="when a line gives none")
    p.add_argument("--temperature", type=float, default=0.0, help="when a line gives none")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU or a CPU with AVX512-BF16/AMX, else float32")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    preload = {}
    for item in args.lora_modules:
        name, _, path = item.partition("=")
        if not name or not path:
            p.error(f"--lora-modules takes NAME=PATH, got {item!r}")
        if not Path(path).exists():
            print(f"error: adapter {name}: {path} does not exist", file=sys.stderr)
            return 2
        preload[name] = path
    try:
        lines = args.input.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read --input {args.input}: {exc}", file=sys.stderr)
        return 2
    try:
        generator = TextGenerator(args.model, preload=preload, device=args.device, max_num_seqs=args.max_num_seqs,
                                  max_loras=args.max_loras, dtype=args.dtype)
    except (BackendError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results: dict[int, dict] = {}
    requests, numbers = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("each line must be a JSON object")
            requests.append(generator.prepare(
                _prompt(entry), _lora(entry), max_tokens=_field(entry, "max_tokens", int, args.max_tokens),
                temperature=_field(entry, "temperature", float, args.temperature), seed=_field(entry, "seed", int),
                structured_output=entry.get("structured_output")))
            numbers.append(number)
        except Exception as exc:  # this line's fault (bad JSON, field, adapter, template): report it, run the rest
            results[number] = {"line": number, "error": str(exc)}
            print(f"{args.input}:{number}: {exc}", file=sys.stderr)
    started = time.perf_counter()
    try:
        outputs = generator.run(requests)
    finally:
        generator.close()
    seconds = time.perf_counter() - started
    for number, out in zip(numbers, outputs):
        if isinstance(out, Exception):
            results[number] = {"line": number, "error": str(out)}
        else:
            results[number] = {"line": number, "text": out.text, "finish_reason": out.finish_reason,
                               "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w") as f:
        for number in sorted(results):
            f.write(json.dumps(results[number], ensure_ascii=False) + "\n")
    tokens = sum(r.get("completion_tokens", 0) for r in results.values())
    failed = sum("error" in r for r in results.values())
    print(f"{len(requests)} prompts ({failed} lines failed), {tokens} tokens in {seconds:.1f} s: "
          f"{tokens / max(seconds, 1e-9):.1f} tok/s, {len(requests) / max(seconds, 1e-9):.2f} prompts/s -> {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
