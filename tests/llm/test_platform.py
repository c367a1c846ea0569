"""The base `llm` model through a real tritonserver: readiness, generation controls, cancellation, bad inputs."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from backends.llm.chat import apply_chat_template
from tools.clients.llm import generate

CAPITAL = apply_chat_template("What is the capital of France?")
STORY = apply_chat_template("Write a long story about a dragon who learns to bake bread.")


def test_llm_is_ready_in_repository_index(http_client):
    index = {m["name"]: m for m in http_client.get_model_repository_index()}
    assert index["llm"]["state"] == "READY"
    assert http_client.is_model_ready("llm")


def test_greedy_chat_streams_paris(grpc_client):
    out = generate(grpc_client, CAPITAL, temperature=0.0, max_tokens=32, stream=True)
    assert out.error is None
    assert "Paris" in out.text
    assert len(out.chunks) > 3, "streaming must send one response per token chunk"
    assert out.finish_reason == "stop"
    assert out.num_input_tokens > 10 and 0 < out.num_output_tokens < 32


def test_non_stream_sends_one_response_with_the_same_text(grpc_client):
    streamed = generate(grpc_client, CAPITAL, temperature=0.0, max_tokens=32, stream=True)
    whole = generate(grpc_client, CAPITAL, temperature=0.0, max_tokens=32, stream=False)
    assert whole.error is None
    assert len(whole.chunks) == 1
    assert whole.text == streamed.text
    assert whole.num_output_tokens == streamed.num_output_tokens


def test_max_tokens_is_respected(grpc_client):
    out = generate(grpc_client, STORY, temperature=0.0, max_tokens=5, stream=True)
    assert out.error is None
    assert out.num_output_tokens == 5
    assert out.finish_reason == "length"
    assert out.text


def test_stop_string_ends_generation_and_is_not_returned(grpc_client):
    full = generate(grpc_client, CAPITAL, temperature=0.0, max_tokens=32).text
    assert " of France" in full
    # " of Fr" spans token boundaries: its start must be held back, never streamed.
    out = generate(grpc_client, CAPITAL, temperature=0.0, max_tokens=32, stop=[" of Fr", "never-seen"], stream=True)
    assert out.error is None
    assert out.text == full[: full.index(" of Fr")]
    assert all(" of" not in chunk for chunk in out.chunks)
    assert out.finish_reason == "stop"


def test_same_seed_gives_same_sampled_text(grpc_client):
    params = dict(temperature=1.0, top_p=0.95, top_k=50, max_tokens=16)
    first = generate(grpc_client, STORY, seed=1234, **params)
    second = generate(grpc_client, STORY, seed=1234, **params)
    assert first.error is None and second.error is None
    assert first.text == second.text
    others = {generate(grpc_client, STORY, seed=s, **params).text for s in (1, 2, 3)}
    assert others - {first.text}, "different seeds should sample different text"


def _metric(metrics_url: str, name: str, **labels) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_cancelled_stream_stops_generation(grpc_client, triton_server):
    url = triton_server.metrics_url
    aborted_before = _metric(url, "multilora_llm_requests_finished_total", finish_reason="abort")
    out = generate(grpc_client, STORY, temperature=0.0, max_tokens=2000, stream=True, cancel_after_chunks=3)
    assert out.error is None and len(out.chunks) == 3

    deadline = time.monotonic() + 20
    while _metric(url, "multilora_llm_requests_finished_total", finish_reason="abort") == aborted_before:
        assert time.monotonic() < deadline, "the engine never noticed the cancellation"
        time.sleep(0.1)
    tokens = _metric(url, "multilora_llm_generation_tokens_total")
    time.sleep(1.0)
    assert _metric(url, "multilora_llm_generation_tokens_total") == tokens, "tokens still being generated"
    assert _metric(url, "multilora_llm_num_requests_running") == 0
    # The engine is free again at once.
    assert "Paris" in generate(grpc_client, CAPITAL, temperature=0.0, max_tokens=16).text


BAD_INPUTS = {
    "missing text_input": (dict(text_input=None, max_tokens=4), r"send exactly one of the inputs 'text_input'"),
    "empty text": (dict(text_input="", max_tokens=4), r"'text_input' must be a non-empty string"),
    "max_tokens zero": (dict(text_input="hi", max_tokens=0), r"max_tokens must be at least 1 \(0 only to score .*got 0"),
    "max_tokens negative": (dict(text_input="hi", max_tokens=-5), r"max_tokens must be at least 1 .*, got -5"),
    "max_tokens above context": (
        dict(text_input="hi", max_tokens=9000), r"maximum context length is 2048 tokens.*9001 tokens"
    ),
    "negative temperature": (dict(text_input="hi", temperature=-0.5), r"temperature must be .*>= 0, got -0.5"),
    "top_p zero": (dict(text_input="hi", top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    "top_p above one": (dict(text_input="hi", top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    "negative top_k": (dict(text_input="hi", top_k=-1), r"top_k must be >= 0"),
    "negative seed": (dict(text_input="hi", seed=-7), r"seed must be in \[0, 2\^63\), got -7"),
    "non-UTF-8 text": (dict(text_input=b"caf\xe9 \xff"), r"'text_input' is not valid UTF-8"),
    "text and token ids": (dict(text_input="hi", input_ids=[1, 2]), r"send exactly one of the inputs"),
    "token id outside the vocabulary": (dict(text_input=None, input_ids=[1, 49152]),
                                        r"prompt token ids \[49152\] are outside the vocabulary \(0..49151\)"),
    "negative token id": (dict(text_input=None, input_ids=[-3]), r"outside the vocabulary"),
    "logprobs above 20": (dict(text_input="hi", logprobs=21), r"logprobs must be between 0 and 20, got 21"),
    "prompt_logprobs negative": (dict(text_input="hi", prompt_logprobs=-1),
                                 r"prompt_logprobs must be between 0 and 20, got -1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_rejected_and_server_keeps_serving(case, grpc_client, triton_server):
    params, message = BAD_INPUTS[case]
    out = generate(grpc_client, **params)
    assert out.error is not None, f"{case}: accepted"
    assert re.search(message, out.error.message()), out.error.message()
    assert not out.chunks

    # gRPC streams carry only the message; Triton's HTTP generate endpoint shows the code: INVALID_ARG -> 400.
    if isinstance(params["text_input"], (str, type(None))):
        body = {k: v for k, v in params.items() if v is not None}
        reply = httpx.post(f"http://{triton_server.http_url}/v2/models/llm/generate", json=body, timeout=60)
        assert reply.status_code == 400, reply.text
        assert re.search(message, reply.json()["error"])

    ok = generate(grpc_client, CAPITAL, temperature=0.0, max_tokens=8)
    assert ok.error is None and ok.text.startswith("The capital")


def test_concurrent_streams_queue_and_each_gets_its_own_answer(grpc_client, triton_server):
    from concurrent.futures import ThreadPoolExecutor

    import tritonclient.grpc as grpcclient

    prompts = [CAPITAL, apply_chat_template("Name three primary colours."), STORY, CAPITAL]
    alone = [generate(grpc_client, p, temperature=0.0, max_tokens=12).text for p in prompts]

    def one(prompt: str) -> str:
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            out = generate(client, prompt, temperature=0.0, max_tokens=12, stream=True)
            assert out.error is None, out.error
            return out.text
        finally:
            client.close()

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone
