"""Every bad adapter is refused with one error that names the folder and every problem found."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from backends.errors import InvalidArgument, NotFound
from backends.lora.adapters.files import AdapterError, AdapterNotFoundError
from backends.lora.adapters.peft import load_adapter
from backends.lora.layers.linear import patch_model
from tools.fixtures.adapters import ALL_PROJECTIONS, make_random_adapter, tiny_llama

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def spec():
    ctx = patch_model(tiny_llama(), max_loras=2, max_rank=16)
    return ctx.spec


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_random_adapter(tiny_llama, tmp_path_factory.mktemp("good") / "lora", r=8, lora_alpha=16,
                               target_modules=ALL_PROJECTIONS, base_name="tiny-random-llama")


@pytest.fixture
def bad(good, tmp_path):
    """A fresh copy of the good adapter to break."""
    import shutil

    return shutil.copytree(good, tmp_path / "bad")


def edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))


def edit_weights(folder, change):
    state = load_file(folder / WEIGHTS)
    change(state)
    save_file(state, folder / WEIGHTS)


def refused(folder, spec, *fragments, max_rank=16, **kw):
    with pytest.raises(AdapterError) as info:
        load_adapter(folder, spec, max_rank=max_rank, **kw)
    message = str(info.value)
    assert str(folder) in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, InvalidArgument)
    return info.value


def test_good_adapter_loads_with_scaling_folded_into_b(good, spec):
    adapter = load_adapter(good, spec, max_rank=16)
    assert len(adapter.modules) == 14 and adapter.rank == 8
    raw = load_file(good / WEIGHTS)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    torch.testing.assert_close(adapter.modules["model.layers.1.mlp.up_proj"].Bt, raw[key].t() * (16 / 8))


def test_bin_weights_load_like_safetensors(good, bad, spec):
    torch.save(load_file(bad / WEIGHTS), bad / "adapter_model.bin")
    (bad / WEIGHTS).unlink()
    a, b = load_adapter(good, spec, 16), load_adapter(bad, spec, 16)
    assert all(torch.equal(a.modules[n].Bt, b.modules[n].Bt) for n in a.modules)


def test_missing_folder_is_not_found(tmp_path, spec):
    with pytest.raises(AdapterNotFoundError) as info:
        load_adapter(tmp_path / "nope", spec, 16)
    assert isinstance(info.value, NotFound) and str(tmp_path / "nope") in str(info.value)


def test_missing_config(bad, spec):
    (bad / "adapter_config.json").unlink()
    refused(bad, spec, "adapter_config.json is missing")


def test_invalid_json(bad, spec):
    (bad / "adapter_config.json").write_text("{not json")
    refused(bad, spec, "not valid JSON")


def test_missing_fields_are_all_reported_together(bad, spec):
    edit_config(bad, r=None, lora_alpha=None, target_modules=None)
    error = refused(bad, spec, "'r' is missing", "'lora_alpha' is missing", "'target_modules' is missing")
    assert len(error.problems) == 3


def test_not_lora(bad, spec):
    edit_config(bad, peft_type="IA3")
    refused(bad, spec, "peft_type is 'IA3'")


def test_rank_above_max(bad, spec):
    refused(bad, spec, "rank 8 exceeds max_lora_rank 4", max_rank=4)


def test_modules_to_save_and_use_dora_without_magnitudes_refused(bad, spec):
    edit_config(bad, modules_to_save=["lm_head"])
    refused(bad, spec, "modules_to_save")
    edit_config(bad, modules_to_save=None, use_dora=True)
    refused(bad, spec, "use_dora is true but lora_magnitude_vector is missing for 14 targeted modules")


def test_missing_and_extra_tensors(bad, spec):
    def change(state):
        del state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        state["base_model.model.model.layers.0.self_attn.q_proj.magnitude"] = torch.zeros(3)
        state["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 64)
    edit_weights(bad, change)
    refused(bad, spec, "missing for 1 targeted modules: model.layers.0.self_attn.q_proj",
            "unexpected tensors", "q_proj.magnitude", "does not have or does not LoRA-enable: model.layers.9.mlp.up_proj")


def test_shape_mismatch_with_another_architecture(tmp_path, spec):
    from transformers import LlamaConfig, LlamaForCausalLM

    def wider():
        return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))

    folder = make_random_adapter(wider, tmp_path / "wide", r=8, lora_alpha=8, target_modules=["q_proj"])
    refused(folder, spec, "shape mismatch with the served model at 2 modules", "expected [8, 64]")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_weights(bad, spec, value):
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    edit_weights(bad, lambda s: s[key].__setitem__((0, 0), value))
    refused(bad, spec, "NaN or Inf values", "model.layers.1.mlp.down_proj")


def test_truncated_safetensors(bad, spec):
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused(bad, spec, "is not valid safetensors")


def test_garbage_safetensors(bad, spec):
    (bad / WEIGHTS).write_bytes(b"this is not a tensor file at all" * 10)
    refused(bad, spec, "is not valid safetensors")


def test_huge_header_safetensors(bad, spec):
    (bad / WEIGHTS).write_bytes(struct.pack("<Q", 2**60) + b"{}")
    refused(bad, spec, "exceeds 100 MB")


def test_targets_matching_zero_layers(bad, spec):
    edit_config(bad, target_modules=["to_q", "to_v"])  # a diffusion adapter's targets
    refused(bad, spec, "match zero layers")


def test_other_base_model_warns_or_refuses(bad, spec, caplog):
    edit_config(bad, base_model_name_or_path="meta-llama/Llama-3-8B")
    with caplog.at_level(logging.WARNING):
        load_adapter(bad, spec, 16)
    assert "trained for 'meta-llama/Llama-3-8B'" in caplog.text
    refused(bad, spec, "trained for 'meta-llama/Llama-3-8B'", refuse_other_base=True)


def test_regex_targets_and_layers_to_transform(tmp_path, spec):
    folder = make_random_adapter(tiny_llama, tmp_path / "rx", r=4, lora_alpha=4,
                                 target_modules=r".*\.1\.self_attn\.(q|v)_proj")
    assert sorted(load_adapter(folder, spec, 16).modules) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    folder = make_random_adapter(tiny_llama, tmp_path / "layers", r=4, lora_alpha=4,
                                 target_modules=["q_proj", "down_proj"], layers_to_transform=[0])
    assert sorted(load_adapter(folder, spec, 16).modules) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    edit_config(folder, target_modules=".*q_proj")
    refused(folder, spec, "layers_to_transform cannot be combined with a regex")
