"""The product default on CPUs with AVX512-BF16: the llm served in bfloat16 through tritonserver gives, for a request
alone, the greedy tokens transformers (and PEFT, with an adapter) give in bfloat16. Batch invariance is not claimed
in bfloat16 (a GEMM of another batch shape rounds differently), so each request runs alone."""

from __future__ import annotations

from functools import cache

import pytest
import torch

from backends.llm.chat import apply_chat_template
from backends.settings import adapters_dir, default_llm_model_path
from tools.clients.llm import generate
from tools.session import BF16_MODEL

PROMPTS = [apply_chat_template("What is the capital of France?"), apply_chat_template("Tell me about cats.")]
STEPS = 16


@pytest.fixture(scope="module")
def bf16_model(http_client):
    http_client.load_model(BF16_MODEL)
    yield BF16_MODEL
    http_client.unload_model(BF16_MODEL)


@cache  # the base's texts serve both cases
def _reference_texts(adapter: str | None) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_llm_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.bfloat16).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapters_dir() / "demo" / adapter).eval()
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, do_sample=False)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


@pytest.mark.parametrize("adapter", [None, "uppercase"])
def test_bf16_greedy_text_alone_equals_transformers_in_bf16(bf16_model, grpc_client, adapter):
    want = _reference_texts(adapter)
    lora = {"lora_name": adapter} if adapter else {}
    for prompt, expected in zip(PROMPTS, want):
        out = generate(grpc_client, prompt, model=bf16_model, temperature=0.0, max_tokens=STEPS, **lora)
        assert out.error is None, out.error
        assert "".join(out.chunks) == expected
    if adapter == "uppercase":  # the adapter does act in bfloat16: its answers differ from the base's
        assert want != _reference_texts(None)
