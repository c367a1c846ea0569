"""Start and stop a real tritonserver (from the nvidia-pytriton wheel) on our model repository.

Used by scripts/serve and the test fixtures. Run with the project's venv interpreter: the Python backend stub
takes its `sys.path` from the first `python3` on PATH and must load that interpreter's own libpython (see
ARCHITECTURE.md), so both come from `sys.executable` here.

    python -m tools.launchers.triton layout      # lay out the backend folder (scripts/setup does this)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backends.settings import REPO_ROOT, cache_dir

log = logging.getLogger(__name__)

STUB_NAME = "triton_python_backend_stub"
TRITON_HOME_ENV = "MULTILORA_TRITONSERVER_HOME"
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _pytriton_server_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nvidia-pytriton is not installed in this interpreter; run scripts/setup")
    return Path(spec.origin).parent / "tritonserver"


def system_triton_home() -> Path | None:
    """A full Triton install to use instead of the wheel's server (the Docker image sets /opt/tritonserver)."""
    home = os.environ.get(TRITON_HOME_ENV)
    return Path(home) if home else None


def tritonserver_binary() -> Path:
    home = system_triton_home()
    return (home or _pytriton_server_dir()) / "bin" / "tritonserver"


def backend_dir() -> Path:
    home = system_triton_home()
    return home / "backends" if home else cache_dir() / "tritonserver" / "backends"


def layout_backend_dir() -> Path:
    """Copy the wheel's python backend and put the stub for our Python version beside it (idempotent)."""
    if system_triton_home():
        return backend_dir()  # a real install already has its stub
    src = _pytriton_server_dir()
    stub = src / "python_backend_stubs" / PY_VERSION / STUB_NAME
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton ships no Python backend stub for Python {PY_VERSION} ({stub})")
    dst = backend_dir() / "python"
    dst.mkdir(parents=True, exist_ok=True)
    for item in [*(src / "backends" / "python").glob("*.so"), *(src / "backends" / "python").glob("*.py"), stub]:
        target = dst / item.name
        if not target.exists() or target.stat().st_size != item.stat().st_size:
            shutil.copy2(item, target)
    (dst / STUB_NAME).chmod(0o755)
    return backend_dir()


def libpython_dir() -> Path:
    """Folder holding this interpreter's libpython3.X.so.1.0, for the stub's loader."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    lib = libdir / f"libpython{PY_VERSION}.so.1.0"
    if not lib.exists():
        raise FileNotFoundError(
            f"{lib} not found: the Python backend stub needs the shared libpython of {sys.executable}; "
            f"use a Python built with --enable-shared (pyenv's or Debian's python{PY_VERSION})"
        )
    return libdir


def server_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)  # not resolved: the venv's bin, not the base interpreter's
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    if not system_triton_home():
        # The copied stub lost its RPATH to the wheel's bundled libraries (libcudart etc.).
        wheel_libs = _pytriton_server_dir().parents[1] / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in [str(libpython_dir()), str(wheel_libs), env.get("LD_LIBRARY_PATH")] if p
        )
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH")] if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def die_with_parent() -> None:
    """preexec_fn: the kernel sends SIGTERM to tritonserver if its launcher dies without stopping it."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_model(repo: Path, source: str, name: str, params: dict[str, str],
               edits: dict[str, str] | None = None) -> Path:
    """A copy of a model of model_repository under another name, with parameters changed and text replaced."""
    shutil.copytree(REPO_ROOT / "model_repository" / source, repo / name)
    config = repo / name / "config.pbtxt"
    text = re.sub(rf'name: "{source}"', f'name: "{name}"', config.read_text(), count=1)
    for key, value in params.items():
        text, n = re.subn(rf'(key: "{key}", value: {{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        if n != 1:
            raise ValueError(f"parameter {key} not found in the {source} config")
    for old, new in (edits or {}).items():
        if old not in text:
            raise ValueError(f"{old!r} not found in the {source} config")
        text = text.replace(old, new)
    config.write_text(text)
    return repo / name


@dataclass
class TritonServer:
    model_repository: Path = REPO_ROOT / "model_repository"
    models: list[str] = field(default_factory=lambda: ["llm", "diffusion"])
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 serves every interface
    log_file: Path | None = None  # None: inherit our stdout/stderr
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    process: subprocess.Popen | None = None

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={layout_backend_dir()}",
            "--model-control-mode=explicit",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--log-info=true",
        ]
        if not system_triton_home():
            cmd.append("--allow-gpu-metrics=false")  # the wheel's server runs on CPU-only hosts here
        cmd += [f"--load-model={m}" for m in self.models]
        return cmd + self.extra_args

    def start(self, timeout: float = 300.0) -> "TritonServer":
        cmd = self.command()
        log.info("starting %s", " ".join(cmd))
        out = open(self.log_file, "ab") if self.log_file else None
        # Own session: stop() signals the whole group, so no stub process outlives the server.
        self.process = subprocess.Popen(
            cmd, env=server_env(self.env), stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before ready"
                                   + self._log_hint())
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    log.info("tritonserver ready (pid %d)", self.process.pid)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s" + self._log_hint())

    def _log_hint(self) -> str:
        if not self.log_file or not Path(self.log_file).exists():
            return ""
        tail = Path(self.log_file).read_text(errors="replace").splitlines()[-40:]
        return f"; last lines of {self.log_file}:\n" + "\n".join(tail)

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.process
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            try:
                # SIGTERM to the server alone: it unloads its models, which stops their stubs cleanly (signalling
                # the whole group killed the stubs first and left the server waiting for them until its timeout).
                if sig == signal.SIGTERM:
                    proc.send_signal(sig)
                else:
                    os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop on %s", sig.name)
        # Stubs are in the server's process group; sweep any that are left.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None

    def stub_processes(self, model: str) -> list:
        """The Python-backend stub processes serving `model` (one per instance; their command line names the
        instance, e.g. `llm_0_0`)."""
        import psutil

        if self.process is None:
            return []
        stubs = []
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                args = child.cmdline()
            except psutil.Error:
                continue
            if any(re.fullmatch(rf"{re.escape(model)}_\d+(_\d+)?", a) for a in args):
                stubs.append(child)
        return stubs

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] == ["layout"]:
        print(layout_backend_dir())
    else:
        sys.exit(f"usage: {sys.argv[0]} layout")
