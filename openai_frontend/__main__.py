"""`python -m openai_frontend --port 9000 --triton-grpc-url 127.0.0.1:8001 ...` (see --help)."""

from __future__ import annotations

import logging
import os
import sys

# The frontend is a torch-free process: it needs transformers only for tokenizers and chat templates, and
# transformers imports torch whenever it can find it (hundreds of MB and seconds of start-up for nothing). Hidden
# here, before anything is imported, transformers runs tokenizer-only and any stray torch import fails loudly.
sys.modules.setdefault("torch", None)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found": on purpose

import uvicorn  # noqa: E402

from openai_frontend.app import create_app  # noqa: E402
from openai_frontend.config import from_args, parser  # noqa: E402


def main() -> None:
    args = parser().parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(from_args(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
