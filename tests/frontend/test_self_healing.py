"""A dead model process heals itself (issue #17), with real processes and real signals: `kill -9` of a model's
Python-backend stub while it serves. In-flight requests end at once with a retryable error, readiness turns red,
the frontend's supervisor reloads the model, and traffic resumes with the same answers. Own tritonserver and
frontend: the session's server is not disturbed."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time

import httpx
import pytest

from backends.settings import ALLOWED_LORA_ROOTS_ENV, LORA_REGISTRY_ENV, adapters_dir, cache_dir
from tools.fixtures.pipelines import TINY_SD15
from tools.launchers.frontend import FrontendProcess
from tools.launchers.triton import TritonServer, copy_model, free_port

KEY = "heal-admin-key"
SPARE = "diffusion_spare"  # killed three times: the restart cap
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("healing")
    repo = root / "repo"
    copy_model(repo, "diffusion", SPARE, {"model_path": str(cache_dir() / "models" / TINY_SD15), "lora_modules": ""})
    server = TritonServer(
        models=["llm", "diffusion", SPARE], http_port=free_port(), grpc_port=free_port(),
        metrics_port=free_port(), log_file=root / "tritonserver.log", extra_args=[f"--model-repository={repo}"],
        env={**os.environ, ALLOWED_LORA_ROOTS_ENV: str(root), LORA_REGISTRY_ENV: str(root / "registry.json")},
    ).start(timeout=300)
    frontend = FrontendProcess(
        server.grpc_url, server.metrics_url, root / "frontend.log", "--admin-key", KEY,
        "--allow-runtime-lora-updating", "--lora-registry-file", str(root / "registry.json"),
        "--probe-interval-s", "1", "--max-model-restarts", "2",
    ).start()
    try:
        yield server, frontend
    finally:
        frontend.stop()
        server.stop()


def _chat(frontend, model: str = "llm", **extra) -> httpx.Response:
    return httpx.post(f"{frontend.url}/v1/chat/completions", timeout=120, json={
        "model": model, "messages": CAPITAL, "max_tokens": 12, "temperature": 0, **extra})


def _image(frontend, model: str = "diffusion", **extra) -> httpx.Response:
    return httpx.post(f"{frontend.url}/v1/images/generations", timeout=120, json={
        "model": model, "prompt": "a red cat", "size": "64x64", "seed": 5, "num_inference_steps": 2, **extra})


def _kill(server: TritonServer, model: str) -> None:
    stubs = server.stub_processes(model)
    assert stubs, f"no stub process for {model}"
    for stub in stubs:
        os.kill(stub.pid, signal.SIGKILL)


def _ready(frontend) -> httpx.Response:
    return httpx.get(f"{frontend.url}/health/ready", timeout=30)


def _wait_back(frontend, probe, timeout: float = 90) -> float:
    """Seconds until `probe()` answers 200 again; every answer meanwhile is a 503 with Retry-After, never a hang."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        reply = probe()
        if reply.status_code == 200:
            return time.monotonic() - started
        assert reply.status_code == 503, reply.text
        assert "Retry-After" in reply.headers and reply.json()["error"]["type"] == "service_unavailable"
        time.sleep(0.5)
    raise AssertionError(f"not back within {timeout} s")


def _restarts(frontend, model: str) -> float:
    for line in httpx.get(f"{frontend.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f'multilora_model_restarts_total{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_llm_stub_killed_during_a_stream(stack):
    server, frontend = stack
    loaded = httpx.post(f"{frontend.url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {KEY}"},
                        json={"lora_name": "dyn-sig", "lora_path": str(adapters_dir() / "demo" / "signature")})
    assert loaded.status_code == 200, loaded.text
    before = {m: _chat(frontend, m).json()["choices"][0]["message"]["content"] for m in ("llm", "uppercase",
                                                                                          "dyn-sig")}
    events: list[str] = []
    ended: list[float] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "llm", "messages": [{"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{frontend.url}/v1/chat/completions", json=body, timeout=120) as reply:
            for line in reply.iter_lines():
                if line:
                    events.append(line)
                    started.set()
        ended.append(time.monotonic())

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    time.sleep(0.5)
    killed = time.monotonic()
    _kill(server, "llm")
    thread.join(30)
    assert ended and ended[0] - killed < 5, "the stream did not end within 5 s of the kill"
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == 503 and "llm" in error["message"], error

    ready = _ready(frontend)  # restarting: red, and says which model
    assert ready.status_code == 503 and "llm" in ready.json()["restarting"], ready.text
    recovery = _wait_back(frontend, lambda: _chat(frontend))
    print(f"\nllm back {recovery:.1f} s after the kill was noticed ({time.monotonic() - killed:.1f} s after it)")
    after = {m: _chat(frontend, m).json()["choices"][0]["message"]["content"] for m in before}
    assert after == before  # base, the static (pinned) adapter and the dynamic one answer as before
    assert _ready(frontend).status_code == 200
    assert _restarts(frontend, "llm") == 1
    assert "restarting it (unload + load)" in frontend.log_file.read_text()


def test_diffusion_stub_killed_during_an_image_request(stack):
    server, frontend = stack
    before = _image(frontend).json()["data"][0]["b64_json"]
    result: dict = {}

    def slow() -> None:
        started = time.monotonic()
        result["reply"] = _image(frontend, size="512x512", num_inference_steps=100, n=2)
        result["ended"] = time.monotonic() - started

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(1.5)
    killed = time.monotonic()
    _kill(server, "diffusion")
    thread.join(30)
    assert result["reply"].status_code == 503, result["reply"].text
    assert time.monotonic() - killed < 10 and "Retry-After" in result["reply"].headers
    _wait_back(frontend, lambda: _image(frontend))
    assert _image(frontend).json()["data"][0]["b64_json"] == before  # same seed, same PNG bytes
    assert base64.b64decode(before)[:4] == b"\x89PNG"
    assert _restarts(frontend, "diffusion") == 1


def test_restart_cap_leaves_the_model_down_and_others_serving(stack):
    server, frontend = stack
    assert _image(frontend, SPARE).status_code == 200
    for round_ in range(2):  # two restarts are allowed per window
        _kill(server, SPARE)
        _wait_back(frontend, lambda: _image(frontend, SPARE))
    _kill(server, SPARE)
    deadline = time.monotonic() + 30
    while SPARE not in _ready(frontend).json().get("failed", []):
        assert time.monotonic() < deadline, _ready(frontend).text
        time.sleep(0.5)
    down = _image(frontend, SPARE)
    assert down.status_code == 503 and "is not restarted again" in down.json()["error"]["message"]
    assert f"model '{SPARE}' stopped again" in frontend.log_file.read_text()
    assert _restarts(frontend, SPARE) == 2
    assert _chat(frontend).status_code == 200 and _image(frontend).status_code == 200  # others keep serving
    # an operator's reload brings it back with a fresh budget
    reloaded = httpx.post(f"{frontend.url}/v1/models/{SPARE}/load", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=120)
    assert reloaded.status_code == 200, reloaded.text
    assert _image(frontend, SPARE).status_code == 200 and _ready(frontend).status_code == 200
