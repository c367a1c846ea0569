"""scripts/serve: run tritonserver on the model repository until Ctrl-C / SIGTERM.

Every flag has an env var (MULTILORA_*) so containers can configure it without arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from backends.settings import LLM_MODEL_PATH_ENV, REPO_ROOT
from scripts.triton_launcher import TritonServer

log = logging.getLogger("serve")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"MULTILORA_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=_env("HOST", "0.0.0.0"), help="bind address [MULTILORA_HOST, 0.0.0.0]")
    p.add_argument("--http-port", type=int, default=int(_env("HTTP_PORT", "8000")), help="[MULTILORA_HTTP_PORT]")
    p.add_argument("--grpc-port", type=int, default=int(_env("GRPC_PORT", "8001")), help="[MULTILORA_GRPC_PORT]")
    p.add_argument("--metrics-port", type=int, default=int(_env("METRICS_PORT", "8002")),
                   help="[MULTILORA_METRICS_PORT]")
    p.add_argument("--model-repository", type=Path,
                   default=Path(_env("MODEL_REPOSITORY", str(REPO_ROOT / "model_repository"))),
                   help="[MULTILORA_MODEL_REPOSITORY]")
    p.add_argument("--models", default=_env("MODELS", "llm,diffusion"),
                   help="comma-separated models to load at start [MULTILORA_MODELS, llm,diffusion]")
    p.add_argument("--llm-model-path", default=os.environ.get(LLM_MODEL_PATH_ENV),
                   help=f"Hugging Face model folder for the llm model [{LLM_MODEL_PATH_ENV}, converted SmolLM2]")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    p.add_argument("tritonserver_args", nargs="*", help="extra tritonserver flags, after --")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    env = dict(os.environ)
    if args.llm_model_path:
        env[LLM_MODEL_PATH_ENV] = str(Path(args.llm_model_path).expanduser().resolve())
    server = TritonServer(
        model_repository=args.model_repository.resolve(),
        models=[m for m in args.models.split(",") if m],
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        extra_args=args.tritonserver_args,
        env=env,
    )

    def _stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        server.start(timeout=args.ready_timeout)
        print(
            f"\ntritonserver is ready (models: {', '.join(server.models)})\n"
            f"  HTTP     http://{server.http_url}   (KServe v2; /v2/models/llm/generate_stream, "
            f"/v2/models/diffusion/infer)\n"
            f"  gRPC     {server.grpc_url}   (tritonclient.grpc streaming)\n"
            f"  metrics  {server.metrics_url}\n"
            "Ctrl-C to stop.\n",
            flush=True,
        )
        code = server.process.wait()
        log.error("tritonserver exited with code %d", code)
        return code or 1
    except KeyboardInterrupt:
        log.info("stopping tritonserver")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
