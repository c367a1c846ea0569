"""DoRA adapters (PEFT `use_dora`) against PEFT's own DoRA forward: per row in mixed batches with plain LoRA rows and
base rows, at any request scale, scale 0 bit for bit the base model, eager and fixed (CUDA-graph-shaped) batches;
and every bad DoRA adapter refused naming what is wrong."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from backends.lora.adapters.files import AdapterError
from backends.lora.adapters.peft import load_adapter
from backends.lora.adapters.targets import TargetSpec
from backends.lora.layers.context import LoRAContext
from backends.lora.layers.linear import LoRALinear, patch_model
from backends.lora.ops.batch import LoRABatch, RowLoRA
from tools.fixtures.adapters import ALL_PROJECTIONS, half_scale_copy, load_smollm2, make_random_adapter, tiny_llama

WEIGHTS = "adapter_model.safetensors"
DORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], use_dora=True)
PLAIN = dict(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS)


def _peft_logits(factory, folder, ids):
    from peft import PeftModel

    model = PeftModel.from_pretrained(factory(), folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dora")
    made = {"dora": make_random_adapter(tiny_llama, root / "dora", seed=1, std=0.1, **DORA),
            "plain": make_random_adapter(tiny_llama, root / "plain", seed=2, std=0.1, **PLAIN)}
    made["dora_half"] = half_scale_copy(made["dora"], root / "dora_half")  # PEFT's scaling halved = scale 0.5
    return made


@pytest.mark.parametrize("tokens", [9, 1], ids=["prefill-segments", "decode-dense"])
def test_dora_rows_match_peft_next_to_plain_lora_and_base_rows(folders, tokens):
    ids = torch.randint(0, 256, (6, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_llama()(input_ids=ids).logits
    want = {name: _peft_logits(tiny_llama, folders[name], ids) for name in ("dora", "plain", "dora_half")}
    model = tiny_llama()
    ctx = patch_model(model, max_loras=4, max_rank=8)
    ctx.load_slot(3, load_adapter(folders["dora"], ctx.spec, max_rank=8))
    ctx.load_slot(1, load_adapter(folders["plain"], ctx.spec, max_rank=8))
    rows = [RowLoRA.one(3, 1.0), RowLoRA.one(1, 1.0), RowLoRA(), RowLoRA.one(3, 0.5), RowLoRA.one(3, 0.0),
            RowLoRA.one(3, 1.0)]
    with torch.no_grad(), ctx.use(LoRABatch.from_rows(rows)):
        got = model(input_ids=ids).logits
    for row, name in ((0, "dora"), (1, "plain"), (3, "dora_half"), (5, "dora")):
        torch.testing.assert_close(got[row], want[name][row], atol=1e-4, rtol=0)
    assert torch.equal(got[2], base[2]) and torch.equal(got[4], base[4])  # base row; DoRA at scale 0
    assert (got[0] - base[0]).abs().max() > 1e-2, "the DoRA adapter had no effect"


def test_dora_on_smollm2_matches_peft(tmp_path):
    folder = make_random_adapter(load_smollm2, tmp_path / "dora", seed=5, std=0.05, **DORA)
    ids = torch.randint(0, 49152, (2, 6), generator=torch.Generator().manual_seed(1))
    want = _peft_logits(load_smollm2, folder, ids)
    model = load_smollm2()
    ctx = patch_model(model, max_loras=2, max_rank=8)
    ctx.load_slot(0, load_adapter(folder, ctx.spec, max_rank=8))
    with torch.no_grad(), ctx.use(LoRABatch.from_rows([RowLoRA.one(0, 1.0), RowLoRA.one(0, 1.0)])):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def _layer(bias: bool, max_loras: int = 3) -> tuple[LoRALinear, LoRAContext]:
    torch.manual_seed(0)
    ctx = LoRAContext(max_loras=max_loras, max_rank=4, dtype=torch.float32, device="cpu")
    layer = LoRALinear(nn.Linear(12, 10, bias=bias), ctx, "proj")
    ctx.layers["proj"] = layer
    return layer, ctx


def _dora_module(layer: LoRALinear, ctx: LoRAContext, slot: int, seed: int):
    from backends.lora.adapters.config import LoRAConfig
    from backends.lora.adapters.peft import LoRAAdapter, ModuleLoRA

    gen = torch.Generator().manual_seed(seed)
    module = ModuleLoRA(A=torch.randn(4, 12, generator=gen) * 0.3, Bt=torch.randn(4, 10, generator=gen) * 0.3,
                        magnitude=layer.weight.detach().norm(dim=1) * (1 + 0.2 * torch.randn(10, generator=gen)))
    ctx.load_slot(slot, LoRAAdapter(path=None, config=LoRAConfig(4, 4.0, ("proj",)), modules={"proj": module}))
    return module


def _reference(layer: LoRALinear, x: torch.Tensor, module, scale: float) -> torch.Tensor:
    """PEFT's DoRA formula in float64: bias + m / ||W + c D||_row * (x W^T + c x D^T), D = B A (scaling in B)."""
    w, delta = layer.weight.double(), (module.Bt.t() @ module.A).double()
    norm = (w + scale * delta).norm(dim=1)
    out = (module.magnitude.double() / norm) * (x.double() @ (w + scale * delta).t())
    return out + (layer.bias.double() if layer.bias is not None else 0)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_varlen_step_rows_fixed_batches_and_slot_reuse(bias):
    """An engine step's rows (decode rows, then a prefill chunk), a fixed batch over the same rows (the CUDA-graph
    path, run here on CPU), and a slot that held DoRA given to a plain adapter."""
    layer, ctx = _layer(bias)
    dora = _dora_module(layer, ctx, 2, seed=1)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    rows = [RowLoRA.one(2, 1.0), RowLoRA(), RowLoRA.one(2, 0.3)]
    with torch.no_grad():
        base = layer.base(x)
        with ctx.use(LoRABatch.from_rows(rows, tokens=[1, 1, 4])):
            got = layer(x)
        torch.testing.assert_close(got[0], _reference(layer, x[:1], dora, 1.0)[0].float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[2:], _reference(layer, x[2:], dora, 0.3).float(), atol=1e-5, rtol=0)
        assert torch.equal(got[1], base[1])

        decode = LoRABatch.from_rows([RowLoRA.one(2, 0.7), RowLoRA(), RowLoRA.one(2, 0.0)])
        with ctx.use(decode):
            eager = layer(x[:3])
        fixed = ctx.ops.fixed_batch(5)
        fixed.write(decode)
        with ctx.use(fixed):
            graphed = layer(torch.cat([x[:3], torch.zeros(2, 12)]))[:3]
        torch.testing.assert_close(graphed, eager, atol=1e-6, rtol=0)
        torch.testing.assert_close(eager[0], _reference(layer, x[:1], dora, 0.7)[0].float(), atol=1e-5, rtol=0)
        assert torch.equal(graphed[1], base[1]) and torch.equal(graphed[2], base[2])

        # Another DoRA adapter in the same slot, the same batch composition: the cached gains are not reused.
        other = _dora_module(layer, ctx, 2, seed=7)
        with ctx.use(decode):
            torch.testing.assert_close(layer(x[:3])[0], _reference(layer, x[:1], other, 0.7)[0].float(), atol=1e-5,
                                       rtol=0)

        from backends.lora.adapters.config import LoRAConfig
        from backends.lora.adapters.peft import LoRAAdapter, ModuleLoRA
        plain = ModuleLoRA(A=dora.A, Bt=dora.Bt)
        ctx.load_slot(2, LoRAAdapter(path=None, config=LoRAConfig(4, 4.0, ("proj",)), modules={"proj": plain}))
        with ctx.use(LoRABatch.from_rows([RowLoRA.one(2, 1.0)])):
            torch.testing.assert_close(layer(x[:1]), base[:1] + x[:1] @ (dora.Bt.t() @ dora.A).t(), atol=1e-5,
                                       rtol=0)
        ctx.clear_slot(2)
        with ctx.use(LoRABatch.from_rows([RowLoRA.one(2, 1.0)])):
            assert torch.equal(layer(x[:1]), layer.base(x[:1]))


# -- bad DoRA adapters ---------------------------------------------------------------------------------------------
@pytest.fixture
def spec():
    return patch_model(tiny_llama(), max_loras=2, max_rank=8).spec


def _copy(folders, tmp_path):
    return shutil.copytree(folders["dora"], tmp_path / "bad")


def _edit(folder, change):
    state = load_file(folder / WEIGHTS)
    change(state)
    save_file(state, folder / WEIGHTS)


def test_a_magnitude_shaped_unlike_the_layer_is_refused(folders, spec, tmp_path):
    bad = _copy(folders, tmp_path)
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"
    _edit(bad, lambda s: s.update({key: torch.ones(64)}))
    with pytest.raises(AdapterError) as error:
        load_adapter(bad, spec, max_rank=8)
    assert str(bad) in str(error.value)
    assert ("model.layers.0.self_attn.v_proj: lora_magnitude_vector [64], expected [32] (one per output feature "
            "of the layer)") in str(error.value)


def test_missing_or_nan_magnitudes_and_magnitudes_without_use_dora_are_refused(folders, spec, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"
    missing = _copy(folders, tmp_path / "m")
    _edit(missing, lambda s: s.pop(key))
    with pytest.raises(AdapterError, match=r"use_dora is true but lora_magnitude_vector is missing for 1 targeted "
                                           r"modules: model.layers.1.self_attn.q_proj"):
        load_adapter(missing, spec, max_rank=8)
    nan = _copy(folders, tmp_path / "n")
    _edit(nan, lambda s: s[key].__setitem__(0, float("nan")))
    with pytest.raises(AdapterError, match=r"NaN or Inf values in the weights of 1 modules: "
                                           r"model.layers.1.self_attn.q_proj"):
        load_adapter(nan, spec, max_rank=8)
    plain = _copy(folders, tmp_path / "p")
    config = (plain / "adapter_config.json")
    config.write_text(config.read_text().replace('"use_dora": true', '"use_dora": false'))
    with pytest.raises(AdapterError, match=r"unexpected tensors \(not lora_A/lora_B weights\): .*lora_magnitude"):
        load_adapter(plain, spec, max_rank=8)


def test_dora_on_a_convolution_is_refused_naming_it(tmp_path):
    """A layer kind DoRA is not served on: LoCon convolutions (linear layers only)."""
    import json

    spec = TargetSpec({"conv": (3 * 9, 8)}, kernels={"conv": (3, 3, 3)})
    folder = tmp_path / "conv"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["conv"], "use_dora": True}))
    save_file({"base_model.model.conv.lora_A.weight": torch.randn(2, 3, 3, 3),
               "base_model.model.conv.lora_B.weight": torch.randn(8, 2, 1, 1),
               "base_model.model.conv.lora_magnitude_vector": torch.ones(1, 8, 1, 1)}, folder / WEIGHTS)
    with pytest.raises(AdapterError, match=r"DoRA is served on linear layers only, not on the convolutions conv"):
        load_adapter(folder, spec, max_rank=8)


def test_a_dora_adapter_in_a_lora_stack_is_refused_alone_it_is_served(folders):
    """DoRA rescalings do not compose: a stack holding one is an INVALID_ARG naming it, resident or not."""
    from backends.errors import InvalidArgument
    from backends.lora.manager.cache import LoRACache
    from backends.lora.manager.request import AdapterRef

    ctx = patch_model(tiny_llama(), max_loras=3, max_rank=8)
    cache = LoRACache(ctx, lambda ref: load_adapter(ref.path, ctx.spec, max_rank=8), max_cpu_loras=4)
    dora, plain = AdapterRef(1, "dora-a", str(folders["dora"])), AdapterRef(2, "plain-b", str(folders["plain"]))
    with pytest.raises(InvalidArgument, match=r"LoRA adapter 'dora-a' is a DoRA adapter \(use_dora\): DoRA adapters "
                                              r"are served alone, not in a LoRA stack"):
        cache.acquire([plain, dora])
    assert cache.slots_in_use() == 0  # all or nothing
    cache.acquire([dora])  # alone, and now resident in a slot
    with pytest.raises(InvalidArgument, match="'dora-a' is a DoRA adapter"):
        cache.acquire([dora, plain])
    cache.release([dora])
    assert len(cache.acquire([plain, AdapterRef(3, "plain-c", str(folders["plain"]))])) == 2
