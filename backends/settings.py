"""Where the project keeps its caches and converted models; every path can be overridden by an env var."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

CACHE_DIR_ENV = "MULTILORA_CACHE_DIR"
LLM_MODEL_PATH_ENV = "MULTILORA_LLM_MODEL_PATH"

DEFAULT_LLM_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Project cache (converted models, tritonserver layout); outside git, `.cache/` in the checkout by default."""
    return Path(os.environ.get(CACHE_DIR_ENV) or REPO_ROOT / ".cache").expanduser().resolve()


def default_llm_model_path() -> Path:
    """The model the `llm` Triton model serves unless its config or the env names another."""
    env = os.environ.get(LLM_MODEL_PATH_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return cache_dir() / "models" / DEFAULT_LLM_NAME
