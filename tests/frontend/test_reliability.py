"""Issue #12's bad inputs through the real servers: each one gets a clear error (or a correct answer) at once,
frees what it held, and a good request is served right after."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from backends.llm.chat import apply_chat_template
from backends.lora.store.entries import AdapterEntry
from backends.lora.store.registry import LoRARegistry
from tools.clients.llm import generate
from tools.fixtures.adapters import ALL_PROJECTIONS, load_smollm2, make_random_adapters
from tools.session import API_KEY, PINNED_MODEL

CAPITAL = apply_chat_template("What is the capital of France?")
STORY = apply_chat_template("Tell me a long story about a dragon.")
GREEDY = dict(temperature=0.0, max_tokens=12)


def _metric(url: str, name: str, model: str = "llm") -> float:
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _idle(url: str, model: str = "llm", timeout: float = 20) -> None:
    """Every slot and KV row back: no request running or waiting, no LoRA slot held."""
    deadline = time.monotonic() + timeout
    while any(_metric(url, n, model) for n in ("multilora_lora_slots_in_use", "multilora_llm_num_requests_running",
                                                "multilora_llm_num_requests_waiting")):
        assert time.monotonic() < deadline, "a finished request still holds a slot or a KV row"
        time.sleep(0.1)


def _ok(client, prompt: str = CAPITAL, **params):
    out = generate(client, prompt, timeout=60, **{**GREEDY, **params})
    assert out.error is None, out.error
    return out


@pytest.fixture(scope="module")
def swap_adapters(lora_root: Path) -> dict[str, Path]:
    outs = [lora_root / "rel_x", lora_root / "rel_y"]
    make_random_adapters(load_smollm2, outs, [21, 22], std=0.08, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)
    return dict(zip(("x", "y"), outs))


@pytest.fixture(scope="module")
def overflowing_adapter(lora_root: Path) -> Path:
    """Finite weights (so the adapter loads: lora_scale is capped at 100) whose delta overflows fp32 in the first
    layer: the model then produces NaN/inf logits for its row."""
    out = lora_root / "rel_overflow"
    make_random_adapters(load_smollm2, [out], [23], std=1e19, r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_tiny_temperature_is_greedy_and_frees_the_slot(grpc_client, triton_server, stream):
    """Before: 1e-40 overflowed the logits to NaN, the step raised, the request never answered and kept its slot."""
    greedy = _ok(grpc_client, lora_name="uppercase")
    tiny = _ok(grpc_client, lora_name="uppercase", temperature=1e-40, stream=stream)
    assert tiny.text == greedy.text and tiny.finish_reason in ("stop", "length")
    _idle(triton_server.metrics_url)


def test_huge_temperature_samples_and_answers(grpc_client, triton_server):
    out = _ok(grpc_client, temperature=1e30, seed=1, max_tokens=6)
    assert out.num_output_tokens >= 1 and out.finish_reason in ("stop", "length")
    _idle(triton_server.metrics_url)


def test_overflowing_adapter_fails_its_row_only(triton_server, swap_adapters, overflowing_adapter):
    """An adapter of huge weights turns one row's logits into NaN/inf: that request fails (500 class), the request
    sharing its batch gets exactly its solo tokens, and both slots come back."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    solo = _ok(client, STORY, max_tokens=24).text
    results: dict[str, object] = {}

    def base() -> None:
        other = grpcclient.InferenceServerClient(triton_server.grpc_url)
        results["base"] = generate(other, STORY, timeout=60, temperature=0.0, max_tokens=24, stream=True)
        other.close()

    thread = threading.Thread(target=base)
    thread.start()
    time.sleep(0.3)
    broken = generate(client, CAPITAL, timeout=60, temperature=0.0, max_tokens=24,
                      lora_path=str(overflowing_adapter))
    thread.join(60)
    assert broken.error is not None and "non-finite logits" in broken.error.message()
    assert broken.error.message().startswith("internal error: ")
    assert results["base"].error is None and results["base"].text == solo
    _idle(triton_server.metrics_url)
    assert _ok(client, lora_path=str(swap_adapters["x"])).num_output_tokens >= 1
    client.close()


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan])
def test_non_finite_scale_is_refused(grpc_client, scale):
    out = generate(grpc_client, CAPITAL, timeout=30, lora_name="uppercase", lora_scale=scale, **GREEDY)
    assert out.error is not None and "lora_scale must be a finite number >= 0" in out.error.message()
    assert _ok(grpc_client, lora_name="uppercase").text.startswith("THE CAPITAL")


@pytest.mark.parametrize("stop,message", [
    ([f"s{i}" for i in range(1000)], "at most 16 stop strings are allowed, got 1000"),
    (["x" * 10_000], "stop strings may have at most 256 characters each, got 10000"),
])
def test_stop_string_limits(grpc_client, frontend, stop, message):
    out = generate(grpc_client, CAPITAL, timeout=30, stop=stop, **GREEDY)
    assert out.error is not None and message in out.error.message()
    reply = httpx.post(f"{frontend.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "llm", "prompt": "Hi", "max_tokens": 2, "stop": stop}, timeout=60)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
    assert _ok(grpc_client, stop=["Paris"]).text.endswith("capital of France is ")


def test_adapter_held_back_by_pinned_slots_is_refused_at_once(http_client, triton_server, swap_adapters):
    """The only slot holds a pinned adapter: another adapter could never run. Before: it waited forever while the
    engine loop spun at 100% CPU."""
    http_client.load_model(PINNED_MODEL)
    try:
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        started = time.monotonic()
        out = generate(client, CAPITAL, model=PINNED_MODEL, timeout=30, lora_path=str(swap_adapters["x"]), **GREEDY)
        assert time.monotonic() - started < 5
        assert out.error is not None and "all 1 LoRA slots (max_loras) are held by pinned adapters" in \
            out.error.message()
        assert _ok(client, model=PINNED_MODEL, lora_name="uppercase").text.startswith("THE CAPITAL")
        assert _ok(client, model=PINNED_MODEL).num_output_tokens >= 1
        client.close()
    finally:
        http_client.unload_model(PINNED_MODEL)


def test_adapter_files_replaced_while_in_use(grpc_client, triton_server, lora_root, swap_adapters):
    """A request streaming on the old weights finishes normally; the next request by the same path gets the new
    weights (the cache notices the new files by their size/mtime/inode, no registry change needed)."""
    folder = lora_root / "rel_swap"
    shutil.copytree(swap_adapters["x"], folder)
    want_x = _ok(grpc_client, lora_path=str(swap_adapters["x"])).text
    want_y = _ok(grpc_client, lora_path=str(swap_adapters["y"])).text
    assert want_x != want_y and _ok(grpc_client, lora_path=str(folder)).text == want_x
    results = {}

    def long_stream() -> None:
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        results["old"] = generate(client, STORY, timeout=60, temperature=0.0, max_tokens=40, stream=True,
                                  lora_path=str(folder))
        client.close()

    thread = threading.Thread(target=long_stream)
    thread.start()
    time.sleep(1.0)
    new = folder / "adapter_model.safetensors.new"
    shutil.copy(swap_adapters["y"] / "adapter_model.safetensors", new)
    os.replace(new, folder / "adapter_model.safetensors")
    assert _ok(grpc_client, lora_path=str(folder)).text == want_y
    thread.join(60)
    assert results["old"].error is None and results["old"].num_output_tokens == 40
    _idle(triton_server.metrics_url)


def test_registry_change_keeps_other_adapters_cached(grpc_client, triton_server, lora_root, swap_adapters):
    """Before: any registry change evicted every adapter loaded by path."""
    url = triton_server.metrics_url
    _ok(grpc_client, lora_path=str(swap_adapters["y"]))
    loads = _metric(url, "multilora_lora_loads_total")
    registry = LoRARegistry(registry_file=lora_root / "registry.json", allowed_roots=[lora_root])
    registry.add(AdapterEntry("rel-unrelated", str(swap_adapters["x"])))
    registry.remove("rel-unrelated")
    _ok(grpc_client, lora_path=str(swap_adapters["y"]))
    assert _metric(url, "multilora_lora_loads_total") == loads


def test_broken_registry_file_keeps_the_last_good_one(grpc_client, triton_server, frontend, lora_root,
                                                      swap_adapters):
    registry = LoRARegistry(registry_file=lora_root / "registry.json", allowed_roots=[lora_root])
    registry.add(AdapterEntry("rel-kept", str(swap_adapters["x"])))
    want = _ok(grpc_client, lora_name="rel-kept").text
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{frontend.url}/v1/models/rel-kept", headers=headers).status_code == 200
    path = lora_root / "registry.json"
    good = path.read_text()
    try:
        path.write_text(good[: len(good) // 2])  # truncated by hand
        assert _ok(grpc_client, lora_name="rel-kept").text == want
        assert httpx.get(f"{frontend.url}/v1/models/rel-kept", headers=headers).status_code == 200
        assert "keeping the last good registry" in Path(triton_server.log_file).read_text(errors="replace")
        assert "keeping the last good registry" in frontend.log_file.read_text(errors="replace")
    finally:
        registry.remove("rel-kept")  # an atomic write repairs the file
    assert "rel-kept" not in path.read_text()


# -- frontend ----------------------------------------------------------------------------------------------------
def _headers() -> dict:
    return {"Authorization": f"Bearer {API_KEY}"}


def _lora_info(frontend) -> str:
    text = httpx.get(f"{frontend.url}/metrics", headers=_headers(), timeout=30).text
    return next(line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{"))


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_triton_request(frontend, triton_server, stream):
    body = {"model": "uppercase", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 2000, "temperature": 0, "stream": stream}
    if stream:
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{frontend.url}/v1/chat/completions", json=body, headers=_headers()) as r:
                for line in r.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break  # a token arrived: the request is running; leaving closes the connection
    else:  # no response headers come before the whole answer: send by hand, hang up while it runs
        payload = json.dumps(body).encode()
        with socket.create_connection(("127.0.0.1", frontend.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                         + payload)
            deadline = time.monotonic() + 30
            while not _metric(triton_server.metrics_url, "multilora_llm_num_requests_running"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
    # the connection is closed: generation must stop well before 2000 tokens, and nothing stays tracked
    _idle(triton_server.metrics_url, timeout=10)
    assert 'running_lora_adapters=""' in _lora_info(frontend) and 'waiting_lora_adapters=""' in _lora_info(frontend)
    finished = httpx.post(f"{frontend.url}/v1/completions", headers=_headers(), timeout=60,
                          json={"model": "llm", "prompt": "Hi", "max_tokens": 2})
    assert finished.status_code == 200


def test_chunked_body_over_the_limit_is_refused(frontend):
    def chunks():
        piece = b"x" * (1 << 20)
        yield b'{"model": "llm", "prompt": "'
        for _ in range(50):
            yield piece
        yield b'"}'

    reply = httpx.post(f"{frontend.url}/v1/completions", headers={**_headers(), "Content-Type": "application/json"},
                       content=chunks(), timeout=60)
    assert reply.status_code == 413, reply.text
    assert "exceeds the limit of 65536 bytes" in reply.json()["error"]["message"]
    assert httpx.post(f"{frontend.url}/v1/completions", headers=_headers(), timeout=60,
                      json={"model": "llm", "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_internal_error_is_500_in_openai_shape(frontend, overflowing_adapter):
    reply = httpx.post(f"{frontend.url}/v1/chat/completions", headers=_headers(), timeout=60, json={
        "model": "llm", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
        "lora": {"name": "boom", "path": str(overflowing_adapter)}})
    assert reply.status_code == 500, reply.text
    error = reply.json()["error"]
    assert error["type"] == "internal_server_error" and "non-finite logits" in error["message"]
    assert "Traceback" not in reply.text


def test_metrics_label_routes_by_template(frontend):
    for name in ("made-up-1", "made-up-2"):
        httpx.get(f"{frontend.url}/v1/models/{name}", headers=_headers())
    httpx.get(f"{frontend.url}/no/such/route/{time.time()}")
    text = httpx.get(f"{frontend.url}/metrics", headers=_headers()).text
    assert 'route="/v1/models/{model_id:path}",status="404"' in text
    assert "made-up" not in text and "/no/such/route" not in text and 'route="unmatched"' in text


def test_model_control_needs_an_admin_key(triton_server, tmp_path):
    from tools.launchers.frontend import FrontendProcess

    proc = FrontendProcess(triton_server.grpc_url, None, tmp_path / "fe.log").start()  # no keys at all
    try:
        refused = httpx.post(f"{proc.url}/v1/models/llm/unload", timeout=30)
        assert refused.status_code == 403 and "--admin-key" in refused.json()["error"]["message"]
        assert httpx.post(f"{proc.url}/v1/models/llm/load", timeout=30).status_code == 403
    finally:
        proc.stop()
    assert httpx.get(f"http://{triton_server.http_url}/v2/models/llm/ready").status_code == 200


def test_a_model_error_does_not_cancel_other_streams(triton_server):
    """Before: any 503 (here: a model that does not exist) closed the shared channel, cancelling every stream."""
    import asyncio

    from openai_frontend.engine.gateway import TritonGateway
    from openai_frontend.errors import OpenAIError

    async def scenario():
        gateway = TritonGateway(triton_server.grpc_url)

        async def long():
            chunks = [c async for c in gateway.generate("llm", {"text_input": STORY, "max_tokens": 30,
                                                                "temperature": 0.0, "stream": True}, {})]
            return chunks[-1]

        task = asyncio.create_task(long())
        await asyncio.sleep(1.0)
        with pytest.raises(OpenAIError) as err:
            async for _ in gateway.generate("no_such_model", {"text_input": "Hi"}, {}):
                pass
        assert err.value.status == 503
        assert await gateway.ready()
        last = await task
        await gateway.close()
        return last

    last = asyncio.run(scenario())
    assert last.finish_reason == "length" and last.num_output_tokens == 30
