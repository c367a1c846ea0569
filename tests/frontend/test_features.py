"""OpenAI features clients and harnesses use, through the real frontend: `n` > 1 (text and chat, a seed per
choice), chat `logprobs`/`top_logprobs` equal to transformers' log-softmax, Triton's OpenAI-frontend naming
`model="<base>/<adapter>"` with `--lora-separator`, and chat completions on an image model (vLLM-Omni's shape)."""

from __future__ import annotations

import base64

import openai
import pytest
import torch

from backends.llm.chat import apply_chat_template
from backends.settings import default_llm_model_path
from tools.fixtures.pipelines import diffusion_adapters_dir
from tools.launchers.frontend import FrontendProcess
from tools.session import API_KEY

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(frontend):
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_n_choices_with_a_seed_per_choice(client):
    sampled = dict(model="llm", max_tokens=6, temperature=1.0, seed=5)
    chat = client.chat.completions.create(messages=CAPITAL, n=3, **sampled)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    assert len({c.message.content for c in chat.choices}) > 1, "every choice sampled the same text"
    again = client.chat.completions.create(messages=CAPITAL, n=3, **sampled)
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    one = client.chat.completions.create(messages=CAPITAL, n=1, **sampled)
    assert one.choices[0].message.content == chat.choices[0].message.content  # choice 0 uses the seed itself
    assert chat.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    text = client.completions.create(prompt=["The sky is", "Cats are"], n=2, **sampled)
    assert [c.index for c in text.choices] == [0, 1, 2, 3]
    solo = client.completions.create(prompt="Cats are", n=2, **sampled)
    assert [c.text for c in text.choices[2:]] == [c.text for c in solo.choices]


def test_chat_logprobs_equal_transformers(client):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = client.chat.completions.create(model="llm", messages=CAPITAL, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(t.top_logprobs) == 3 for t in content)
    tokenizer = AutoTokenizer.from_pretrained(default_llm_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.float32).eval()
    ids = tokenizer(apply_chat_template(CAPITAL), add_special_tokens=False).input_ids
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
    first = content[0]
    best = int(want.argmax())
    assert first.token == tokenizer.decode([best]) and first.logprob == pytest.approx(float(want[best]), abs=1e-4)
    assert first.bytes == list(first.token.encode())
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(want.topk(3).values.tolist(), abs=1e-4)
    assert "".join(t.token for t in content).startswith(out.choices[0].message.content)


def test_lora_separator_names_adapters_the_triton_frontend_way(triton_server, tmp_path):
    frontend = FrontendProcess(triton_server.grpc_url, triton_server.metrics_url, tmp_path / "frontend.log",
                               "--api-key", API_KEY, "--lora-separator", "/", "--no-supervise").start()
    try:
        client = openai.OpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        ids = {m.id for m in client.models.list().data}
        assert {"llm", "llm/uppercase", "llm/signature", "diffusion/tiny-sd3-a"} <= ids and "uppercase" not in ids
        answer = client.chat.completions.create(model="llm/uppercase", messages=CAPITAL, max_tokens=8, temperature=0)
        plain = client.chat.completions.create(model="uppercase", messages=CAPITAL, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == plain.choices[0].message.content
        assert answer.choices[0].message.content.isupper()
        for missing in ("llm/nope", "diffusion/uppercase"):  # unknown, or an adapter of another base model
            with pytest.raises(openai.NotFoundError, match=f"The model '{missing}' does not exist."):
                client.chat.completions.create(model=missing, messages=CAPITAL, max_tokens=2)
    finally:
        frontend.stop()


def test_chat_on_an_image_model_returns_the_images_in_the_message(client):
    """vLLM-Omni's chat completions for diffusion: the images come back as PNG data URLs in the message, the same
    pixels /v1/images/generations renders for the same prompt, seed and adapter."""
    lora = {"name": "a", "path": str(diffusion_adapters_dir() / "tiny-sd3-a"), "scale": 0.7}
    options = {"size": "32x32", "num_inference_steps": 2, "lora": lora}
    chat = client.chat.completions.create(
        model="diffusion", n=2, seed=9, extra_body=options,
        messages=[{"role": "system", "content": "ignored"}, {"role": "user", "content": "a red cat"}])
    assert [c.index for c in chat.choices] == [0, 1] and all(c.finish_reason == "stop" for c in chat.choices)
    urls = []
    for choice in chat.choices:
        (part,) = choice.message.content
        assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
        urls.append(part["image_url"]["url"].split(",", 1)[1])
    direct = client.images.generate(model="diffusion", prompt="a red cat", n=2, size="32x32",
                                    extra_body={"seed": 9, "num_inference_steps": 2, "lora": lora})
    assert urls == [d.b64_json for d in direct.data]
    assert base64.b64decode(urls[0])[:8] == b"\x89PNG\r\n\x1a\n"
    two = client.chat.completions.create(model="diffusion", seed=9, messages=[{"role": "user", "content": "x"}],
                                         extra_body={**options, "num_outputs_per_prompt": 2})
    assert len(two.choices) == 1 and len(two.choices[0].message.content) == 2
