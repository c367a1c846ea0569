"""Triton entry point for the `diffusion` model: a thin shim over backends.diffusion.TritonDiffusionModel."""

import sys
from pathlib import Path

try:
    import backends  # noqa: F401  (on PYTHONPATH when started by scripts/serve or the Docker image)
except ImportError:  # plain `tritonserver --model-repository model_repository` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from backends.diffusion import TritonDiffusionModel as TritonPythonModel  # noqa: E402,F401
