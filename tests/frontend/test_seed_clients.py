"""The example clients of the systems whose APIs we match, run unchanged (our own copies in clients/) against a
frontend without keys, as their users run them: vLLM-Omni's diffusion LoRA example (chat-to-image with a literal
`extra_body` and no `model`, its curl inference and scale-sweep scripts and its verification), vLLM's documented
LoRA curl calls, lmdeploy's `model=adapter` SDK call. Also: `model` left out, `extra_body`, height/width and the
refusal of every OpenAI/vLLM field the server does not honour."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import typing
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from backends.settings import REPO_ROOT, adapters_dir
from openai_frontend import field_lists, field_policy
from openai_frontend.schemas import ChatCompletionRequest, CompletionRequest, ImageGenerationRequest
from tools.fixtures.pipelines import diffusion_adapters_dir
from tools.launchers.frontend import FrontendProcess
from tools.session import API_KEY, SD15_MODEL

CLIENTS = Path(__file__).parent / "clients"
DEMO = adapters_dir() / "demo"
STYLE = diffusion_adapters_dir() / "tiny-sd3-a"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
FAST = {"SIZE": "32", "STEPS": "2"}


@pytest.fixture(scope="module")
def open_frontend(triton_server, lora_root, tmp_path_factory):
    """A frontend as the public clients expect one: no keys, runtime LoRA updating on, lmdeploy's adapter `mylora`
    registered at start; the session's models, of which the diffusion ones must be `diffusion` alone (the clients
    send no model)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton_server.http_url)
    ready = {m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY"}
    client.close()
    assert "diffusion" in ready and SD15_MODEL not in ready, f"another image model is loaded: {ready}"
    proc = FrontendProcess(
        triton_server.grpc_url, triton_server.metrics_url, tmp_path_factory.mktemp("open_frontend") / "frontend.log",
        "--allow-runtime-lora-updating", "--no-supervise", "--lora-registry-file", str(lora_root / "registry.json"),
        "--allowed-lora-root", str(lora_root), "--max-images", "2",
        "--lora-modules", f"mylora={DEMO / 'uppercase'}").start()
    yield proc
    httpx.post(f"{proc.url}/v1/unload_lora_adapter", json={"lora_name": "mylora"}, timeout=30)
    proc.stop()


def _run(args: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _pixels(png: bytes):
    import numpy as np

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _images(frontend, **body) -> list[bytes]:
    response = httpx.post(f"{frontend.url}/v1/images/generations", json=body, timeout=300)
    assert response.status_code == 200, response.text
    return [base64.b64decode(d["b64_json"]) for d in response.json()["data"]]


# -- vLLM-Omni's diffusion LoRA example -----------------------------------------------------------------------------

def test_omni_chat_client_without_model_applies_extra_body_and_its_lora(open_frontend, tmp_path):
    common = ["--server", open_frontend.url, "--prompt", "a red cat", "--height", "32", "--width", "48",
              "--steps", "2", "--seed", "7"]
    _run([sys.executable, str(CLIENTS / "omni_chat_client.py"), *common, "--output", str(tmp_path / "base.png")])
    _run([sys.executable, str(CLIENTS / "omni_chat_client.py"), *common, "--lora-path", str(STYLE), "--lora-name",
          "style", "--lora-scale", "1.0", "--lora-int-id", "9123", "--output", str(tmp_path / "lora.png")])
    base, styled = (tmp_path / "base.png").read_bytes(), (tmp_path / "lora.png").read_bytes()
    assert Image.open(io.BytesIO(base)).size == (48, 32)  # height and width were honoured
    # The same prompt, seed and options through /v1/images/generations: the extra_body's seed and lora took effect.
    want_base = _images(open_frontend, prompt="a red cat", size="48x32", num_inference_steps=2, seed=7)[0]
    want_lora = _images(open_frontend, prompt="a red cat", width=48, height=32, num_inference_steps=2, seed=7,
                        lora={"name": "style", "path": str(STYLE), "scale": 1.0, "int_id": 9123})[0]
    assert base == want_base and styled == want_lora and styled != base


def test_omni_curl_inference_script(open_frontend, tmp_path):
    out = tmp_path / "curl.png"
    _run(["bash", str(CLIENTS / "omni_curl_inference.sh")], env={
        "SERVER": open_frontend.url, "LORA_PATH": str(STYLE), "PROMPT": "a red cat", "LORA_NAME": "style",
        "LORA_SCALE": "0.5", "LORA_INT_ID": "9077", "OUTPUT": str(out), **FAST})
    assert out.read_bytes() == _images(open_frontend, prompt="a red cat", size="32x32", num_inference_steps=2,
                                       seed=42, lora={"name": "style", "path": str(STYLE), "scale": 0.5})[0]


def test_omni_scale_sweep_baseline_equals_scale_0_and_scale_1_differs(open_frontend, tmp_path):
    env = {"SERVER": open_frontend.url, "LORA_PATH": str(STYLE), "PROMPT": "MIA_char, standing in a new york city",
           "OUT_DIR": str(tmp_path / "curl"), **FAST}
    _run(["bash", str(CLIENTS / "omni_curl_verify_images.sh")], env=env)
    curl = {p.stem: p.read_bytes() for p in (tmp_path / "curl").glob("*.png")}
    assert set(curl) == {"baseline", "lora_scale_0", "lora_scale_1"}
    assert curl["baseline"] == curl["lora_scale_0"] != curl["lora_scale_1"]
    report = _run([sys.executable, str(CLIENTS / "omni_verify_lora.py"), "--server", open_frontend.url,
                   "--lora-path", str(STYLE), "--prompt", env["PROMPT"], "--out-dir", str(tmp_path / "py"),
                   "--size", "32", "--steps", "2"])
    stats = json.loads(report.splitlines()[0])
    assert stats["baseline_equals_scale0_bytes"] and stats["baseline_vs_scale0_max_abs"] == 0
    assert stats["scale0_vs_scale1_mean_abs"] > 1.0
    assert (tmp_path / "py" / "lora_scale_1.png").read_bytes() == curl["lora_scale_1"]  # deterministic


# -- vLLM's and lmdeploy's documented LoRA calls ---------------------------------------------------------------------

def test_vllm_documented_lora_curl_calls(open_frontend):
    lines = _run(["bash", str(CLIENTS / "vllm_lora_curl.sh")],
                 env={"SERVER": open_frontend.url, "LORA_PATH": str(DEMO / "uppercase")}).splitlines()
    assert lines[0] == "Success: LoRA adapter 'sql_adapter' added successfully."
    models = {m["id"]: m for m in json.loads(lines[1])["data"]}
    assert models["sql_adapter"]["parent"] == "llm" and models["sql_adapter"]["root"] == str(DEMO / "uppercase")
    completion = json.loads(lines[2])
    assert completion["model"] == "sql_adapter" and completion["usage"]["completion_tokens"] <= 7
    by_path = {"name": "up", "path": str(DEMO / "uppercase")}
    same = _post(open_frontend, "/v1/completions", {"model": "llm", "prompt": "San Francisco is a", "max_tokens": 7,
                                                    "temperature": 0, "lora": by_path})
    assert completion["choices"][0]["text"] == same.json()["choices"][0]["text"]  # the adapter answered
    assert lines[3] == "Success: LoRA adapter 'sql_adapter' removed successfully."
    gone = _post(open_frontend, "/v1/completions", {"model": "sql_adapter", "prompt": "x", "max_tokens": 1})
    assert gone.status_code == 404


def test_lmdeploy_model_is_the_adapter_sdk_call(open_frontend):
    response = json.loads(_run([sys.executable, str(CLIENTS / "lmdeploy_client.py"), open_frontend.url]))
    assert response["model"] == "mylora" and response["object"] == "chat.completion"
    choice = response["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["message"]["role"] == "assistant"
    letters = [c for c in choice["message"]["content"] if c.isalpha()]
    assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.8  # sampled at 0.8: mostly capitals
    assert response["usage"]["completion_tokens"] > 0


# -- `model` optional ------------------------------------------------------------------------------------------------

def _post(frontend, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{frontend.url}{path}", json=body, timeout=300)


def test_model_left_out_means_the_one_served_model_of_the_implied_kind(open_frontend):
    chat = _post(open_frontend, "/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 8, "temperature": 0})
    assert chat.status_code == 200, chat.text
    named = _post(open_frontend, "/v1/chat/completions", {"model": "llm", "messages": CAPITAL, "max_tokens": 8,
                                                          "temperature": 0})
    assert chat.json()["model"] == "llm"
    assert chat.json()["choices"][0]["message"]["content"] == named.json()["choices"][0]["message"]["content"]
    completion = _post(open_frontend, "/v1/completions", {"prompt": "Paris is", "max_tokens": 3})
    assert completion.status_code == 200 and completion.json()["model"] == "llm"
    images = _post(open_frontend, "/v1/images/generations", {"prompt": "a cat", "size": "32x32",
                                                             "num_inference_steps": 1})
    assert images.status_code == 200 and images.json()["model"] == "diffusion"
    # An adapter of the implied base still applies: `lora` without `model`.
    lora = {"name": "uppercase", "path": str(DEMO / "uppercase")}
    upper = _post(open_frontend, "/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 8, "temperature": 0,
                                                          "lora": lora})
    assert upper.status_code == 200 and upper.json()["choices"][0]["message"]["content"].isupper()


def test_model_left_out_with_two_image_models_names_both(open_frontend, http_client):
    def until(status: int) -> httpx.Response:
        deadline = time.monotonic() + 30
        while True:  # the frontend re-reads Triton's models every 2 s
            response = _post(open_frontend, "/v1/images/generations", {"prompt": "a cat", "size": "32x32",
                                                                       "num_inference_steps": 1})
            if response.status_code == status or time.monotonic() > deadline:
                return response
            time.sleep(0.5)

    http_client.load_model(SD15_MODEL)
    try:
        response = until(400)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "model" and error["message"] == (
            f"model is required: 2 image models are served (diffusion, {SD15_MODEL}); name one")
        chat = _post(open_frontend, "/v1/chat/completions", {"messages": CAPITAL, "extra_body": {"height": 32}})
        assert chat.status_code == 400 and "2 image models are served" in chat.json()["error"]["message"]
        # A text request without model is unaffected (one text model), and naming the model works.
        assert _post(open_frontend, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}).status_code == 200
        assert _post(open_frontend, "/v1/images/generations", {"model": SD15_MODEL, "prompt": "a cat",
                                                               "size": "32x32", "num_inference_steps": 1}
                     ).status_code == 200
    finally:
        http_client.unload_model(SD15_MODEL)
        assert until(200).status_code == 200  # one image model again: the next tests' requests without model


# -- image options ---------------------------------------------------------------------------------------------------

def test_height_width_true_cfg_and_num_outputs_per_prompt(open_frontend):
    common = {"prompt": "a red cat", "num_inference_steps": 2, "seed": 3}
    by_size = _images(open_frontend, size="48x32", **common)
    by_sides = _images(open_frontend, width=48, height=32, **common)
    both = _images(open_frontend, size="48x32", width=48, height=32, **common)
    assert by_size == by_sides == both and Image.open(io.BytesIO(by_size[0])).size == (48, 32)
    # On SD3 (classic classifier-free guidance) true_cfg_scale is that guidance's scale.
    guided = _images(open_frontend, size="32x32", guidance_scale=4.0, **common)
    true_cfg = _images(open_frontend, size="32x32", true_cfg_scale=4.0, **common)
    assert true_cfg == guided != _images(open_frontend, size="32x32", guidance_scale=1.0, **common)
    two = _images(open_frontend, size="32x32", num_outputs_per_prompt=2, **common)
    assert two == _images(open_frontend, size="32x32", n=2, **common) and len(two) == 2


BAD = {
    "extra_body not an object": ("/v1/chat/completions", {"messages": CAPITAL, "extra_body": [1, 2]}, "extra_body",
                                 "extra_body must be a JSON object of request fields, got list"),
    "extra_body disagreeing with the body": ("/v1/images/generations", {"prompt": "x", "seed": 1,
                                                                        "extra_body": {"seed": 2}},
                                             "extra_body.seed", "extra_body.seed (2) disagrees with seed (1)"),
    "height not a multiple of the factor": ("/v1/images/generations", {"prompt": "x", "height": 40, "width": 32,
                                                                       "num_inference_steps": 1}, None,
                                            "height must be a multiple of 16"),
    "height 0": ("/v1/images/generations", {"prompt": "x", "height": 0}, "height",
                 "height: Input should be greater than 0"),
    "height negative": ("/v1/chat/completions", {"messages": CAPITAL, "extra_body": {"height": -32}}, "height",
                        "height: Input should be greater than 0"),
    "height above the size cap": ("/v1/images/generations", {"prompt": "x", "height": 2048}, "height",
                                  "height 2048 exceeds 1024 pixels per side"),
    "height and size disagreeing": ("/v1/images/generations", {"prompt": "x", "size": "32x32", "height": 48},
                                    "height", "height 48 disagrees with size 32x32"),
    "n and num_outputs_per_prompt disagreeing": ("/v1/images/generations", {"prompt": "x", "n": 1,
                                                                            "num_outputs_per_prompt": 2},
                                                 "num_outputs_per_prompt", "disagrees with n 1"),
    "extra_body.lora without a path": ("/v1/chat/completions", {"messages": CAPITAL, "extra_body": {
        "height": 32, "lora": {"name": "x"}}}, "lora.object.path", "lora.object.path: Field required"),
    "extra_body.lora not an object": ("/v1/chat/completions", {"messages": CAPITAL, "extra_body": {
        "height": 32, "lora": "style"}}, "lora.object", "lora.object: Input should be a valid dictionary"),
    "extra_body.lora scale not a number": ("/v1/images/generations", {"prompt": "x", "extra_body": {
        "lora": {"name": "x", "local_path": str(STYLE), "scale": "high"}}}, "lora.object.scale",
        "lora.object.scale: Input should be a valid number"),
    "image option on a text model": ("/v1/chat/completions", {"model": "llm", "messages": CAPITAL,
                                                              "num_inference_steps": 2}, "num_inference_steps",
                                     "num_inference_steps is an image option; model 'llm' is a text model"),
    "text option on an image model": ("/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 5,
                                                               "extra_body": {"height": 32}}, "max_tokens",
                                      "max_tokens applies to text generation; model 'diffusion' generates images"),
    "true_cfg_scale and guidance_scale disagreeing": ("/v1/images/generations", {
        "prompt": "x", "size": "32x32", "guidance_scale": 2.0, "true_cfg_scale": 4.0, "num_inference_steps": 1}, None,
        "true_cfg_scale 4.0 and guidance_scale 2.0 differ"),
    "negative seed for an image model": ("/v1/chat/completions", {"messages": CAPITAL, "seed": -1,
                                                                  "extra_body": {"height": 32}}, "seed",
                                         "seed must be >= 0 for an image model"),  # was a 500
    "refused OpenAI field": ("/v1/chat/completions", {"messages": CAPITAL, "frequency_penalty": 0.5},
                             "frequency_penalty", "frequency_penalty is not supported: this sampling option is not "
                                                  "implemented; leave it out or send 0"),
    "refused field inside extra_body": ("/v1/completions", {"prompt": "x", "extra_body": {"presence_penalty": 0.5}},
                                        "presence_penalty", "presence_penalty is not supported"),
    "refused images field": ("/v1/images/generations", {"prompt": "x", "quality": "hd"}, "quality",
                             "quality is not supported"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_a_400_naming_the_field(case, open_frontend):
    path, body, param, message = BAD[case]
    response = _post(open_frontend, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error", error
    if param is not None:
        assert error["param"] == param, error
    assert _post(open_frontend, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}).status_code == 200


# -- no silent drops -------------------------------------------------------------------------------------------------

# vLLM 0.32's request fields (vllm.entrypoints.openai.{chat_completion,completion}.protocol), and the older guided
# decoding fields it had: every one must be honoured, accepted without effect, or refused.
VLLM_CHAT = """add_generation_prompt add_special_tokens allowed_token_ids bad_words cache_salt chat_template
chat_template_kwargs continue_final_message documents ec_transfer_params echo frequency_penalty ignore_eos
include_reasoning include_stop_str_in_output kv_transfer_params length_penalty logit_bias logprob_token_ids logprobs
max_completion_tokens max_tokens media_io_kwargs messages min_p min_tokens mm_payload mm_processor_kwargs model n
parallel_tool_calls presence_penalty priority prompt_logprobs reasoning_effort repetition_detection repetition_penalty
request_id response_format return_mm_kwargs return_prompt_text return_token_ids return_token_offsets
return_tokens_as_token_ids routed_experts_prompt_start seed session_id skip_special_tokens
spaces_between_special_tokens stop stop_token_ids stream stream_interval stream_options structured_outputs
temperature thinking_token_budget tool_choice tools top_k top_logprobs top_p truncate_prompt_tokens truncation_side
use_beam_search user vllm_xargs watermarking guided_json guided_regex guided_choice guided_grammar""".split()
VLLM_COMPLETIONS = """add_special_tokens allowed_token_ids bad_words cache_salt ec_transfer_params echo
frequency_penalty ignore_eos include_stop_str_in_output kv_transfer_params length_penalty logit_bias logprob_token_ids
logprobs max_tokens min_p min_tokens mm_payload model n presence_penalty priority prompt prompt_embeds prompt_logprobs
repetition_detection repetition_penalty request_id response_format return_mm_kwargs return_token_ids
return_token_offsets return_tokens_as_token_ids routed_experts_prompt_start seed session_id skip_special_tokens
spaces_between_special_tokens stop stop_token_ids stream stream_interval stream_options structured_outputs suffix
temperature thinking_token_budget top_k top_p truncate_prompt_tokens truncation_side use_beam_search user vllm_xargs
watermarking guided_json guided_regex guided_choice guided_grammar""".split()
# vLLM-Omni's image request fields.
OMNI_IMAGES = """prompt model n size response_format user negative_prompt num_inference_steps guidance_scale
true_cfg_scale seed vae_use_slicing vae_use_tiling height width lora""".split()


def _openai_fields(module) -> set[str]:
    return set(typing.get_type_hints(module.CompletionCreateParamsBase)) | {"stream"}


ROUTES = {
    "chat": (ChatCompletionRequest, field_policy.CHAT, "/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 1}),
    "completions": (CompletionRequest, field_policy.COMPLETIONS, "/v1/completions", {"prompt": "Hi",
                                                                                     "max_tokens": 1}),
    "images": (ImageGenerationRequest, field_policy.IMAGES, "/v1/images/generations", {
        "prompt": "x", "size": "32x32", "num_inference_steps": 1}),
}


def test_every_openai_and_vllm_field_is_honoured_accepted_or_refused():
    from openai.types import completion_create_params, image_generate_params
    from openai.types.chat import completion_create_params as chat_params

    known = {"chat": _openai_fields(chat_params) | set(VLLM_CHAT),
             "completions": _openai_fields(completion_create_params) | set(VLLM_COMPLETIONS),
             "images": set(typing.get_type_hints(image_generate_params.ImageGenerateParamsBase)) | {"stream"}
             | set(OMNI_IMAGES)}
    for route, (model, table, _, _) in ROUTES.items():
        covered = set(model.model_fields) | set(table) | set(field_policy.NO_EFFECT[route])
        assert known[route] <= covered, f"{route}: {sorted(known[route] - covered)} neither honoured nor refused"
        assert not set(model.model_fields) & set(table), f"{route}: a field both honoured and refused"


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_refused_field_is_a_400_and_its_neutral_values_pass(route, open_frontend):
    _, table, path, body = ROUTES[route]
    for name in table:
        response = _post(open_frontend, path, {**body, name: "a value we do not honour"})
        assert response.status_code == 400 and response.json()["error"]["param"] == name, (name, response.text)
        assert re.match(rf"{name} is not supported: ", response.json()["error"]["message"])
    # Every neutral value is accepted (each field's k-th value in request k), and null for every field.
    accepted = {name: "someone" for name in field_policy.NO_EFFECT[route] if name == "user"}
    widest = max(len(r.neutral) for r in table.values())
    for k in range(widest):
        neutral = {name: r.neutral[min(k, len(r.neutral) - 1)] for name, r in table.items() if r.neutral}
        response = _post(open_frontend, path, {**body, **neutral, **accepted})
        assert response.status_code == 200, (neutral, response.text)
    response = _post(open_frontend, path, {**body, **{name: None for name in table}})
    assert response.status_code == 200, response.text


def test_readme_lists_the_field_policy():
    readme = (REPO_ROOT / "README.md").read_text()
    listed = readme.split("<!-- field-policy:start -->\n", 1)[1].split("<!-- field-policy:end -->", 1)[0]
    assert listed == field_lists.readme_lines(), "README.md's field lists are stale: run " \
                                                  "python -m openai_frontend.field_lists and paste its output"


def test_openai_sdk_clients_reach_the_refusal(open_frontend):
    client = openai.OpenAI(base_url=f"{open_frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError, match="functions is not supported"):
        client.chat.completions.create(model="llm", messages=CAPITAL, functions=[{
            "name": "f", "parameters": {"type": "object", "properties": {}}}])
