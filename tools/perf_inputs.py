"""Write a perf_analyzer `--input-data` file of chat prompts for the llm model.

perf_analyzer fills BYTES inputs with random bytes unless told otherwise, which the model rightly rejects as
non-UTF-8; this file gives it real prompts (rendered with the served model's chat template) and fixed,
short generations so runs are comparable.

    .venv/bin/python -m tools.perf_inputs [--out FILE] [--max-tokens 32] [--structured-output '{"regex": "..."}']
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from backends.llm.chat import apply_chat_template
from backends.settings import cache_dir
from backends.structured import parse_constraint

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "Write one sentence about the sea.",
    "What is 12 times 12?",
    "Suggest a name for a pet cat.",
    "What language is spoken in Brazil?",
]


def build(max_tokens: int, temperature: float, stream: bool, structured_output: str | None = None) -> dict:
    extra = {"structured_output": [structured_output]} if structured_output else {}
    return {
        "data": [
            {
                "text_input": [apply_chat_template(q)],
                "max_tokens": [max_tokens],
                "temperature": [temperature],
                "stream": [stream],
                **extra,
            }
            for q in QUESTIONS
        ]
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=cache_dir() / "perf" / "llm_chat.json")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-stream", action="store_true", help="one response per request instead of per token")
    p.add_argument("--structured-output", default=None,
                   help='every request constrained, e.g. \'{"json": {"type": "object"}}\' (checked here first)')
    args = p.parse_args()
    if args.structured_output:
        parse_constraint(args.structured_output)  # a bad one fails here, not as 1,000 refused requests
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(build(args.max_tokens, args.temperature, not args.no_stream,
                                         args.structured_output), indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
