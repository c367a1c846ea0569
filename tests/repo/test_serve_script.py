"""scripts/serve as a user runs it: ready with URLs printed, answers, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from backends.settings import REPO_ROOT
from tools.launchers.triton import free_port

ADMIN = "serve-admin-key"


def test_serve_starts_triton_and_frontend_and_ctrl_c_stops_every_process(tmp_path):
    http, grpc, metrics, frontend = free_port(), free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(REPO_ROOT / "scripts" / "serve"), "--host", "127.0.0.1", "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--frontend-port", str(frontend)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "MULTILORA_ADMIN_KEY": ADMIN},
        )
    try:
        deadline = time.monotonic() + 300
        while "is ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "scripts/serve never became ready"
            time.sleep(0.5)
        text = log.read_text()
        assert f"http://127.0.0.1:{http}" in text and f"127.0.0.1:{grpc}" in text
        assert f"http://127.0.0.1:{metrics}/metrics" in text
        assert httpx.get(f"http://127.0.0.1:{http}/v2/models/llm/ready").status_code == 200

        reply = httpx.post(f"http://127.0.0.1:{http}/v2/models/llm/generate",
                           json={"text_input": "Hello", "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200 and reply.json()["num_output_tokens"] == 2
        assert f"http://127.0.0.1:{frontend}/v1" in text
        reply = httpx.post(f"http://127.0.0.1:{frontend}/v1/completions",
                           json={"model": "llm", "prompt": "Hello", "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2

        # Triton listens on loopback only, and its admin APIs need the admin key header; the frontend has it.
        triton = next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "tritonserver")
        assert "--http-address=127.0.0.1" in triton.cmdline() and "--grpc-address=127.0.0.1" in triton.cmdline()
        index = f"http://127.0.0.1:{http}/v2/repository/index"
        assert httpx.post(index, timeout=30).status_code in (401, 403)
        assert httpx.post(f"http://127.0.0.1:{http}/v2/repository/models/llm/unload", timeout=30).status_code \
            in (401, 403)
        assert httpx.get(f"http://127.0.0.1:{http}/v2/models/llm/ready").status_code == 200  # still loaded
        assert httpx.post(index, headers={"multilora-admin-key": ADMIN}, timeout=30).status_code == 200
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="restricted"):
            grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}").unload_model("llm")
        models = httpx.get(f"http://127.0.0.1:{frontend}/v1/models", timeout=30)
        assert models.status_code == 200 and "llm" in {m["id"] for m in models.json()["data"]}

        family = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(p.name() for p in family)
        assert "tritonserver" in names and "triton_python_b" in names, names
        assert any("openai_frontend" in " ".join(p.cmdline()) for p in family), "the frontend is not running"

        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers
        assert proc.wait(60) == 0
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not alive, f"left running after Ctrl-C: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_to_expose_triton_without_an_admin_key():
    env = {k: v for k, v in os.environ.items() if k != "MULTILORA_ADMIN_KEY"}
    done = subprocess.run([str(REPO_ROOT / "scripts" / "serve"), "--triton-host", "0.0.0.0", "--http-port",
                           str(free_port())], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "exposes tritonserver beyond this machine: set MULTILORA_ADMIN_KEY" in done.stdout + done.stderr


def test_serve_exits_non_zero_at_once_when_tritonserver_dies(tmp_path):
    """The chosen behaviour (docs/reliability.md): scripts/serve does not restart tritonserver itself; it exits
    non-zero within a second so that Kubernetes/systemd restarts the whole stack."""
    http, frontend = free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(REPO_ROOT / "scripts" / "serve"), "--http-port", str(http), "--grpc-port", str(free_port()),
             "--metrics-port", str(free_port()), "--frontend-port", str(frontend), "--models", "diffusion"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "is ready" not in log.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        family = psutil.Process(proc.pid).children(recursive=True)
        triton = next(p for p in family if p.name() == "tritonserver")
        triton.kill()
        started = time.monotonic()
        assert proc.wait(30) != 0
        assert time.monotonic() - started < 5
        assert "tritonserver exited with code" in log.read_text(errors="replace")
        gone, alive = psutil.wait_procs(family, timeout=30)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        if proc.poll() is None:
            proc.kill()
