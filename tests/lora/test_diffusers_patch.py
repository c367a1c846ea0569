"""The same patching and mixed-adapter math on a diffusers SD3 transformer (image and text tokens of different
lengths per sample, plus per-sample embedding rows), checked against PEFT's forward with each adapter alone."""

from __future__ import annotations

import json

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from backends.lora.adapters.peft import load_adapter
from backends.lora.layers.linear import patch_model
from backends.lora.ops.batch import LoRABatch

TARGETS = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)" \
          r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear)"


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4).eval()


def make_peft_model(config: LoraConfig, seed: int):
    model = inject_adapter_in_model(config, tiny_sd3())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def save_adapter(model, config: LoraConfig, folder):
    folder.mkdir()
    save_file(get_peft_model_state_dict(model), folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))
    return folder


def test_sd3_transformer_mixed_batch_matches_peft(tmp_path):
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj"]),
        LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=["ff.net.0.proj", "ff_context.net.2",
                                                                         "norm1.linear", "to_add_out"]),
    ]
    peft_models = [make_peft_model(c, seed=i) for i, c in enumerate(configs)]
    folders = [save_adapter(m, c, tmp_path / f"a{i}") for i, (m, c) in enumerate(zip(peft_models, configs))]

    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(4, 4, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(4, 5, 16, generator=gen),
                  pooled_projections=torch.randn(4, 8, generator=gen), timestep=torch.tensor([1.0, 5.0, 9.0, 3.0]))
    row = lambda i: {k: v[i : i + 1] for k, v in inputs.items()}  # noqa: E731

    ours = tiny_sd3()
    ctx = patch_model(ours, max_loras=2, max_rank=8, targets=TARGETS)
    for slot, folder in enumerate(folders):
        ctx.load_slot(slot, load_adapter(folder, ctx.spec, max_rank=8))
    with torch.no_grad(), ctx.use(LoRABatch.build([1, -1, 0, 1], [1.0, 1.0, 1.0, 0.0])):
        got = ours(**inputs).sample

    with torch.no_grad():
        expected = [peft_models[1](**row(0)).sample, tiny_sd3()(**row(1)).sample,
                    peft_models[0](**row(2)).sample, tiny_sd3()(**row(3)).sample]
    for i, want in enumerate(expected):
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=1e-4, msg=f"row {i}")
    with torch.no_grad():
        base_row0 = tiny_sd3()(**row(0)).sample
    assert not torch.allclose(got[0:1], base_row0, atol=1e-3), "adapter had no effect"
