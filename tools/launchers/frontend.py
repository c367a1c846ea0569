"""The OpenAI frontend as a real process (uvicorn on a free port), for the tests and benchmarks/soak.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from backends.settings import REPO_ROOT
from tools.launchers.triton import free_port


class FrontendProcess:
    def __init__(self, grpc_url: str, metrics_url: str | None, log_file: Path, *extra: str,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "openai_frontend", "--host", "127.0.0.1", "--port", str(self.port),
                    "--triton-grpc-url", grpc_url, *(["--triton-metrics-url", metrics_url] if metrics_url else []),
                    *extra]
        self.log_file = log_file
        self.env = {**(os.environ if env is None else env), "PYTHONPATH": str(REPO_ROOT)}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "FrontendProcess":
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_file.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"frontend not up: {self.log_file.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
