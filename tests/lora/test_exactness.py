"""Our patched model against PEFT's own forward: same logits for mixed-adapter batches (fp32, within 1e-4)."""

from __future__ import annotations

import pytest
import torch

from backends.lora.adapters.peft import load_adapter
from backends.lora.layers.linear import patch_model
from backends.lora.ops.batch import LoRABatch
from backends.lora.ops.torch_ops import lora_apply, lora_apply_rows, plan
from tools.fixtures.adapters import ALL_PROJECTIONS, half_scale_copy, load_smollm2, make_random_adapter, tiny_llama

ADAPTERS = {
    "a": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=r".*\.(k_proj|up_proj|o_proj)",
              rank_pattern={"up_proj": 4}, alpha_pattern={"o_proj": 3}),
    "c": dict(r=4, lora_alpha=4, target_modules=ALL_PROJECTIONS, layers_to_transform=[0, 1]),
}


def _peft_reference(factory, folders, ids, names):
    from peft import PeftModel

    first, *rest = folders
    model = PeftModel.from_pretrained(factory(), folders[first], adapter_name=first)
    for name in rest:
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, adapter_names=names).logits


@pytest.mark.parametrize("tokens", [10, 1], ids=["prefill-segments", "decode-dense"])
@pytest.mark.parametrize("factory", [tiny_llama, load_smollm2], ids=["tiny-llama", "smollm2"])
def test_mixed_batch_matches_peft_per_row(factory, tokens, tmp_path):
    folders = {n: make_random_adapter(factory, tmp_path / n, seed=i, **cfg) for i, (n, cfg) in enumerate(ADAPTERS.items())}
    folders["a_half"] = half_scale_copy(folders["a"], tmp_path / "a_half")
    vocab = factory().config.vocab_size
    ids = torch.randint(0, vocab, (6, tokens), generator=torch.Generator().manual_seed(0))
    rows = ["a", "b", "__base__", "a_half", "c", "a"]
    expected = _peft_reference(factory, folders, ids, rows)

    ours = factory()
    ctx = patch_model(ours, max_loras=4, max_rank=16)
    slots = {"a": 2, "b": 0, "c": 3}  # not in row order, and slot 1 left empty
    for name, slot in slots.items():
        ctx.load_slot(slot, load_adapter(folders[name], ctx.spec, max_rank=16))
    row_slots = [slots["a"], slots["b"], -1, slots["a"], slots["c"], slots["a"]]
    row_scales = [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    with torch.no_grad(), ctx.use(LoRABatch.build(row_slots, row_scales)):
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(got[0], got[2], atol=1e-3), "adapter a had no effect"


def test_no_adapter_and_scale_zero_are_bit_identical_to_base(tmp_path):
    folder = make_random_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL_PROJECTIONS)
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
    model = tiny_llama()
    ctx = patch_model(model, max_loras=2, max_rank=8)
    ctx.load_slot(0, load_adapter(folder, ctx.spec, max_rank=8))
    with torch.no_grad():
        unset = model(input_ids=ids).logits
        with ctx.use(LoRABatch.build([-1, -1, -1], [1.0, 1.0, 1.0])):
            none = model(input_ids=ids).logits
        with ctx.use(LoRABatch.build([0, 0, 0], [0.0, 0.0, 0.0])):
            zero = model(input_ids=ids).logits
        with ctx.use(LoRABatch.build([0, -1, 0], [0.0, 1.0, 1.0])):
            mixed = model(input_ids=ids).logits
    assert torch.equal(unset, base) and torch.equal(none, base) and torch.equal(zero, base)
    assert torch.equal(mixed[:2], base[:2]) and not torch.equal(mixed[2], base[2])


def _dense_reference(y0, x, slots, scales, A, Bt, tokens_per_row=1):
    expected = y0.double().clone()
    for i in range(x.shape[0]):
        s, c = slots[i // tokens_per_row], scales[i // tokens_per_row]
        if s >= 0:
            expected[i] += c * (x[i].double() @ A[s].double().t()) @ Bt[s].double()
    return expected


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("rows,tokens,mode", [(11, 1, "dense"), (300, 1, "grouped"), (6, 9, "segments"),
                                               (1, 9, "segments")])
def test_every_path_matches_a_float64_reference(dtype, tol, rows, tokens, mode):
    gen = torch.Generator().manual_seed(rows)
    K, R, n_in, n_out = 4, 8, 32, 24
    A = torch.randn(K, R, n_in, generator=gen).to(dtype)
    Bt = torch.randn(K, R, n_out, generator=gen).to(dtype)
    A[1, 5:] = 0  # slot 1 holds a rank-5 adapter, zero-padded
    Bt[1, 5:] = 0
    slots = [[3, -1, 1, 1, 0, 3, -1, 2, 2, 2, 1][i % 11] for i in range(rows)]
    scales = [[1.0, 1.0, 0.5, 2.0, 1.0, 0.25, 0.0, 1.0, 1.0, 0.0, 1.0][i % 11] for i in range(rows)]
    if rows == 1:  # one adapter for the batch: the no-gather path
        slots, scales = [2], [0.5]
    n = rows * tokens
    x = torch.randn(n, n_in, generator=gen).to(dtype)
    y0 = torch.randn(n, n_out, generator=gen).to(dtype)
    expected = _dense_reference(y0, x, slots, scales, A, Bt, tokens)

    batch = plan(LoRABatch.build(slots, scales), max_rank=R, dtype=dtype)
    assert (batch.row_mode if tokens == 1 else "segments") == mode
    got = lora_apply(y0.clone(), x, batch, A, Bt)
    torch.testing.assert_close(got.double(), expected, atol=tol * 10, rtol=tol)
    untouched = [i for i in range(n) if slots[i // tokens] == -1 or scales[i // tokens] == 0]
    assert torch.equal(got[untouched], y0[untouched]), "rows without LoRA (or scale 0) must equal the base output"

    if tokens == 1:  # the CUDA-graph path, checked on CPU
        per_row = lora_apply_rows(y0.clone(), x, torch.tensor([max(s, 0) for s in slots]),
                                  torch.tensor([c if s >= 0 else 0.0 for s, c in zip(slots, scales)]), A, Bt)
        torch.testing.assert_close(per_row.double(), expected, atol=tol * 10, rtol=tol)


def test_one_adapter_with_other_rows_off_uses_no_gather_and_stays_exact():
    gen = torch.Generator().manual_seed(3)
    A, Bt = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 4, 6, generator=gen)
    x, y0 = torch.randn(3 * 5, 8, generator=gen), torch.randn(3 * 5, 6, generator=gen)
    slots, scales = [1, -1, 1], [1.0, 1.0, 0.25]
    got = lora_apply(y0.clone(), x, plan(LoRABatch.build(slots, scales), max_rank=4), A, Bt)
    torch.testing.assert_close(got.double(), _dense_reference(y0, x, slots, scales, A, Bt, 5), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[5:10], y0[5:10])


def test_batch_without_live_rows_is_empty():
    assert LoRABatch.build([-1, 2, -1], [1.0, 0.0, 1.0]).empty
