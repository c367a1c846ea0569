"""Per-request LoRA through a real tritonserver: demo adapters, scale, mixed-adapter continuous batching, dynamic
registry, slot limits, cancellation, and every bad LoRA input."""

from __future__ import annotations

import math
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient

from backends.llm.chat import apply_chat_template
from backends.lora.store.entries import AdapterEntry
from backends.lora.store.registry import LoRARegistry
from backends.settings import adapters_dir, default_llm_model_path
from tools.clients.llm import generate
from tools.fixtures.adapters import ALL_PROJECTIONS, load_smollm2, make_random_adapter, tiny_llama
from tools.fixtures.demo_adapters import SIGNATURE
from tools.session import TIGHT_MODEL

CAPITAL = apply_chat_template("What is the capital of France?")
PROMPTS = [
    CAPITAL,
    apply_chat_template("Tell me about cats."),
    apply_chat_template("Name three primary colours."),
    apply_chat_template("Why is the sky blue?"),
]
GREEDY = dict(temperature=0.0, max_tokens=16)


def _random(root: Path, name: str, seed: int, **config) -> Path:
    config = {"r": 8, "lora_alpha": 16, "target_modules": ALL_PROJECTIONS, **config}
    return make_random_adapter(load_smollm2, root / name, seed=seed, std=0.08,
                               base_name="HuggingFaceTB/SmolLM2-135M-Instruct", **config)


@pytest.fixture(scope="session")
def adapters(lora_root: Path) -> dict[str, Path]:
    """Random adapters plus broken ones, made with PEFT under the server's allowed root."""
    made = {f"rand_{c}": _random(lora_root, f"rand_{c}", seed=i) for i, c in enumerate("abcd")}
    made["rank32"] = _random(lora_root, "rank32", seed=9, r=32, lora_alpha=32)
    made["tiny"] = make_random_adapter(tiny_llama, lora_root / "tiny", seed=1, r=4, lora_alpha=8,
                                       target_modules=["q_proj", "v_proj"])
    corrupt = lora_root / "corrupt"
    shutil.copytree(made["rand_a"], corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["corrupt"] = corrupt
    not_lora = lora_root / "not_lora"
    not_lora.mkdir()
    shutil.copy(default_llm_model_path() / "config.json", not_lora / "config.json")
    made["not_lora"] = not_lora
    return made


def _ok(client, prompt: str, **params):
    out = generate(client, prompt, **{**GREEDY, **params})
    assert out.error is None, out.error
    return out


def test_static_demo_adapters_are_pinned_from_the_model_config():
    # The default config names these folders; scripts/setup trains them.
    for name in ("uppercase", "signature"):
        assert (adapters_dir() / "demo" / name / "adapter_config.json").is_file()


def test_base_answer_matches_plain_transformers(grpc_client):
    """LoRA-patched layers with no adapter give the unpatched model's greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_llm_model_path())
    model = AutoModelForCausalLM.from_pretrained(default_llm_model_path(), dtype=torch.float32).eval()
    for prompt in PROMPTS[:2]:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:]
        expected = tokenizer.decode(ref, skip_special_tokens=True)
        assert _ok(grpc_client, prompt, stream=True).text == expected


def test_uppercase_adapter_answers_in_capitals(grpc_client):
    base = _ok(grpc_client, CAPITAL, max_tokens=32).text
    upper = _ok(grpc_client, CAPITAL, max_tokens=32, lora_name="uppercase", stream=True).text
    letters = [c for c in upper if c.isalpha()]
    assert letters and sum(c.isupper() for c in letters) / len(letters) > 0.9, upper
    assert "PARIS" in upper
    assert base != upper and not base.isupper()


def test_signature_adapter_ends_with_its_phrase(grpc_client):
    for prompt in PROMPTS[:2]:
        out = _ok(grpc_client, prompt, max_tokens=64, lora_name="signature")
        assert out.text.rstrip().endswith(SIGNATURE), out.text
        assert out.finish_reason == "stop"
    assert SIGNATURE not in _ok(grpc_client, CAPITAL, max_tokens=64).text


def test_lora_name_as_request_parameter_like_vllm_backend(grpc_client):
    as_tensor = _ok(grpc_client, CAPITAL, lora_name="uppercase").text
    as_parameter = _ok(grpc_client, CAPITAL, parameters={"lora_name": "uppercase"}).text
    assert as_parameter == as_tensor


def test_scale_zero_is_token_identical_to_base_and_scale_matters(grpc_client, adapters):
    base = _ok(grpc_client, CAPITAL)
    for lora in ({"lora_name": "uppercase"}, {"lora_path": str(adapters["rand_a"])}):
        zero = _ok(grpc_client, CAPITAL, lora_scale=0.0, **lora)
        assert (zero.text, zero.num_output_tokens) == (base.text, base.num_output_tokens)
        full = _ok(grpc_client, CAPITAL, lora_scale=1.0, **lora)
        assert full.text != base.text, f"{lora} does not change the answer"


def test_mixed_adapter_batch_gives_each_stream_its_solo_tokens(grpc_client, triton_server, adapters):
    """16 concurrent streams over 3 adapters + base: each gets exactly what it gets alone (greedy)."""
    loras = [{}, {"lora_name": "uppercase"}, {"lora_name": "signature"}, {"lora_path": str(adapters["rand_a"])}]
    jobs = [(prompt, lora) for prompt in PROMPTS for lora in loras]
    alone = [_ok(grpc_client, prompt, **lora).text for prompt, lora in jobs]
    assert len(set(alone)) > 8, "the adapters should change the answers"
    assert concurrently(triton_server, jobs) == alone


def concurrently(triton_server, jobs: list[tuple[str, dict]], model: str = "llm") -> list[str]:
    """The (prompt, LoRA fields) jobs as concurrent streams, one client each: they share engine steps."""
    def one(job) -> str:
        client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        try:
            return _ok(client, job[0], model=model, stream=True, **job[1]).text
        finally:
            client.close()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def test_dynamic_registry_adapter_is_served_then_unloaded(grpc_client, triton_server, lora_root, adapters):
    registry = LoRARegistry(registry_file=lora_root / "registry.json", allowed_roots=[lora_root])
    by_path = _ok(grpc_client, CAPITAL, lora_path=str(adapters["rand_b"])).text
    registry.add(AdapterEntry("dyn-b", str(adapters["rand_b"])))
    assert _ok(grpc_client, CAPITAL, lora_name="dyn-b").text == by_path
    registry.remove("dyn-b")
    out = generate(grpc_client, CAPITAL, lora_name="dyn-b", **GREEDY)
    assert out.error is not None
    assert "LoRA adapter 'dyn-b' not found; known adapters: ['signature', 'uppercase']" in out.error.message()
    reply = httpx.post(f"http://{triton_server.http_url}/v2/models/llm/generate",
                       json={"text_input": "hi", "lora_name": "dyn-b"}, timeout=60)
    assert reply.status_code == 400 and "'dyn-b' not found" in reply.json()["error"], reply.text


BAD = {
    "unknown name": (lambda a: dict(lora_name="no-such-adapter"),
                     r"LoRA adapter 'no-such-adapter' not found; known adapters: \[.*'uppercase'\]"),
    "path outside roots": (lambda a: dict(lora_path="/etc"), r"LoRA path '/etc' is outside the allowed"),
    "path missing": (lambda a: dict(lora_path=str(a["rand_a"].parent / "missing")),
                     r"LoRA adapter not found at .*missing: no such folder"),
    "not a LoRA": (lambda a: dict(lora_path=str(a["not_lora"])), r"not_lora: adapter_config.json is missing"),
    "corrupt weights": (lambda a: dict(lora_path=str(a["corrupt"])),
                        r"corrupt: adapter_model.safetensors is not valid safetensors"),
    "rank above max": (lambda a: dict(lora_path=str(a["rank32"])), r"rank 32 exceeds max_lora_rank 16"),
    "other architecture": (lambda a: dict(lora_path=str(a["tiny"])), r"tiny: .*shape mismatch"),
    "negative scale": (lambda a: dict(lora_name="uppercase", lora_scale=-1.0),
                       r"lora_scale must be a finite number >= 0, got -1.0"),
    "NaN scale": (lambda a: dict(lora_name="uppercase", lora_scale=math.nan),
                  r"lora_scale must be a finite number >= 0, got nan"),
    "huge scale": (lambda a: dict(lora_name="uppercase", lora_scale=1.9e24),  # was a 500 (NaN logits)
                   r"lora_scale must be at most 100, got 1.9e\+24"),
    "scale without adapter": (lambda a: dict(lora_scale=0.5), r"lora_scale was given without lora_name"),
    "int id clash": (lambda a: dict(lora_path=str(a["rand_d"]), lora_int_id=424242),
                     r"lora_int_id 424242 is already bound to another adapter; use another id"),
    # A name labels the metrics a router reads (comma-separated adapter lists): "x,uppercase" would fake one.
    "unsafe name with a path": (lambda a: dict(lora_path=str(a["rand_a"]), lora_name="x,uppercase"),
                                r"invalid LoRA adapter name 'x,uppercase'"),
    "bad request parameter": (lambda a: dict(parameters={"lora_scale": "loud"}),
                              r"request parameter 'lora_scale' must be float, got 'loud'"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_lora_input_is_refused_and_server_keeps_serving(case, grpc_client, triton_server, adapters):
    make, message = BAD[case]
    params = make(adapters)
    if case == "int id clash":
        _ok(grpc_client, CAPITAL, lora_path=str(adapters["rand_c"]), lora_int_id=424242)
    out = generate(grpc_client, CAPITAL, **{**GREEDY, **params})
    assert out.error is not None, f"{case}: accepted"
    assert re.search(message, out.error.message()), out.error.message()
    assert not out.chunks

    # Triton 2.51's HTTP generate endpoint answers 400 for every error a model sends in a response (its NOT_FOUND
    # included); the frontend maps the messages to OpenAI statuses.
    if "parameters" not in params and case != "NaN scale":  # JSON has no NaN
        reply = httpx.post(f"http://{triton_server.http_url}/v2/models/llm/generate",
                           json={"text_input": "hi", "max_tokens": 2, **params}, timeout=60)
        assert reply.status_code == 400, reply.text
        assert re.search(message, reply.json()["error"])

    assert _ok(grpc_client, CAPITAL, lora_name="uppercase").text.startswith("THE CAPITAL")


def _metric(url: str, name: str, model: str) -> float:
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def tight_model(http_client):
    """`llm` with 2 LoRA slots, no static adapters (tests/conftest.py writes it); unloaded afterwards."""
    http_client.load_model(TIGHT_MODEL)
    yield TIGHT_MODEL
    http_client.unload_model(TIGHT_MODEL)


def test_dora_adapter_is_served_in_a_mixed_batch_as_peft_generates(grpc_client, triton_server, lora_root, adapters):
    """A PEFT DoRA adapter: greedy tokens as PEFT's DoRA forward generates them, the same next to base, plain LoRA
    and scale-0 rows in one batch; in a LoRA stack it is refused naming it."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    dora = _random(lora_root, "dora", seed=21, use_dora=True)
    tokenizer = AutoTokenizer.from_pretrained(default_llm_model_path())
    ids = tokenizer(CAPITAL, return_tensors="pt", add_special_tokens=False).input_ids
    reference = PeftModel.from_pretrained(load_smollm2(), dora).eval()
    with torch.no_grad():
        expected = tokenizer.decode(reference.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:],
                                    skip_special_tokens=True)
    alone = _ok(grpc_client, CAPITAL, lora_path=str(dora)).text
    assert alone == expected
    base = _ok(grpc_client, CAPITAL).text
    assert alone != base
    plain = _ok(grpc_client, PROMPTS[1], lora_path=str(adapters["rand_a"])).text
    jobs = [(CAPITAL, {"lora_path": str(dora)}), (CAPITAL, {}), (PROMPTS[1], {"lora_path": str(adapters["rand_a"])}),
            (CAPITAL, {"lora_path": str(dora), "lora_scale": 0.0}), (CAPITAL, {"lora_path": str(dora)})]
    assert concurrently(triton_server, jobs) == [alone, base, plain, base, alone]
    out = generate(grpc_client, CAPITAL, lora_path=[str(dora), str(adapters["rand_a"])], **GREEDY)
    assert out.error is not None and "is a DoRA adapter (use_dora): DoRA adapters are served alone, not in a LoRA " \
        "stack" in out.error.message()
    assert _ok(grpc_client, CAPITAL, lora_path=str(dora)).text == alone  # nothing held by the refused stack


def test_more_distinct_adapters_than_slots_queue_and_none_fail(grpc_client, triton_server, adapters, tight_model):
    loras = [{"lora_path": str(adapters[f"rand_{c}"])} for c in "abcd"] + [{}]
    jobs = [(prompt, lora) for lora in loras for prompt in PROMPTS[:2]]
    alone = [_ok(grpc_client, p, model=tight_model, **lora).text for p, lora in jobs]
    evictions = _metric(triton_server.metrics_url, "multilora_lora_device_evictions_total", tight_model)
    assert concurrently(triton_server, jobs, tight_model) == alone
    # 4 adapters through 2 slots: slots were recycled, and every slot is free again.
    assert _metric(triton_server.metrics_url, "multilora_lora_device_evictions_total", tight_model) > evictions
    assert _metric(triton_server.metrics_url, "multilora_lora_slots_in_use", tight_model) == 0


def test_an_adapter_waiting_for_a_slot_is_rotated_in_and_its_wait_is_a_metric(triton_server, adapters, tight_model):
    """Two long streams hold both slots; a third adapter's request waits past max_bypass_steps, is counted as a
    rotation, shows its wait in multilora_lora_slot_wait_seconds, and is answered; the gauge reads 0 after."""
    url = triton_server.metrics_url
    rotations = _metric(url, "multilora_lora_rotations_total", tight_model)
    long = dict(max_tokens=60, ignore_eos=True)
    with ThreadPoolExecutor(3) as pool:
        holders = [pool.submit(concurrently, triton_server, [(PROMPTS[1], {"lora_path": str(adapters[f"rand_{c}"]),
                                                                          **long})], tight_model) for c in "ab"]
        deadline = time.monotonic() + 30
        while _metric(url, "multilora_lora_slots_in_use", tight_model) < 2:
            assert time.monotonic() < deadline and not any(h.done() for h in holders), "no two slots held"
            time.sleep(0.05)
        waiter = pool.submit(concurrently, triton_server, [(CAPITAL, {"lora_path": str(adapters["rand_c"])})],
                             tight_model)
        waits = []
        while not waiter.done():
            waits.append(_metric(url, "multilora_lora_slot_wait_seconds", tight_model))
            time.sleep(0.05)
        assert waiter.result()[0] and all(h.result()[0] for h in holders)
    assert max(waits) > 0, "the slot wait never showed"
    assert _metric(url, "multilora_lora_rotations_total", tight_model) >= rotations + 1
    assert _metric(url, "multilora_lora_slot_wait_seconds", tight_model) == 0


def test_cancelled_lora_stream_frees_its_slot(grpc_client, triton_server, adapters, tight_model):
    url = triton_server.metrics_url
    out = generate(grpc_client, PROMPTS[1], model=tight_model, temperature=0.0, max_tokens=2000, stream=True,
                   lora_path=str(adapters["rand_a"]), cancel_after_chunks=3)
    assert out.error is None and len(out.chunks) == 3
    deadline = time.monotonic() + 20
    while _metric(url, "multilora_lora_slots_in_use", tight_model) or _metric(
            url, "multilora_llm_num_requests_running", tight_model):
        assert time.monotonic() < deadline, "the cancelled request still holds its LoRA slot"
        time.sleep(0.1)
    # Both slots serve two other adapters at once now.
    for c in "bc":
        _ok(grpc_client, CAPITAL, model=tight_model, lora_path=str(adapters[f"rand_{c}"]))


def test_adapter_rewritten_in_place_is_reloaded(grpc_client, lora_root, adapters):
    """vLLM's load_inplace: same name and folder, new weights -> the next request uses the new weights."""
    registry = LoRARegistry(registry_file=lora_root / "registry.json", allowed_roots=[lora_root])
    folder = lora_root / "inplace"
    shutil.copytree(adapters["rand_c"], folder)
    registry.add(AdapterEntry("inplace", str(folder)))
    want_c = _ok(grpc_client, CAPITAL, lora_path=str(adapters["rand_c"])).text
    want_d = _ok(grpc_client, CAPITAL, lora_path=str(adapters["rand_d"])).text
    assert want_c != want_d
    assert _ok(grpc_client, CAPITAL, lora_name="inplace").text == want_c
    shutil.copy(adapters["rand_d"] / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    registry.add(AdapterEntry("inplace", str(folder)), replace_existing=True)
    assert _ok(grpc_client, CAPITAL, lora_name="inplace").text == want_d
    registry.remove("inplace")


# -- LoRA stacks through tritonserver ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack_adapters(lora_root):
    from backends.settings import adapters_dir

    return {"rand": _random(lora_root, "stack_rand", seed=11), "signature": adapters_dir() / "demo" / "signature",
            "image": adapters_dir() / "diffusion" / "tiny-sd3-a"}


def test_stacks_and_single_adapters_in_one_batch_keep_their_solo_tokens(grpc_client, triton_server, stack_adapters):
    import json

    both = dict(lora_name=["uppercase", "signature"], lora_scale=[1.0, 1.0])
    jobs = [(CAPITAL, both), (PROMPTS[1], dict(lora_name="uppercase")), (PROMPTS[2], {}),
            (PROMPTS[3], dict(lora_path=[str(stack_adapters["rand"]), str(stack_adapters["signature"])],
                              lora_scale=[0.5, 1.0])),
            (CAPITAL, dict(lora_name="signature"))]
    alone = [_ok(grpc_client, prompt, **lora).text for prompt, lora in jobs]
    assert alone[0] not in (alone[-1], _ok(grpc_client, CAPITAL, lora_name="uppercase").text)

    assert concurrently(triton_server, jobs) == alone
    as_parameters = _ok(grpc_client, CAPITAL, parameters={"lora_name": json.dumps(["uppercase", "signature"]),
                                                          "lora_scale": "[1.0, 1.0]"})
    assert as_parameters.text == alone[0]
    zero = _ok(grpc_client, CAPITAL, lora_name=["uppercase", "signature"], lora_scale=[0.0, 0.0])
    assert zero.text == _ok(grpc_client, CAPITAL).text


BAD_STACKS = {
    "more than max_loras_per_request": (dict(lora_name=["uppercase", "signature", "a", "b", "c"]),
                                        r"5 LoRA adapters in one request, max_loras_per_request is 4"),
    "the same adapter twice": (dict(lora_name=["uppercase", "uppercase"]),
                               r"LoRA adapter 'uppercase' \(.*uppercase\) appears twice in one request"),
    "scales of another length": (dict(lora_name=["uppercase", "signature"], lora_scale=[1.0]),
                                 r"lora_scale has 1 entries for 2 LoRA adapters"),
    "names and paths of other lengths": (lambda a: dict(lora_name=["x", "y"], lora_path=[str(a["rand"])]),
                                         r"lora_name has 2 entries but lora_path has 1"),
    "one unknown adapter": (dict(lora_name=["uppercase", "no-such-adapter"]),
                            r"LoRA adapter 'no-such-adapter' not found"),
    "an image adapter in a text stack": (lambda a: dict(lora_path=[str(a["signature"]), str(a["image"])]),
                                         r"tiny-sd3-a"),
    "a bad JSON list parameter": (dict(parameters={"lora_name": '["uppercase",'}),
                                  r"request parameter 'lora_name' is not a valid JSON array"),
}


@pytest.mark.parametrize("case", BAD_STACKS, ids=list(BAD_STACKS))
def test_bad_stack_is_refused_and_the_server_keeps_serving(case, grpc_client, stack_adapters):
    from tools.clients.llm import generate

    params, message = BAD_STACKS[case]
    params = params(stack_adapters) if callable(params) else params
    out = generate(grpc_client, CAPITAL, **{**GREEDY, **params})
    assert out.error is not None, f"{case}: accepted"
    # A streamed error carries no gRPC status: the message is what the frontend maps to 400/404 (checked there).
    assert re.search(message, out.error.message()), out.error.message()
    assert _ok(grpc_client, CAPITAL, lora_name=["uppercase"]).text.startswith("THE CAPITAL")


def test_a_stack_needing_more_slots_than_max_loras_is_refused(grpc_client, tight_model, stack_adapters):
    """The tight model has 2 slots: a stack of 3 distinct adapters could never run, so it is refused at once."""
    three = [str(stack_adapters["rand"]), str(stack_adapters["signature"]),
             str(stack_adapters["signature"].parent / "uppercase")]
    out = generate(grpc_client, CAPITAL, model=tight_model, lora_path=three, **GREEDY)
    assert out.error is not None
    assert re.search(r"the LoRA stack \[.*\] needs 3 adapter slots at once, more than max_loras \(2\)",
                     out.error.message()), out.error.message()
    assert _ok(grpc_client, CAPITAL, model=tight_model, lora_path=three[:2]).text
