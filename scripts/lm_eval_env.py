"""The lm-evaluation-harness environment: `.cache/lm-eval-venv` from requirements-eval.txt, made once (about a
minute) and remade when that file changes. Separate from .venv because lm-eval's dependencies need numpy 2 and the
Triton Python stub needs numpy 1.26.

    python -m scripts.lm_eval_env          # prints the path of its lm_eval executable
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import venv
from pathlib import Path

from backends.settings import REPO_ROOT, cache_dir

log = logging.getLogger("lm_eval_env")

REQUIREMENTS = REPO_ROOT / "requirements-eval.txt"
STAMP = "requirements.sha256"


def lm_eval_env() -> Path:
    return cache_dir() / "lm-eval-venv"


def ensure_lm_eval() -> Path:
    """The path of `lm_eval` in the environment, installing it first if needed."""
    env = lm_eval_env()
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = env / STAMP
    executable = env / "bin" / "lm_eval"
    if executable.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return executable
    log.info("installing lm-eval into %s from %s (about a minute, once)", env, REQUIREMENTS.name)
    venv.EnvBuilder(clear=True, with_pip=True).create(env)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "on", "-r",
                    str(REQUIREMENTS)], check=True)
    stamp.write_text(digest)
    return executable


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_lm_eval())


if __name__ == "__main__":
    sys.exit(main())
