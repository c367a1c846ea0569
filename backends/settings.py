"""Where the project keeps its caches and converted models; every path can be overridden by an env var."""

from __future__ import annotations

import os
from pathlib import Path

from backends.lora.store.locations import location, split_locations

REPO_ROOT = Path(__file__).resolve().parents[1]

CACHE_DIR_ENV = "MULTILORA_CACHE_DIR"
LLM_MODEL_PATH_ENV = "MULTILORA_LLM_MODEL_PATH"

DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Project cache (converted models, tritonserver layout); outside git, `.cache/` in the checkout by default."""
    return Path(os.environ.get(CACHE_DIR_ENV) or REPO_ROOT / ".cache").expanduser().resolve()


DIFFUSION_MODEL_PATH_ENV = "MULTILORA_DIFFUSION_MODEL_PATH"
DEFAULT_DIFFUSION_NAME = "tiny-random-sd3"


def default_diffusion_model_path() -> str:
    """The pipeline the `diffusion` Triton model serves unless its config or the env names another."""
    return os.environ.get(DIFFUSION_MODEL_PATH_ENV) or str(cache_dir() / "models" / DEFAULT_DIFFUSION_NAME)


def default_llm_model_path() -> Path:
    """The model the `llm` Triton model serves unless its config or the env names another."""
    env = os.environ.get(LLM_MODEL_PATH_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return cache_dir() / "models" / DEFAULT_LLM_NAME

LORA_REGISTRY_ENV = "MULTILORA_LORA_REGISTRY"
ALLOWED_LORA_ROOTS_ENV = "MULTILORA_ALLOWED_LORA_ROOTS"
LORA_RESOLVER_DIRS_ENV = "MULTILORA_LORA_RESOLVER_DIRS"


def adapters_dir() -> Path:
    """Where our scripts put adapters (demo adapters, benchmark adapters); always an allowed LoRA root."""
    return cache_dir() / "adapters"


def lora_registry_file() -> str | Path:
    """The dynamic adapter registry shared by the backends and the frontend's load/unload endpoints: a local file,
    or an s3:// object that several replicas share."""
    env = os.environ.get(LORA_REGISTRY_ENV)
    if not env:
        return cache_dir() / "lora_registry.json"
    found = location(env)
    return found if isinstance(found, str) else found.resolve()


def env_locations(name: str) -> list[str | Path]:
    """An os.pathsep-separated list of folders and s3:// locations from the environment."""
    return split_locations(os.environ.get(name, ""))
