"""The OpenAI-compatible frontend as a real process over the session's tritonserver, driven by the official `openai`
SDK (sync and async, streaming and not) and httpx for the non-OpenAI routes."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
from PIL import Image

from backends.settings import REPO_ROOT, adapters_dir, cache_dir
from tools.fixtures.pipelines import diffusion_adapters_dir
from tools.launchers.frontend import FrontendProcess
from tools.launchers.triton import TritonServer, free_port
from tools.session import ADMIN_KEY, API_KEY, SD15_MODEL, TIGHT_MODEL

DEMO = adapters_dir() / "demo"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(max_tokens=16, temperature=0)
_LORA_UPPER = {"name": "uppercase", "path": str(DEMO / "uppercase")}
_LORA_SIG = {"name": "signature", "path": str(DEMO / "signature")}


@pytest.fixture
def client(frontend):
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _http(frontend, method: str, path: str, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{frontend.url}{path}", headers=headers, timeout=120, **kwargs)


def _chat(client, model="llm", **kwargs) -> str:
    return client.chat.completions.create(model=model, messages=CAPITAL, **{**GREEDY, **kwargs}) \
        .choices[0].message.content


def test_chat_answer_contains_paris_with_usage(client):
    reply = client.chat.completions.create(model="llm", messages=CAPITAL, **GREEDY)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chunks_concatenate_to_the_non_streamed_text(client):
    whole = _chat(client, max_tokens=24)
    chunks = list(client.chat.completions.create(model="llm", messages=CAPITAL, stream=True,
                                                 stream_options={"include_usage": True}, max_tokens=24,
                                                 temperature=0))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_async_client_completions_plain_and_streaming(frontend):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0)
        plain = await aclient.completions.create(model="llm", prompt="The capital of France is", max_tokens=6,
                                                 temperature=0)
        stream = await aclient.completions.create(model="llm", prompt="The capital of France is", max_tokens=6,
                                                  temperature=0, stream=True)
        parts = [c.choices[0].text async for c in stream]
        both = await asyncio.gather(*(aclient.chat.completions.create(model=m, messages=CAPITAL, **GREEDY)
                                      for m in ("llm", "uppercase")))
        await aclient.close()
        return plain, parts, both

    plain, parts, (base, upper) = asyncio.run(run())
    assert plain.choices[0].text == "".join(parts) and plain.usage.completion_tokens == 6
    assert "PARIS" in upper.choices[0].message.content and "Paris" in base.choices[0].message.content


def test_models_list_lineage(client, frontend):
    cards = {m.id: m for m in client.models.list().data}
    assert cards["llm"].parent is None and cards["diffusion"].parent is None
    assert cards["uppercase"].parent == "llm" and cards["uppercase"].root == str(DEMO / "uppercase")
    assert cards["tiny-sd3-a"].parent == "diffusion"
    assert client.models.retrieve("signature").root == str(DEMO / "signature")
    assert cards["diffusion"].root == str(cache_dir() / "models" / "tiny-random-sd3")  # its folder
    with pytest.raises(openai.NotFoundError, match="The model 'nope' does not exist."):
        client.models.retrieve("nope")


def test_adapter_load_chat_restart_unload(client, frontend, lora_root):
    path = lora_root / "fe_signature"
    shutil.copytree(DEMO / "signature", path)
    base = _chat(client)
    loaded = _http(frontend, "POST", "/v1/load_lora_adapter", ADMIN_KEY,
                   json={"lora_name": "fe-sig", "lora_path": str(path)})
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'fe-sig' added successfully."
    card = client.models.retrieve("fe-sig")
    assert card.parent == "llm" and card.root == str(path)
    answer = _chat(client, "fe-sig", max_tokens=40)
    assert answer != base and "signature" in answer
    again = _http(frontend, "POST", "/v1/load_lora_adapter", ADMIN_KEY,
                  json={"lora_name": "fe-sig", "lora_path": str(path)})
    assert again.status_code == 400
    assert again.json()["error"]["message"] == "The lora adapter 'fe-sig' has already been loaded."

    frontend.restart()  # the registry file persists: the adapter survives
    assert client.models.retrieve("fe-sig").parent == "llm"
    assert _chat(client, "fe-sig", max_tokens=40) == answer

    gone = _http(frontend, "POST", "/v1/unload_lora_adapter", ADMIN_KEY, json={"lora_name": "fe-sig"})
    assert gone.status_code == 200 and gone.text == "Success: LoRA adapter 'fe-sig' removed successfully."
    with pytest.raises(openai.NotFoundError, match="The model 'fe-sig' does not exist."):
        _chat(client, "fe-sig")
    twice = _http(frontend, "POST", "/v1/unload_lora_adapter", ADMIN_KEY, json={"lora_name": "fe-sig"})
    assert twice.status_code == 404
    assert twice.json()["error"]["message"] == "The lora adapter 'fe-sig' cannot be found."


def test_lora_object_in_the_body_and_its_scale(client):
    lora = {"name": "upper-body", "path": str(DEMO / "uppercase")}
    assert "PARIS" in _chat(client, extra_body={"lora": lora})
    aliases = {"lora_name": "upper-body", "local_path": str(DEMO / "uppercase"), "lora_scale": 0.0}
    assert _chat(client, extra_body={"lora": aliases}) == _chat(client)


def _png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw))


def test_images_are_pngs_of_the_requested_size_and_adapters_change_them(client):
    extra = {"num_inference_steps": 2, "seed": 5}
    result = client.images.generate(model="diffusion", prompt="a red cat", size="48x32", n=2,
                                    response_format="b64_json", extra_body=extra)
    assert len(result.data) == 2 and all(_png(d.b64_json).size == (48, 32) for d in result.data)
    base = client.images.generate(model="diffusion", prompt="a red cat", size="64x64", extra_body=extra)
    styled = client.images.generate(model="tiny-sd3-a", prompt="a red cat", size="64x64", extra_body=extra)
    zero = client.images.generate(model="diffusion", prompt="a red cat", size="64x64", extra_body={
        **extra, "lora": {"name": "a", "path": str(diffusion_adapters_dir() / "tiny-sd3-a"), "scale": 0.0}})
    assert styled.data[0].b64_json != base.data[0].b64_json
    assert zero.data[0].b64_json == base.data[0].b64_json


BAD = {
    "unknown model": ("/v1/chat/completions", {"model": "nope", "messages": CAPITAL}, 404,
                      "The model 'nope' does not exist."),
    "missing messages": ("/v1/chat/completions", {"model": "llm"}, 400, "messages: Field required"),
    "huge lora_scale": ("/v1/chat/completions", {"model": "uppercase", "messages": CAPITAL, "lora_scale": 1.9e24},
                        400, "lora_scale must be at most 100"),  # was a 500: NaN logits (found by test_openapi)
    "n above the limit": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "n": 17}, 400,
                          "n must be <= 16, got 17"),
    "n > 1 with stream": ("/v1/completions", {"model": "llm", "prompt": "x", "n": 2, "stream": True}, 400,
                          "n > 1 is supported without stream"),
    "top_logprobs above 20": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "logprobs": True,
                                                       "top_logprobs": 21}, 400, "top_logprobs"),
    "top_logprobs without logprobs": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL,
                                                               "top_logprobs": 2}, 400, "top_logprobs needs logprobs"),
    "logprobs on an image model": ("/v1/chat/completions", {"model": "diffusion", "messages": CAPITAL,
                                                            "logprobs": True}, 400, "generates images and has no logprobs"),
    "stream on an image model": ("/v1/chat/completions", {"model": "diffusion", "messages": CAPITAL,
                                                          "stream": True}, 400, "send stream: false"),
    "bad image option in chat": ("/v1/chat/completions", {"model": "diffusion", "messages": CAPITAL,
                                                          "num_outputs_per_prompt": 0}, 400, "num_outputs_per_prompt"),
    "image model for text completions": ("/v1/completions", {"model": "diffusion", "prompt": "x"}, 400,
                                         "use /v1/images/generations or /v1/chat/completions"),
    "separator form with the separator off": ("/v1/chat/completions", {"model": "llm/uppercase",
                                                                       "messages": CAPITAL}, 404,
                                              "The model 'llm/uppercase' does not exist."),
    "temperature out of range": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "temperature": 5},
                                 400, "temperature"),
    "max_tokens above the limit": ("/v1/completions", {"model": "llm", "prompt": "x", "max_tokens": 100000}, 400,
                                   "max_tokens must be <= 4096"),
    "text model for images": ("/v1/images/generations", {"model": "llm", "prompt": "x"}, 400,
                              "use /v1/chat/completions"),
    "bad size": ("/v1/images/generations", {"model": "diffusion", "prompt": "x", "size": "big"}, 400,
                 "size must look like"),
    "size above the limit": ("/v1/images/generations", {"model": "diffusion", "prompt": "x", "size": "2048x2048"},
                             400, "exceeds 1024"),
    "too many images": ("/v1/images/generations", {"model": "diffusion", "prompt": "x", "n": 3}, 400,
                        "n must be <= 2"),
    "size the pipeline refuses": ("/v1/images/generations", {"model": "diffusion", "prompt": "x", "size": "70x70",
                                                             "num_inference_steps": 1}, 400, "multiple of 16"),
    "lora path outside the roots": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL,
                                                             "lora": {"name": "x", "path": "/etc"}}, 400,
                                    "outside the allowed adapter roots"),
    "lora object without path": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL,
                                                          "lora": {"name": "x"}}, 400,
                                 "lora.object.path: Field required"),
    "adapter unknown to the backend": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL,
                                                                "lora": {"name": "x", "path": "{missing}"}}, 404,
                                       "not found"),
    # LoRA stacks (`lora` as a list): the backend's refusals come through with its words.
    "lora stack above max_loras_per_request": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "lora": [
        _LORA_UPPER, _LORA_SIG, *({"name": f"u{i}", "path": str(DEMO / "uppercase")} for i in range(3))]}, 400,
        "5 LoRA adapters in one request, max_loras_per_request is 4"),
    "lora stack above the frontend's bound": ("/v1/completions", {"model": "llm", "prompt": "x",
                                                                  "lora": [_LORA_UPPER] * 17}, 400,
                                              "lora.list: List should have at most 16 items"),
    "same adapter twice in a stack": ("/v1/chat/completions", {"model": "uppercase", "messages": CAPITAL,
                                                               "lora": [_LORA_UPPER]}, 400, "appears twice"),
    "unknown adapter in a stack": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "lora": [
        _LORA_UPPER, {"name": "ghost", "path": str(DEMO / "ghost")}]}, 404,
        "/demo/ghost: no such folder"),
    "image adapter in a text stack": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "lora": [
        _LORA_SIG, {"name": "a", "path": str(diffusion_adapters_dir() / "tiny-sd3-a")}]}, 400,
        "/tiny-sd3-a: target_modules"),
    "lora stack entry without path": ("/v1/images/generations", {"model": "diffusion", "prompt": "x",
                                                                 "lora": [{"name": "x"}]}, 400,
                                      "lora.list.0.path: Field required"),
    "lora stack entry outside the roots": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "lora": [
        _LORA_SIG, {"name": "x", "path": "/etc"}]}, 400, "outside the allowed adapter roots"),
    # Found by schemathesis: integers beyond the Triton input's type overflowed into a 500.
    "top_k beyond int32": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "top_k": 2 ** 65}, 400,
                           "'top_k' must be between -2147483648 and 2147483647, got 36893488147419103232"),
    "seed beyond int64": ("/v1/completions", {"model": "llm", "prompt": "x", "seed": 2 ** 64}, 400,
                          "'seed' must be between -9223372036854775808 and 9223372036854775807"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_request_has_openai_error_shape_and_status(case, frontend, lora_root):
    path, body, status, message = BAD[case]
    if isinstance(body.get("lora"), dict) and body["lora"].get("path") == "{missing}":
        body = {**body, "lora": {**body["lora"], "path": str(lora_root / "missing_adapter")}}
    response = _http(frontend, "POST", path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and message in error["message"], error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert _http(frontend, "POST", "/v1/completions", json={"model": "llm", "prompt": "Hi",
                                                           "max_tokens": 1}).status_code == 200


def test_api_key_admin_key_and_body_limit(frontend, lora_root):
    assert _http(frontend, "GET", "/v1/models", key=None).status_code == 401
    wrong = _http(frontend, "GET", "/v1/models", key="wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert _http(frontend, "GET", "/health", key=None).status_code == 200  # probes need no key
    body = {"lora_name": "x", "lora_path": str(DEMO / "uppercase")}
    assert _http(frontend, "POST", "/v1/load_lora_adapter", key=API_KEY, json=body).status_code == 401
    big = _http(frontend, "POST", "/v1/completions", json={"model": "llm", "prompt": "x" * 70000})
    assert big.status_code == 413 and "exceeds the limit" in big.json()["error"]["message"]


def test_load_adapter_errors(frontend, lora_root):
    def load(**body):
        return _http(frontend, "POST", "/v1/load_lora_adapter", ADMIN_KEY, json=body)

    missing = load(lora_name="x")
    assert missing.status_code == 400
    assert missing.json()["error"]["message"] == "Both 'lora_name' and 'lora_path' must be provided."
    assert load(lora_name="x", lora_path=str(lora_root / "nowhere")).status_code == 404
    assert load(lora_name="x", lora_path="/etc").status_code == 400
    corrupt = lora_root / "fe_corrupt"
    shutil.copytree(DEMO / "uppercase", corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused = load(lora_name="fe-corrupt", lora_path=str(corrupt))
    assert refused.status_code == 400 and "not valid safetensors" in refused.json()["error"]["message"]
    assert _http(frontend, "GET", "/v1/models/fe-corrupt").status_code == 404  # refused at load, not registered
    image_adapter = load(lora_name="fe-style", lora_path=str(diffusion_adapters_dir() / "tiny-sd3-b"))
    assert image_adapter.status_code == 200, image_adapter.text
    assert _http(frontend, "GET", "/v1/models/fe-style").json()["parent"] == "diffusion"
    assert _http(frontend, "POST", "/v1/unload_lora_adapter", ADMIN_KEY, json={"lora_name": "fe-style"}) \
        .status_code == 200


def test_lora_modules_flag_and_runtime_updating_off_by_default(triton_server, tmp_path):
    """--lora-modules registers adapters at start (vLLM's flag); without --allow-runtime-lora-updating the
    load/unload routes answer 404 like vLLM's."""
    proc = FrontendProcess(triton_server.grpc_url, None, tmp_path / "fe.log",
                           "--lora-registry-file", str(tmp_path / "registry.json"),
                           "--lora-modules", f"fe-static={DEMO / 'uppercase'}").start()
    try:
        card = httpx.get(f"{proc.url}/v1/models/fe-static").json()
        assert card["parent"] == "llm" and card["root"] == str(DEMO / "uppercase")
        body = {"lora_name": "x", "lora_path": str(DEMO / "uppercase")}
        response = httpx.post(f"{proc.url}/v1/load_lora_adapter", json=body)
        assert response.status_code == 404 and "runtime LoRA updating is disabled" in response.text
    finally:
        proc.stop()


def test_base_model_lifecycle_through_model_control(frontend):
    assert _http(frontend, "GET", f"/v1/models/{SD15_MODEL}").status_code == 404
    loaded = _http(frontend, "POST", f"/v1/models/{SD15_MODEL}/load", ADMIN_KEY)
    assert loaded.status_code == 200 and loaded.json()["state"] == "READY"
    assert _http(frontend, "GET", f"/v1/models/{SD15_MODEL}").json()["kind"] == "diffusion"
    assert _http(frontend, "POST", f"/v1/models/{SD15_MODEL}/unload", ADMIN_KEY).status_code == 200
    assert _http(frontend, "GET", f"/v1/models/{SD15_MODEL}").status_code == 404
    assert _http(frontend, "POST", "/v1/models/no_such_model/load", ADMIN_KEY).status_code == 404


def test_model_unloads_promptly_after_a_streamed_completion(frontend, triton_server):
    """Regression: cancelling an already finished gRPC stream kept the model referenced and its unload hung."""
    done = f"successfully unloaded '{TIGHT_MODEL}'"
    unloads = triton_server.log_file.read_text().count(done)
    assert _http(frontend, "POST", f"/v1/models/{TIGHT_MODEL}/load", ADMIN_KEY).status_code == 200
    with httpx.stream("POST", f"{frontend.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": TIGHT_MODEL, "prompt": "Paris is", "max_tokens": 8, "stream": True},
                      timeout=60) as response:
        assert response.status_code == 200 and list(response.iter_lines())[-2] == "data: [DONE]"
    assert _http(frontend, "POST", f"/v1/models/{TIGHT_MODEL}/unload", ADMIN_KEY).status_code == 200
    deadline = time.monotonic() + 15
    while triton_server.log_file.read_text().count(done) == unloads:
        assert time.monotonic() < deadline, f"{TIGHT_MODEL} not unloaded 15 s after the unload call"
        time.sleep(0.5)


def test_metrics_include_frontend_backend_and_gateway_names(client, frontend):
    _chat(client, "uppercase")
    text = _http(frontend, "GET", "/metrics").text
    for name in ("multilora_frontend_requests_total", "multilora_frontend_request_duration_seconds_bucket",
                 "multilora_frontend_completion_tokens_total", "vllm:num_requests_waiting",
                 "vllm:gpu_cache_usage_perc", 'vllm:lora_requests_info{max_lora="16"',
                 "multilora_lora_cache_hits_total", "multilora_llm_kv_cache_usage_ratio", "nv_inference_count"):
        assert name in text, name
    assert _http(frontend, "GET", "/metrics", key=None).status_code == 401


def _examples_env(frontend) -> dict:
    return {**os.environ, "BASE_URL": frontend.url, "API_KEY": API_KEY, "ADMIN_KEY": ADMIN_KEY,
            "PYTHONPATH": str(REPO_ROOT)}


def test_example_scripts_run(frontend, tmp_path):
    env = _examples_env(frontend)
    run = lambda *cmd: subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # noqa
    chat = run("bash", str(REPO_ROOT / "examples" / "curl_chat_lora.sh"))
    assert chat.returncode == 0, chat.stdout + chat.stderr
    assert "THE CAPITAL OF FRANCE" in chat.stdout and "added successfully" in chat.stdout
    images = run("bash", str(REPO_ROOT / "examples" / "curl_images_lora.sh"))
    assert images.returncode == 0 and Image.open(tmp_path / "lora_image.png").size == (64, 64), images.stderr
    sdk = run(sys.executable, str(REPO_ROOT / "examples" / "openai_chat_client.py"), "--stream")
    assert sdk.returncode == 0 and "PARIS" in sdk.stdout, sdk.stderr
    sdk_images = run(sys.executable, str(REPO_ROOT / "examples" / "openai_image_client.py"), "--model",
                     "tiny-sd3-b", "--n", "2", "--out", str(tmp_path / "img.png"))
    assert sdk_images.returncode == 0, sdk_images.stderr
    assert Image.open(tmp_path / "img_1.png").size == (64, 64)


def test_triton_down_gives_503_then_recovers(tmp_path):
    """A second tritonserver (llm only) behind its own frontend: kill it -> 503 in OpenAI shape -> restart -> 200."""
    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server = TritonServer(models=["llm"], log_file=tmp_path / "triton.log", **ports).start(timeout=300)
    proc = FrontendProcess(server.grpc_url, server.metrics_url, tmp_path / "fe.log").start()
    body = {"model": "llm", "prompt": "Hi", "max_tokens": 2}
    try:
        assert httpx.post(f"{proc.url}/v1/completions", json=body, timeout=60).status_code == 200
        server.stop()
        down = httpx.post(f"{proc.url}/v1/completions", json=body, timeout=60)
        assert down.status_code == 503, down.text
        assert down.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{proc.url}/health/ready").status_code == 503
        assert httpx.get(f"{proc.url}/health").status_code == 200
        server.start(timeout=300)
        ready = httpx.get(f"{proc.url}/health/ready")
        assert ready.status_code == 200, ready.text
        assert httpx.post(f"{proc.url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        proc.stop()
        server.stop()
