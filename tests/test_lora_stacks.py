"""LoRA stacks (several adapters per request, each with its scale): every batched path applies the sum of a row's
adapters' deltas, against a float64 reference; rows without LoRA stay bit-identical to the base."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from backends.lora.ops.batch import LoRABatch
from backends.lora.ops.torch_ops import DENSE_MAX_ROW_SLOTS, conv_lora_apply, lora_apply, plan
from tests.test_llm_lora_serving import CAPITAL, GREEDY, PROMPTS, _ok, _random, concurrently

# Per sequence: a stack of (slot, scale); [] = base. Mixed depths, shared and distinct adapters, a zero scale.
STACKS = [[(0, 0.7), (1, 0.3)], [(0, 1.0)], [], [(2, 0.5), (1, 1.0)], [(3, 1.0), (2, 0.0), (0, 2.0)], [(1, 0.25)]]


def _padded(stacks: list[list[tuple[int, float]]]) -> tuple[list[list[int]], list[list[float]]]:
    depth = max(1, max(len(s) for s in stacks))
    slots = [[s for s, _ in st] + [-1] * (depth - len(st)) for st in stacks]
    scales = [[c for _, c in st] + [0.0] * (depth - len(st)) for st in stacks]
    return slots, scales


def _reference(y0, x, stacks, A, Bt, tokens):
    out = y0.double().clone()
    for row in range(x.shape[0]):
        for slot, scale in stacks[row // tokens]:
            out[row] += scale * (x[row].double() @ A[slot].double().t()) @ Bt[slot].double()
    return out


@pytest.mark.parametrize("rows,tokens,mode", [(6, 1, "dense"), (6 * 30, 1, "grouped"), (6, 7, "segments")])
def test_a_stack_applies_the_sum_of_its_adapters_on_every_path(rows, tokens, mode):
    gen = torch.Generator().manual_seed(rows + tokens)
    K, R, n_in, n_out = 4, 8, 32, 24
    A, Bt = torch.randn(K, R, n_in, generator=gen), torch.randn(K, R, n_out, generator=gen)
    A[1, 5:], Bt[1, 5:] = 0, 0  # a rank-5 adapter, zero-padded
    stacks = [STACKS[i % len(STACKS)] for i in range(rows)]
    x = torch.randn(rows * tokens, n_in, generator=gen)
    y0 = torch.randn(rows * tokens, n_out, generator=gen)
    lora = LoRABatch.build(*_padded(stacks))
    batch = plan(lora, max_rank=R)
    assert (batch.row_mode if tokens == 1 else "segments") == mode
    assert lora.live_slots == {0, 1, 2, 3}
    got = lora_apply(y0.clone(), x, batch, A, Bt)
    torch.testing.assert_close(got.double(), _reference(y0, x, stacks, A, Bt, tokens), atol=1e-4, rtol=1e-5)
    base_rows = [i for i in range(rows * tokens) if not stacks[i // tokens]]
    assert torch.equal(got[base_rows], y0[base_rows])


def test_all_scales_zero_is_the_base_bit_for_bit_and_one_column_equals_the_single_adapter_form():
    gen = torch.Generator().manual_seed(0)
    A, Bt = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 4, 6, generator=gen)
    x, y0 = torch.randn(12, 8, generator=gen), torch.randn(12, 6, generator=gen)
    zero = plan(LoRABatch.build([[0, 1], [2, -1]], [[0.0, 0.0], [0.0, 0.0]]), max_rank=4)
    assert zero.empty and torch.equal(lora_apply(y0.clone(), x, zero, A, Bt), y0)
    for tokens in (1, 6):
        n = 12 // tokens
        slots, scales = [i % 3 - 1 for i in range(n)], [0.5 + i for i in range(n)]
        flat = lora_apply(y0.clone(), x, plan(LoRABatch.build(slots, scales), max_rank=4), A, Bt)
        column = lora_apply(y0.clone(), x, plan(LoRABatch.build([[s] for s in slots], [[c] for c in scales]),
                                                max_rank=4), A, Bt)
        assert torch.equal(flat, column)


def test_stack_shapes_must_agree():
    with pytest.raises(ValueError, match="slot ids of shape"):
        LoRABatch.build([[0, 1]], [[1.0]])
    assert 6 * 4 <= DENSE_MAX_ROW_SLOTS  # the dense case above really is dense


def test_conv_stack_sums_each_adapters_locon_delta():
    gen = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    R, K = 2, 3
    A = torch.randn(K, R, 3 * 9, generator=gen)
    Bt = torch.randn(K, R, 5, generator=gen)
    stacks = [[(0, 0.7), (2, 0.3)], [], [(1, 1.0)]]
    x = torch.randn(3, 3, 8, 8, generator=gen)
    with torch.no_grad():
        y0 = conv(x)
        got = conv_lora_apply(y0.clone(), x, plan(LoRABatch.build(*_padded(stacks)), max_rank=R), A, Bt, conv, 0, 3)
        expected = y0.clone()
        for row, stack in enumerate(stacks):
            for slot, scale in stack:
                down = torch.nn.functional.conv2d(x[row:row + 1], A[slot].view(R, 3, 3, 3), None, 2, 1)
                expected[row] += scale * torch.einsum("rhw,ro->ohw", down[0], Bt[slot])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], y0[1])


# -- against independent references ------------------------------------------------------------------------------

def test_llm_stack_equals_peft_with_both_adapters_active(tmp_path):
    """Rows [a@0.7 + b@0.3, base, a, b@0.5 + a@2.0] in one batch against PEFT with several adapters active at once
    (`set_adapter([...])`) and per-adapter scales (`set_scale`): last-position logits (1e-4) and 8 greedy tokens."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from backends.llm.runner import ModelRunner, RunnerSettings
    from backends.lora.manager.config import LoRAServingConfig
    from backends.lora.ops.batch import RowLoRA
    from backends.lora.adapters.peft import load_adapter
    from scripts.llm_families import make_family
    from scripts.make_adapters import make_random_adapter
    from tests.test_llm_families import PROMPTS, Rows, _generate, _last_logits, _load

    folder = make_family("llama")
    factory = lambda: _load(folder)  # noqa: E731
    adapters = {"a": make_random_adapter(factory, tmp_path / "a", seed=1, std=0.1, r=8, lora_alpha=16,
                                         target_modules="all-linear"),
                "b": make_random_adapter(factory, tmp_path / "b", seed=2, std=0.1, r=4, lora_alpha=4,
                                         target_modules=["q_proj", "v_proj", "down_proj"])}
    runner = ModelRunner(folder, lora=LoRAServingConfig(max_loras=2, max_lora_rank=8),
                         settings=RunnerSettings(max_model_len=96, max_num_seqs=4))
    for slot, name in enumerate(adapters):
        runner.lora.load_slot(slot, load_adapter(adapters[name], runner.lora.spec, 8))
    stacks = [{"a": 0.7, "b": 0.3}, {}, {"a": 1.0}, {"b": 0.5, "a": 2.0}]
    slot_of = {"a": 0, "b": 1}
    logits, tokens = Rows(runner, [RowLoRA.stack([(slot_of[n], c) for n, c in s.items()]) for s in stacks]).run()

    peft = PeftModel.from_pretrained(factory(), adapters["a"], adapter_name="a")
    peft.load_adapter(adapters["b"], adapter_name="b")
    peft.eval()
    for row, (prompt, stack) in enumerate(zip(PROMPTS, stacks)):
        ids = runner.encode(prompt)
        if not stack:
            with peft.disable_adapter():
                want_logits, want_tokens = _last_logits(peft, ids), _generate(peft, ids)
        else:
            peft.base_model.set_adapter(list(stack))
            for module in peft.modules():
                if isinstance(module, LoraLayer):
                    for name, scale in stack.items():
                        if name in module.scaling:
                            module.set_scale(name, scale)
            want_logits, want_tokens = _last_logits(peft, ids), _generate(peft, ids)
        torch.testing.assert_close(logits[row], want_logits, atol=1e-4, rtol=0, msg=lambda m: f"row {row}: {m}")
        assert tokens[row] == want_tokens, f"row {row} ({stack})"
    alone = _last_logits(peft, runner.encode(PROMPTS[3]))  # the last setting: b@0.5 + a@2.0
    torch.testing.assert_close(logits[3], alone, atol=1e-4, rtol=0)


def test_diffusion_stack_equals_diffusers_set_adapters_with_both():
    """SDXL, a PEFT adapter and a kohya file (plus a LoCon) in stacks, one batch: [a@0.7 + b@0.3], [], [b@0.5 +
    locon@0.7 + a@1.0], [a@0 + b@0] each equal diffusers `load_lora_weights` for all + `set_adapters([...],
    adapter_weights=[...])` (fp32, 1e-5); all-zero scales equal the base bit for bit."""
    from backends.diffusion.generate import ImageLimits, build_request
    from backends.diffusion.pipeline import load_pipeline
    from backends.lora.manager.request import AdapterRef
    from backends.lora.manager.request import LoRASelection
    from scripts.make_fixtures import fixtures_dir
    from tests.test_diffusion_families import A, FAMILIES, SIZE, STEPS, _served, _weight_name

    family = FAMILIES["sdxl"]
    loaded, lora, cache, generator = _served(family.pipeline)
    refs = {n: AdapterRef(i + 1, n, str(A / path)) for i, (n, path) in enumerate(family.ours.items())}
    stacks = [{"a": 0.7, "b": 0.3}, {}, {"b": 0.5, "locon": 0.7, "a": 1.0}, {"a": 0.0, "b": 0.0}]
    batch = [build_request(loaded, ImageLimits(), prompt=f"prompt {i}", height=SIZE, width=SIZE, steps=STEPS,
                           seed=i, lora=tuple(LoRASelection(refs[n], c) for n, c in stack.items()))
             for i, stack in enumerate(stacks)]
    assert generator.plan(batch) == [[0, 1, 2, 3]]  # three distinct adapters fit the three slots: one batch
    kwargs = {**generator.pipeline_kwargs(batch), "output_type": "latent"}
    slot_of = dict(zip(refs, cache.acquire(list(refs.values()))))
    depth = max(len(s) for s in stacks)
    with torch.inference_mode(), lora.use(LoRABatch.build(
            [[slot_of[n] for n in s] + [-1] * (depth - len(s)) for s in stacks],
            [list(s.values()) + [0.0] * (depth - len(s)) for s in stacks])):
        got = loaded.pipe(**kwargs).images

    reference = load_pipeline(str(fixtures_dir() / family.pipeline)).pipe
    with torch.inference_mode():  # fresh kwargs: the call above advanced the seeded generators
        base = reference(**{**generator.pipeline_kwargs(batch), "output_type": "latent"}).images
    assert torch.equal(got[1], base[1]) and torch.equal(got[3], base[3])
    for name, path in family.reference.items():
        reference.load_lora_weights(str(A / path), adapter_name=name, **_weight_name(A / path))
    for i in (0, 2):
        reference.set_adapters(list(stacks[i]), adapter_weights=list(stacks[i].values()))
        one = {**generator.pipeline_kwargs(batch[i : i + 1]), "output_type": "latent"}
        with torch.inference_mode():
            want = reference(**one).images[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4, msg=f"row {i} ({stacks[i]})")
        assert (want - base[i]).abs().max() > 1e-3


# -- through tritonserver ----------------------------------------------------------------------------------------

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


BAD = {
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


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_stack_is_refused_and_the_server_keeps_serving(case, grpc_client, stack_adapters):
    from tests.llm_client import generate

    params, message = BAD[case]
    params = params(stack_adapters) if callable(params) else params
    out = generate(grpc_client, CAPITAL, **{**GREEDY, **params})
    assert out.error is not None, f"{case}: accepted"
    # A streamed error carries no gRPC status: the message is what the frontend maps to 400/404 (checked there).
    assert re.search(message, out.error.message()), out.error.message()
    assert _ok(grpc_client, CAPITAL, lora_name=["uppercase"]).text.startswith("THE CAPITAL")


def test_a_stack_needing_more_slots_than_max_loras_is_refused(grpc_client, http_client, stack_adapters):
    """The tight model has 2 slots: a stack of 3 distinct adapters could never run, so it is refused at once."""
    from tests.conftest import TIGHT_MODEL
    from tests.llm_client import generate

    three = [str(stack_adapters["rand"]), str(stack_adapters["signature"]),
             str(stack_adapters["signature"].parent / "uppercase")]
    http_client.load_model(TIGHT_MODEL)
    try:
        out = generate(grpc_client, CAPITAL, model=TIGHT_MODEL, lora_path=three, **GREEDY)
        assert out.error is not None
        assert re.search(r"the LoRA stack \[.*\] needs 3 adapter slots at once, more than max_loras \(2\)",
                         out.error.message()), out.error.message()
        assert _ok(grpc_client, CAPITAL, model=TIGHT_MODEL, lora_path=three[:2]).text
    finally:
        http_client.unload_model(TIGHT_MODEL)


def test_four_image_requests_with_four_stacks_share_one_batch(triton_server, http_client):
    """Four requests, four different stacks (LoRA fields as JSON-array request parameters), arrive together: Triton
    batches them (metric), and each image is within 1/255 of its solo image; a stack as tensors equals the
    parameter form."""
    import tritonclient.http as httpclient

    from scripts.diffusion_client import generate
    from scripts.make_fixtures import diffusion_adapters_dir
    from tests.conftest import BATCHED_MODEL
    from tests.test_diffusion_serving import _batches, _max_diff, _together

    a_file = str(diffusion_adapters_dir() / "tiny-sd3-a-diffusers")  # a's weights, another adapter by path
    rows = [dict(lora_name=["tiny-sd3-a", "tiny-sd3-b"], lora_scale=[0.7, 0.3]),
            dict(lora_name=["tiny-sd3-b", "tiny-sd3-a"], lora_scale=[1.0, 0.5]),
            dict(lora_path=[a_file, str(diffusion_adapters_dir() / "tiny-sd3-b")], lora_scale=[0.5, 0.5]),
            dict(lora_name=["tiny-sd3-a"])]
    rows = [{"negative_prompt": "", "num_inference_steps": 2, "seed": i, "prompt": "a red cat", **row}
            for i, row in enumerate(rows)]
    client = httpclient.InferenceServerClient(triton_server.http_url, network_timeout=300)
    try:
        solo = [generate(client, **row)[0][0] for row in rows]
        assert len(set(solo)) == 4
        assert generate(client, lora_as_tensors=True, **rows[0])[0][0] == solo[0]
        http_client.load_model(BATCHED_MODEL)
        try:
            before = _batches(triton_server, BATCHED_MODEL)
            batched = _together(triton_server, BATCHED_MODEL, rows)
            assert _batches(triton_server, BATCHED_MODEL) - before == 1, "the 4 requests did not share one batch"
        finally:
            http_client.unload_model(BATCHED_MODEL)
    finally:
        client.close()
    for i, (got, want) in enumerate(zip(batched, solo)):
        assert _max_diff(got, want) <= 1, f"row {i} differs from its solo image"


def test_verify_lora_stack_mode(triton_server, tmp_path):
    """scripts/verify_lora.py --stack: base, each adapter alone, the stack, the zero stack (= base, bit for bit)."""
    from tests.test_diffusion_serving import _verify

    run = _verify(triton_server, "--stack", "tiny-sd3-a@0.7", "tiny-sd3-b@0.3", "--out", str(tmp_path / "s.png"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stack @ 0 vs base" in run.stdout and "stack vs tiny-sd3-b@0.3" in run.stdout
    assert "LoRA verified" in run.stdout
    run = _verify(triton_server, "--stack", "tiny-sd3-a", "tiny-sd3-a", "--out", str(tmp_path / "d.png"))
    assert run.returncode == 2 and "appears twice in one request" in " ".join(run.stdout.split())  # rich wraps


def test_diffusion_planner_counts_every_adapter_of_a_stack_against_the_slots():
    from backends.diffusion.generate import ImageLimits, build_request
    from backends.lora.manager.request import AdapterRef
    from backends.lora.manager.request import LoRASelection
    from tests.test_diffusion_families import A, FAMILIES, SIZE, _served

    family = FAMILIES["sdxl"]
    loaded, _, _, generator = _served(family.pipeline, max_loras=2)
    refs = {n: AdapterRef(i + 1, n, str(A / path)) for i, (n, path) in enumerate(family.ours.items())}

    def req(*names):
        return build_request(loaded, ImageLimits(), prompt="x", height=SIZE, width=SIZE, steps=1,
                             lora=tuple(LoRASelection(refs[n], 1.0) for n in names))

    assert generator.plan([req("a", "b"), req("a"), req("b"), req()]) == [[0, 1, 2, 3]]
    assert generator.plan([req("a", "b"), req("locon"), req("b", "locon")]) == [[0], [1, 2]]
