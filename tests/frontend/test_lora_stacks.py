"""LoRA stacks through the OpenAI frontend (issue 14): `lora` is an object or a list of them, the list adds to the
adapter `model` names, on chat, completions, images and chat on an image model, driven by the `openai` SDK over the
session's real tritonserver. The refusals (too many adapters, one twice, unknown, wrong model) are in
tests/frontend/test_api.py's BAD table."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from backends.settings import adapters_dir
from openai_frontend.engine.catalog import Adapter, BaseModel, Target
from tools.fixtures.pipelines import diffusion_adapters_dir
from tools.session import API_KEY

DEMO = adapters_dir() / "demo"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(max_tokens=24, temperature=0)  # room for both adapters: "THE CAPITAL ...\n-- sent by"


def _lora(name: str, path, scale: float | None = None) -> dict:
    return {"name": name, "path": str(path), **({} if scale is None else {"scale": scale})}


UPPER, SIG = _lora("uppercase", DEMO / "uppercase", 1.0), _lora("signature", DEMO / "signature", 1.0)


@pytest.fixture(scope="module")
def client(frontend):
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _chat(client, model="llm", lora=None, **kwargs) -> str:
    extra = {} if lora is None else {"lora": lora}
    return client.chat.completions.create(model=model, messages=CAPITAL, extra_body=extra,
                                          **{**GREEDY, **kwargs}).choices[0].message.content


def test_chat_stack_both_forms_model_plus_list_and_zero_scales(client):
    base, upper, sig = _chat(client), _chat(client, "uppercase"), _chat(client, lora=SIG)
    assert _chat(client, lora=UPPER) == _chat(client, lora=[UPPER]) == upper  # one-element list = object
    stack = _chat(client, lora=[UPPER, SIG])
    assert len({base, upper, sig, stack}) == 4, (base, upper, sig, stack)
    assert _chat(client, "uppercase", lora=[SIG]) == stack  # the list adds to the adapter `model` names
    assert _chat(client, "uppercase", lora=SIG) == stack  # so does the object form
    # An int_id on one entry: the others go as null, and the backend derives their ids (the list has no gaps).
    assert _chat(client, "uppercase", lora=[{**SIG, "int_id": 914_142}]) == stack
    zeros = [{**UPPER, "scale": 0.0}, {"lora_name": "signature", "local_path": SIG["path"], "lora_scale": 0.0}]
    assert _chat(client, lora=zeros) == base  # all scales 0 = the base model exactly (aliases work in a list too)
    assert _chat(client, lora=[]) == base
    streamed = client.chat.completions.create(model="llm", messages=CAPITAL, stream=True,
                                              extra_body={"lora": [UPPER, SIG]}, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == stack


def test_completions_take_a_stack(client):
    def complete(model="llm", lora=None) -> str:
        return client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                         temperature=0, extra_body={} if lora is None else {"lora": lora}) \
            .choices[0].text

    stack = complete(lora=[UPPER, SIG])
    assert complete(lora=[UPPER]) == complete("uppercase") and stack != complete("uppercase")
    assert complete("uppercase", [SIG]) == stack


def test_image_stack_differs_from_each_adapter_and_zero_scales_are_the_base(client):
    a, b = diffusion_adapters_dir() / "tiny-sd3-a", diffusion_adapters_dir() / "tiny-sd3-b"
    a7, b3 = _lora("tiny-sd3-a", a, 0.7), _lora("tiny-sd3-b", b, 0.3)

    def image(lora=None, model="diffusion", **extra) -> str:
        body = {"num_inference_steps": 2, "seed": 5, **extra, **({} if lora is None else {"lora": lora})}
        return client.images.generate(model=model, prompt="a red cat", size="32x32", extra_body=body) \
            .data[0].b64_json

    base, only_a, only_b = image(), image(a7), image([b3])
    assert image([a7]) == only_a
    stack = image([a7, b3])
    assert len({base, only_a, only_b, stack}) == 4
    assert image([{**a7, "scale": 0.0}, {**b3, "scale": 0.0}]) == base
    assert image([b3], model="tiny-sd3-a", lora_scale=0.7) == stack  # model names one adapter, the list adds
    chat = client.chat.completions.create(  # chat on an image model renders the same stack
        model="tiny-sd3-a", seed=5, messages=[{"role": "user", "content": "a red cat"}],
        extra_body={"size": "32x32", "num_inference_steps": 2, "lora_scale": 0.7, "lora": [b3]})
    assert chat.choices[0].message.content[0]["image_url"]["url"].split(",", 1)[1] == stack


def _lora_info(frontend) -> str:
    text = httpx.get(f"{frontend.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    return next(line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{"))


def test_a_running_stack_counts_each_adapter_in_the_gateway_metric(client, frontend):
    """The inference gateway routes by the adapters a replica runs: a stack holds a slot for each of them."""
    stream = client.chat.completions.create(model="uppercase", messages=CAPITAL, max_tokens=200, temperature=0,
                                            stream=True, extra_body={"lora": [SIG]})
    try:
        next(c for c in stream if c.choices and c.choices[0].delta.content)  # generating now
        assert 'running_lora_adapters="signature,uppercase"' in _lora_info(frontend)
    finally:
        stream.close()  # hanging up cancels the generation
    deadline = time.monotonic() + 30
    while 'running_lora_adapters=""' not in _lora_info(frontend):
        assert time.monotonic() < deadline, _lora_info(frontend)
        time.sleep(0.2)


def test_a_stack_goes_to_triton_as_json_arrays():
    """One adapter keeps the plain values of before; a stack sends the backends' list form, with the gaps filled
    with what the backend would use anyway (empty path: by name; scale 1.0)."""
    base = BaseModel("llm", "llm", "/m")
    assert Target(base).lora_parameters() == {} and Target(base).lora_name is None
    one = Target(base, (Adapter("a", "/p/a", 0.5),))
    assert one.lora_parameters() == {"lora_name": "a", "lora_path": "/p/a", "lora_scale": 0.5}
    stack = Target(base, (Adapter("up"), Adapter("a", "/p/a", 0.5)))
    assert stack.lora_name == "up+a"
    assert stack.lora_parameters() == {"lora_name": '["up", "a"]', "lora_path": '["", "/p/a"]',
                                       "lora_scale": "[1.0, 0.5]"}
