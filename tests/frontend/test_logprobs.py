"""/v1/completions as evaluation harnesses use it, through the real frontend and tritonserver: every OpenAI prompt
form, `logprobs` with `echo` (prompt scoring, `max_tokens` 0), vLLM's /tokenize and /detokenize, and log-likelihoods
equal to transformers' log-softmax (base model) and PEFT's (an adapter) on the same tokens."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from backends.settings import adapters_dir, default_llm_model_path
from tools.session import API_KEY

CONTEXT = "Question: What is the capital of France?\nAnswer:"
CONTINUATION = " Paris is the capital."


@pytest.fixture(scope="module")
def client(frontend):
    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _post(frontend, path: str, **body) -> httpx.Response:
    return httpx.post(f"{frontend.url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_llm_model_path())


def _reference_loglikelihood(model, ids: list[int], context_len: int) -> tuple[float, list[float]]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    per_token = [float(logprobs[i - 1, ids[i]]) for i in range(context_len, len(ids))]
    return sum(per_token), per_token


@pytest.mark.parametrize("adapter", [None, "uppercase"])
def test_echo_logprobs_equal_transformers_and_peft(client, tokenizer, adapter):
    """lm-eval's log-likelihood request: token ids, echo, logprobs 1, max_tokens 0 (and 1, as lm-eval sends it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    context = tokenizer(CONTEXT, add_special_tokens=False).input_ids
    ids = context + tokenizer(CONTINUATION, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.float32).eval()
    if adapter:
        model = PeftModel.from_pretrained(model, adapters_dir() / "demo" / adapter).eval()
    want_sum, want = _reference_loglikelihood(model, ids, len(context))
    for max_tokens in (0, 1):
        out = client.completions.create(model=adapter or "llm", prompt=ids, echo=True, logprobs=1,
                                        max_tokens=max_tokens, temperature=0)
        lp = out.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = lp.token_logprobs[len(context):len(ids)]
        assert got == pytest.approx(want, abs=1e-4) and sum(got) == pytest.approx(want_sum, abs=1e-4)
        assert all(len(top) >= 1 and max(top.values()) >= tok - 1e-6
                   for top, tok in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        assert out.choices[0].text.startswith(tokenizer.decode(ids))
        assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens <= max_tokens  # EOS not counted
        assert lp.text_offset[:2] == [0, len(lp.tokens[0])]


def test_every_prompt_form_gives_one_choice_per_prompt_in_order(client, tokenizer):
    texts = ["The capital of France is", "One, two, three,"]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    greedy = dict(model="llm", max_tokens=4, temperature=0)
    one = client.completions.create(prompt=texts[0], **greedy)
    both = client.completions.create(prompt=texts, **greedy)
    as_ids = client.completions.create(prompt=ids, **greedy)
    single_ids = client.completions.create(prompt=ids[1], **greedy)
    assert [c.index for c in both.choices] == [0, 1] == [c.index for c in as_ids.choices]
    assert both.choices[0].text == one.choices[0].text == as_ids.choices[0].text
    assert both.choices[1].text == as_ids.choices[1].text == single_ids.choices[0].text
    assert both.usage.prompt_tokens == sum(len(i) for i in ids)
    assert both.usage.completion_tokens == one.usage.completion_tokens + single_ids.usage.completion_tokens


def test_generated_token_logprobs_come_from_the_chosen_tokens(client):
    out = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=3, temperature=0,
                                    logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and "".join(lp.tokens).startswith(out.choices[0].text)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 2 and top[token] == pytest.approx(logprob)  # greedy: it is the best
        assert max(top.values()) == pytest.approx(logprob)


def test_tokenize_and_detokenize_round_trip_per_model(frontend, tokenizer):
    text = "Hello, tokenizer!"
    for model in ("llm", "uppercase", None):  # an adapter uses its base model's tokenizer
        body = {"prompt": text, "add_special_tokens": False} | ({"model": model} if model else {})
        out = _post(frontend, "/tokenize", **body)
        assert out.status_code == 200, out.text
        assert out.json()["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        back = _post(frontend, "/detokenize", tokens=out.json()["tokens"], **({"model": model} if model else {}))
        assert back.json() == {"prompt": text}
    chat = _post(frontend, "/tokenize", model="llm", messages=[{"role": "user", "content": "hi"}]).json()
    assert tokenizer.decode(chat["tokens"]).startswith("<|im_start|>")
    info = httpx.get(f"{frontend.url}/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"]


BAD = {
    "token ids outside the vocabulary": (dict(prompt=[1, 2, 99999], max_tokens=1), 400,
                                         "prompt token ids [99999] are outside the vocabulary (0..49151)"),
    "an empty token list": (dict(prompt=[], max_tokens=1), 400, "prompt must not be empty"),
    "a token id beyond 32 bits": (dict(prompt=[1, 2**32 + 5], max_tokens=1), 400, "non-negative 32-bit integers"),
    "booleans as token ids": (dict(prompt=[True, False], max_tokens=1), 400, "prompt"),
    "one bad prompt among good ones": (dict(prompt=[[1, 2, 3], [5, 99999]], max_tokens=200), 400,
                                       "prompt token ids [99999] are outside the vocabulary"),
    "an empty prompt in a list": (dict(prompt=[[1, 2], []], max_tokens=1), 400, "every prompt must be a non-empty"),
    "10,000 prompts": (dict(prompt=["hi"] * 10_000, max_tokens=1), 400, "at most 256 prompts per request"),
    "logprobs 21": (dict(prompt="hi", max_tokens=1, logprobs=21), 400, "less than or equal to 20"),
    "echo with stream": (dict(prompt="hi", max_tokens=1, echo=True, stream=True), 400,
                         "stream is supported for one prompt without echo or logprobs"),
    "max_tokens 0 without echo": (dict(prompt="hi", max_tokens=0), 400, "max_tokens 0 needs echo"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_completion_requests_get_a_clear_400_and_the_server_goes_on(frontend, client, case):
    body, status, message = BAD[case]
    out = _post(frontend, "/v1/completions", model="llm", **body)
    assert out.status_code == status, out.text
    assert message in out.json()["error"]["message"]
    assert client.completions.create(model="llm", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_tokenize_for_an_unknown_model_is_404(frontend):
    out = _post(frontend, "/tokenize", model="no-such-model", prompt="hi")
    assert out.status_code == 404 and "no-such-model" in out.json()["error"]["message"]
    assert _post(frontend, "/detokenize", tokens=[10**9]).status_code == 400


def test_engine_scores_prompts_in_chunks_next_to_generation(monkeypatch):
    """In-process on the tiny Llama: scoring requests (max_tokens 0) are prefilled in chunks of the step's token
    budget (each chunk's logits only: memory bounded by the budget), next to a generating request with logprobs;
    every prompt logprob equals the model's own log-softmax and the generated tokens' logprobs are those of the
    chosen (greedy: best) tokens."""
    from backends.errors import InvalidArgument
    from backends.llm import engine as engine_module
    from backends.llm.engine import LLMEngine
    from backends.llm.runner import ModelRunner, RunnerSettings
    from backends.llm.scheduler import SchedulerLimits
    from tools.clients.engine import Collect, request_for
    from tools.fixtures.llm_families import make_family

    runner = ModelRunner(make_family("llama"), lora=None,
                         settings=RunnerSettings(dtype="float32", max_model_len=96, max_num_seqs=4))
    monkeypatch.setattr(engine_module, "PROMPT_LOGITS_BYTES", runner.logits_bytes_per_token * 50)
    steps: list[list[tuple[int, str]]] = []
    step = runner.step

    def recording(rows):
        steps.append([(len(r.tokens), r.logits) for r in rows])
        return step(rows)

    monkeypatch.setattr(runner, "step", recording)
    engine = LLMEngine(lambda e: (runner, None), limits=SchedulerLimits(max_num_seqs=4, max_num_batched_tokens=16))
    try:
        texts = ["Score this prompt, please.", "And this one too, it is longer than the first.", "Third!"]
        scoring = [request_for(engine, t, max_tokens=0, prompt_logprobs=2) for t in texts]
        generating = request_for(engine, "Generate after this.", max_tokens=3, logprobs=1)
        sinks = [Collect() for _ in range(4)]
        for request, sink in zip([*scoring, generating], sinks):
            engine.submit(request, sink)
        for sink in sinks:
            sink.wait()
            assert sink.error is None, sink.error
    finally:
        engine.shutdown()
    for request, sink in zip(scoring, sinks):
        entries = sink.chunks[-1].prompt_logprobs
        ids = request.prompt_token_ids
        with torch.no_grad(), runner.stock_attention() as model:
            want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        assert [e.token_id for e in entries] == ids and entries[0].logprob is None
        for j, entry in enumerate(entries[1:], start=1):
            assert entry.logprob == pytest.approx(float(want[j - 1, ids[j]]), abs=1e-4)
            assert [i for i, _ in entry.top] == want[j - 1].topk(2).indices.tolist()
        assert sink.chunks[-1].finish_reason == "length" and sink.chunks[-1].num_output_tokens == 0
    scored = [sum(n for n, kind in rows if kind == "all") for rows in steps]
    assert sum(1 for n in scored if n) >= 3 and max(scored) <= 16, steps  # in chunks, within the budget
    with pytest.raises(InvalidArgument, match=r"scoring a prompt of 51 tokens needs .* send at most 50 tokens"):
        request_for(engine, "x" * 51, max_tokens=0, prompt_logprobs=0)
    produced = [e for chunk in sinks[3].chunks for e in chunk.logprobs]
    assert len(produced) >= 1 and all(e.logprob == pytest.approx(e.top[0][1]) for e in produced)
