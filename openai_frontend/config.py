"""Frontend settings: command-line flags, each with an environment variable (MULTILORA_* or vLLM's name)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from backends.errors import InvalidArgument
from backends.lora.store.locations import location
from backends.settings import ALLOWED_LORA_ROOTS_ENV, adapters_dir, env_locations, lora_registry_file


def _location(value: str) -> str | Path:
    """argparse type: a folder or s3:// location (a bad one is a usage error, not a traceback)."""
    try:
        return location(value)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FrontendConfig:
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_metrics_url: str | None = "http://127.0.0.1:8002/metrics"
    api_key: str | None = None
    admin_key: str | None = None  # load/unload routes; falls back to api_key
    allow_runtime_lora_updating: bool = False
    lora_modules: str = ""  # vLLM --lora-modules forms, registered at start
    registry_file: str | Path = field(default_factory=lora_registry_file)  # a file, or s3:// shared by replicas
    allowed_lora_roots: tuple[str | Path, ...] = ()  # folders and s3:// buckets or prefixes
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    max_prompt_chars: int = 32768
    max_images: int = 4
    max_image_size: int = 1024
    catalog_ttl_s: float = 2.0
    supervise: bool = True  # probe the models and reload those whose process died (engine/supervisor.py)
    probe_interval_s: float = 2.0
    max_model_restarts: int = 3
    restart_window_s: float = 600.0
    public_metrics: bool = False  # /metrics without the API key (scrapers such as the gateway's endpoint picker)
    lora_separator: str | None = None  # Triton's OpenAI frontend: model="<base><sep><adapter>" (None: off)

    @property
    def roots(self) -> tuple[str | Path, ...]:
        return (adapters_dir(), *self.allowed_lora_roots)


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m openai_frontend",
                                description="OpenAI-compatible frontend for the multi-LoRA Triton server")
    p.add_argument("--host", default=env("MULTILORA_FRONTEND_HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(env("MULTILORA_FRONTEND_PORT", "9000")))
    p.add_argument("--triton-grpc-url", default=env("MULTILORA_TRITON_GRPC_URL", "127.0.0.1:8001"))
    p.add_argument("--triton-metrics-url", default=env("MULTILORA_TRITON_METRICS_URL",
                                                       "http://127.0.0.1:8002/metrics"))
    p.add_argument("--api-key", default=env("MULTILORA_API_KEY") or env("VLLM_API_KEY"),
                   help="required as 'Authorization: Bearer KEY' on /v1 routes and /metrics [MULTILORA_API_KEY]")
    p.add_argument("--admin-key", default=env("MULTILORA_ADMIN_KEY"),
                   help="required on adapter and model load/unload routes (default: the API key)")
    p.add_argument("--allow-runtime-lora-updating", action="store_true",
                   default=_truthy(env("MULTILORA_ALLOW_RUNTIME_LORA_UPDATING"))
                   or _truthy(env("VLLM_ALLOW_RUNTIME_LORA_UPDATING")),
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter "
                        "[MULTILORA_ALLOW_RUNTIME_LORA_UPDATING or VLLM_ALLOW_RUNTIME_LORA_UPDATING]")
    p.add_argument("--lora-modules", nargs="*", default=[env("MULTILORA_LORA_MODULES", "")],
                   help="adapters to register at start: name=path ... or vLLM's JSON form")
    p.add_argument("--lora-registry-file", type=_location, default=lora_registry_file(),
                   help="the registry shared with the backends: a file, or s3://bucket/key shared by every replica "
                        "[MULTILORA_LORA_REGISTRY]")
    p.add_argument("--allowed-lora-root", action="append", type=_location, default=[],
                   help="adapter paths must lie under one of these folders or s3://bucket/prefix locations "
                        "(repeatable; .cache/adapters always allowed)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-tokens-limit", type=int, default=4096)
    p.add_argument("--max-prompt-chars", type=int, default=32768)
    p.add_argument("--max-images", type=int, default=4)
    p.add_argument("--max-image-size", type=int, default=1024)
    p.add_argument("--no-supervise", action="store_true", default=_truthy(env("MULTILORA_NO_SUPERVISE")),
                   help="do not probe the models nor reload one whose process died [MULTILORA_NO_SUPERVISE]")
    p.add_argument("--probe-interval-s", type=float, default=float(env("MULTILORA_PROBE_INTERVAL_S", "2")),
                   help="seconds between liveness probes of every model [MULTILORA_PROBE_INTERVAL_S, 2]")
    p.add_argument("--max-model-restarts", type=int, default=int(env("MULTILORA_MAX_MODEL_RESTARTS", "3")),
                   help="restarts of one model within --restart-window-s before it is left down [3]")
    p.add_argument("--restart-window-s", type=float, default=float(env("MULTILORA_RESTART_WINDOW_S", "600")),
                   help="[MULTILORA_RESTART_WINDOW_S, 600]")
    p.add_argument("--lora-separator", default=env("MULTILORA_LORA_SEPARATOR") or None,
                   help="also accept model='<base><sep><adapter>' (Triton's OpenAI frontend naming, e.g. '/') and "
                        "list adapters that way in /v1/models [MULTILORA_LORA_SEPARATOR, off]")
    p.add_argument("--public-metrics", action="store_true", default=_truthy(env("MULTILORA_PUBLIC_METRICS")),
                   help="serve /metrics without the API key, for scrapers that cannot send one (the inference "
                        "gateway's endpoint picker) [MULTILORA_PUBLIC_METRICS]")
    p.add_argument("--log-level", default=env("MULTILORA_LOG_LEVEL", "info"))
    return p


def from_args(args: argparse.Namespace) -> FrontendConfig:
    roots = [*args.allowed_lora_root, *env_locations(ALLOWED_LORA_ROOTS_ENV)]
    return FrontendConfig(
        triton_grpc_url=args.triton_grpc_url, triton_metrics_url=args.triton_metrics_url or None,
        api_key=args.api_key or None, admin_key=args.admin_key or None,
        allow_runtime_lora_updating=args.allow_runtime_lora_updating,
        lora_modules=" ".join(m for m in args.lora_modules if m), registry_file=args.lora_registry_file,
        allowed_lora_roots=tuple(r if isinstance(r, str) else r.resolve() for r in roots),
        max_body_bytes=args.max_body_bytes,
        max_tokens_limit=args.max_tokens_limit, max_prompt_chars=args.max_prompt_chars, max_images=args.max_images,
        max_image_size=args.max_image_size, supervise=not args.no_supervise,
        probe_interval_s=args.probe_interval_s, max_model_restarts=args.max_model_restarts,
        restart_window_s=args.restart_window_s, lora_separator=args.lora_separator or None,
        public_metrics=args.public_metrics,
    )
