"""scripts/serve: run tritonserver on the model repository and the OpenAI-compatible frontend on top of it, until
Ctrl-C / SIGTERM stops both.

Every flag has an env var (MULTILORA_*) so containers can configure it without arguments; the frontend reads its
own (MULTILORA_API_KEY, MULTILORA_ADMIN_KEY, MULTILORA_ALLOW_RUNTIME_LORA_UPDATING, ...: see
`python -m openai_frontend --help`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from backends.settings import LLM_MODEL_PATH_ENV, REPO_ROOT
from openai_frontend.engine.gateway import ADMIN_HEADER
from tools.launchers.triton import TritonServer, die_with_parent

log = logging.getLogger("serve")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"MULTILORA_{name}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=_env("HOST", "0.0.0.0"),
                   help="the OpenAI frontend's bind address, the public face [MULTILORA_HOST, 0.0.0.0]")
    p.add_argument("--triton-host", default=_env("TRITON_HOST", "127.0.0.1"),
                   help="tritonserver's bind address (HTTP, gRPC, metrics) [MULTILORA_TRITON_HOST, 127.0.0.1]. "
                        "Anything but loopback exposes Triton: then MULTILORA_ADMIN_KEY must be set, and Triton's "
                        "model-repository, shared-memory, trace and logging APIs need the header "
                        f"'{ADMIN_HEADER}: <admin key>'")
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
    p.add_argument("--frontend-port", type=int, default=int(_env("FRONTEND_PORT", "9000")),
                   help="OpenAI-compatible API port [MULTILORA_FRONTEND_PORT, 9000]")
    p.add_argument("--no-frontend", action="store_true", default=_env("NO_FRONTEND", "") == "1",
                   help="serve Triton only [MULTILORA_NO_FRONTEND=1]")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the models to load")
    p.add_argument("tritonserver_args", nargs="*", help="extra tritonserver flags, after --")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    env = dict(os.environ)
    if args.llm_model_path:
        env[LLM_MODEL_PATH_ENV] = str(Path(args.llm_model_path).expanduser().resolve())
    admin_key = os.environ.get("MULTILORA_ADMIN_KEY") or None
    try:
        restricted = restricted_api_args(args.triton_host, admin_key)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    server = TritonServer(
        model_repository=args.model_repository.resolve(),
        models=[m for m in args.models.split(",") if m],
        host=args.triton_host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        extra_args=[*restricted, *args.tritonserver_args],
        env=env,
    )

    def _stop(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    frontend = None
    try:
        server.start(timeout=args.ready_timeout)
        if not args.no_frontend:
            frontend = start_frontend(args, server, env)
        print(
            f"\ntritonserver is ready (models: {', '.join(server.models)})\n"
            f"  HTTP     http://{server.http_url}   (KServe v2; /v2/models/llm/generate_stream, "
            f"/v2/models/diffusion/infer)\n"
            f"  gRPC     {server.grpc_url}   (tritonclient.grpc streaming)\n"
            f"  metrics  {server.metrics_url}\n"
            + (f"OpenAI-compatible API: http://{server.client_host}:{args.frontend_port}/v1   "
               f"(/v1/chat/completions, /v1/completions, /v1/images/generations, /v1/models, /metrics)\n"
               if frontend else "")
            + "Ctrl-C to stop.\n",
            flush=True,
        )
        while True:
            if (code := server.process.poll()) is not None:
                log.error("tritonserver exited with code %d", code)
                return code or 1
            if frontend is not None and (code := frontend.poll()) is not None:
                log.error("the frontend exited with code %d", code)
                return code or 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping tritonserver")
        return 0
    finally:
        if frontend is not None and frontend.poll() is None:
            frontend.terminate()
            try:
                frontend.wait(15)
            except subprocess.TimeoutExpired:
                frontend.kill()
        server.stop()


# Triton APIs that change what the server runs or reads/writes on the host: model (un)loading, including a model
# load whose payload overrides files (arbitrary model.py), shared-memory registration, trace files, log settings.
RESTRICTED_APIS = "model-repository,shared-memory,trace,logging"


def restricted_api_args(triton_host: str, admin_key: str | None) -> list[str]:
    """tritonserver flags that put its admin APIs behind the admin key; exposing Triton without one is refused."""
    try:
        address = ipaddress.ip_address(triton_host)
    except ValueError:  # a host name
        address = ipaddress.ip_address(socket.gethostbyname(triton_host))
    exposed = not address.is_loopback
    if exposed and not admin_key:
        raise ValueError(f"--triton-host {triton_host} exposes tritonserver beyond this machine: set "
                         f"MULTILORA_ADMIN_KEY so that its model-control APIs are restricted (see docs/security.md)")
    if not admin_key:
        return []
    spec = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={admin_key}"
    return [f"--http-restricted-api={spec}", f"--grpc-restricted-protocol={spec}"]  # the 2.51 names


def start_frontend(args: argparse.Namespace, server: TritonServer, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "openai_frontend", "--host", args.host, "--port", str(args.frontend_port),
           "--triton-grpc-url", server.grpc_url, "--triton-metrics-url", server.metrics_url]
    proc = subprocess.Popen(cmd, env={**env, "PYTHONPATH": str(REPO_ROOT)}, cwd=REPO_ROOT,
                            preexec_fn=die_with_parent)
    url = f"http://{server.client_host}:{args.frontend_port}/health"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the frontend exited with code {proc.returncode} at start")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError("the frontend did not answer /health within 60 s")


if __name__ == "__main__":
    sys.exit(main())
