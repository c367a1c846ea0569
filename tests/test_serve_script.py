"""scripts/serve as a user runs it: ready with URLs printed, answers, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import psutil

from backends.settings import REPO_ROOT
from scripts.triton_launcher import free_port


def test_serve_starts_triton_and_frontend_and_ctrl_c_stops_every_process(tmp_path):
    http, grpc, metrics, frontend = free_port(), free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(REPO_ROOT / "scripts" / "serve"), "--host", "127.0.0.1", "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--frontend-port", str(frontend)],
            stdout=out, stderr=subprocess.STDOUT,
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
