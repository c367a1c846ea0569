"""Client tools in their own virtual environments, made once and remade when their requirements file changes:
lm-eval (`.cache/lm-eval-venv` from requirements-eval.txt, about a minute), aiperf (`.cache/aiperf-venv` from
requirements-bench.txt) and vLLM for CPU (`.cache/vllm-venv` from requirements-vllm.txt, the peer of
benchmarks/peer_vllm.py). Separate from .venv because their dependencies need numpy 2 and the Triton Python stub
needs numpy 1.26.

    python -m tools.client_envs          # prints the path of the lm_eval executable
    python -m tools.client_envs aiperf   # prints the path of the aiperf executable
    python -m tools.client_envs vllm     # prints the path of vLLM's python
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

from backends.settings import REPO_ROOT, cache_dir

log = logging.getLogger(__name__)

STAMP = "requirements.sha256"


@dataclass(frozen=True)
class ToolEnv:
    folder: str  # under the cache dir
    requirements: Path
    executable: str  # in the environment's bin/
    remove: tuple[str, ...] = ()  # packages its requirements pull in that must not be there (see the file)

    def path(self) -> Path:
        return cache_dir() / self.folder

    def ensure(self) -> Path:
        """The path of the tool's executable, installing the environment first if needed."""
        env = self.path()
        digest = hashlib.sha256(self.requirements.read_bytes()).hexdigest()
        stamp = env / STAMP
        executable = env / "bin" / self.executable
        if executable.is_file() and stamp.is_file() and stamp.read_text() == digest:
            return executable
        log.info("installing %s into %s from %s (once)", self.executable, env, self.requirements.name)
        venv.EnvBuilder(clear=True, with_pip=True).create(env)
        pip = [str(env / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "--progress-bar", "on", "-r", str(self.requirements)], check=True)
        if self.remove:
            subprocess.run([*pip, "uninstall", "-y", *self.remove], check=True)
        stamp.write_text(digest)
        return executable


LM_EVAL = ToolEnv("lm-eval-venv", REPO_ROOT / "requirements-eval.txt", "lm_eval")
AIPERF = ToolEnv("aiperf-venv", REPO_ROOT / "requirements-bench.txt", "aiperf")
VLLM = ToolEnv("vllm-venv", REPO_ROOT / "requirements-vllm.txt", "python",
               remove=("torchvision", "torchaudio", "torchcodec"))
TOOLS = {"lm_eval": LM_EVAL, "aiperf": AIPERF, "vllm": VLLM}


def ensure_lm_eval() -> Path:
    return LM_EVAL.ensure()


def ensure_aiperf() -> Path:
    return AIPERF.ensure()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tool", nargs="?", choices=sorted(TOOLS), default="lm_eval")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(TOOLS[args.tool].ensure())


if __name__ == "__main__":
    sys.exit(main())
