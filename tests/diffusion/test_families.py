"""Model families in-process: tiny SDXL (two CLIP encoders, pooled embeddings, LoCon on UNet convolutions), Flux
(CLIP + T5, packed latents, embedded guidance) and SD3. Each row of a mixed-adapter batch, run through the served
call (`DiffusionGenerator.pipeline_kwargs` + per-row LoRA), equals diffusers' `load_lora_weights` +
`set_adapters([name], adapter_weights=[scale])` with that adapter alone; rows without LoRA equal the unpatched
pipeline bit for bit; bad adapters are refused with messages naming the file and the modules."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from backends.diffusion.generate import DiffusionGenerator, ImageLimits, build_request, encode_png
from backends.diffusion.lora import PipelineLoRA
from backends.diffusion.pipeline import load_pipeline
from backends.errors import InvalidArgument
from backends.lora.adapters.config import LoRAConfig
from backends.lora.adapters.files import AdapterError
from backends.lora.adapters.peft import LoRAAdapter, ModuleLoRA
from backends.lora.layers.context import LoRAContext
from backends.lora.layers.conv import patch_convs
from backends.lora.manager.cache import LoRACache
from backends.lora.manager.request import AdapterRef, LoRASelection
from backends.lora.ops.batch import LoRABatch
from tools.fixtures.pipelines import TINY_FLUX, TINY_SD3, TINY_SDXL, diffusion_adapters_dir, fixtures_dir

A = diffusion_adapters_dir()
SIZE, STEPS = 32, 2


@dataclass(frozen=True)
class Family:
    pipeline: str
    ours: dict[str, str]  # adapter -> what the server loads (PEFT folder, kohya or diffusers file)
    reference: dict[str, str]  # adapter -> the same weights as diffusers loads them (file in the folder)
    rows: tuple[tuple[str | None, float], ...]


MIXED = (("a", 1.0), (None, 0.0), ("b", 1.0), ("a", 0.5), ("b", 0.0))
FAMILIES = {
    # b: ours reads the kohya file (lora_unet_/lora_te1_/lora_te2_), diffusers the diffusers file of the same
    # weights (diffusers' kohya text-encoder path does not reach transformers 5's CLIPTextModel). locon: ours reads
    # the PEFT folder (4-D lora_A), diffusers the kohya LoCon file of the same weights.
    "sdxl": Family(TINY_SDXL, {"a": "tiny-sdxl-a", "b": "tiny-sdxl-b-kohya", "locon": "tiny-sdxl-locon"},
                   {"a": "tiny-sdxl-a-diffusers", "b": "tiny-sdxl-b-diffusers", "locon": "tiny-sdxl-locon-kohya"},
                   MIXED + (("locon", 1.0), ("locon", 0.7))),
    "flux": Family(TINY_FLUX, {"a": "tiny-flux-a", "b": "tiny-flux-b"},
                   {"a": "tiny-flux-a-diffusers", "b": "tiny-flux-b"}, MIXED),
    "sd3": Family(TINY_SD3, {"a": "tiny-sd3-a", "b": "tiny-sd3-b"},
                  {"a": "tiny-sd3-a-diffusers", "b": "tiny-sd3-b"}, MIXED),
}


def _served(pipeline: str, max_loras: int = 3):
    loaded = load_pipeline(str(fixtures_dir() / pipeline))
    lora = PipelineLoRA(loaded, max_loras=max_loras, max_rank=8)
    cache = LoRACache(lora.context, lambda ref: lora.load(ref.path), max_cpu_loras=4)
    return loaded, lora, cache, DiffusionGenerator(loaded, ImageLimits(), lora, cache)


def _requests(loaded, family: Family, refs: dict[str, AdapterRef]):
    return [build_request(loaded, ImageLimits(), prompt=f"prompt {i}", height=SIZE, width=SIZE, steps=STEPS,
                          seed=i, lora=() if name is None else (LoRASelection(refs[name], scale),))
            for i, (name, scale) in enumerate(family.rows)]


def _weight_name(folder) -> dict:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    return {} if files == ["pytorch_lora_weights.safetensors"] else {"weight_name": files[0]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_rows_match_diffusers_with_each_adapter_alone(family):
    fam = FAMILIES[family]
    loaded, lora, cache, generator = _served(fam.pipeline)
    refs = {n: AdapterRef(i + 1, n, str(A / path)) for i, (n, path) in enumerate(fam.ours.items())}
    batch = _requests(loaded, fam, refs)
    kwargs = {**generator.pipeline_kwargs(batch), "output_type": "latent"}
    assert "negative_prompt" not in kwargs  # no row has one: SDXL must get its zero negative embeddings
    slot_of = dict(zip(refs, cache.acquire(list(refs.values()))))
    with torch.inference_mode(), lora.use(LoRABatch.build([-1 if n is None else slot_of[n] for n, _ in fam.rows],
                                                          [s for _, s in fam.rows])):
        got = loaded.pipe(**kwargs).images
    assert got.shape[0] == len(fam.rows)

    unpatched = load_pipeline(str(fixtures_dir() / fam.pipeline)).pipe
    base_kwargs = {**generator.pipeline_kwargs(batch), "output_type": "latent"}
    with torch.inference_mode():
        base = unpatched(**base_kwargs).images
    for i, (name, scale) in enumerate(fam.rows):
        if name is None or scale == 0:
            assert torch.equal(got[i], base[i]), f"row {i} ({name}@{scale}) differs from the base model"

    reference = unpatched  # its layers are untouched by ours: diffusers injects its own
    for name, path in fam.reference.items():
        reference.load_lora_weights(str(A / path), adapter_name=name, **_weight_name(A / path))
    if "locon" in fam.ours:  # the LoCon rows really ran conv LoRA, ours and diffusers' (PEFT's LoRA Conv2d)
        assert slot_of["locon"] in lora.context.layers["unet.down_blocks.0.resnets.0.conv1"].loaded_slots
        assert "locon" in reference.unet.down_blocks[0].resnets[0].conv1.lora_A
    for i, (name, scale) in enumerate(fam.rows):
        if name is None or scale == 0:
            continue
        reference.set_adapters([name], adapter_weights=[scale])
        one = {**generator.pipeline_kwargs(batch[i : i + 1]), "output_type": "latent"}
        with torch.inference_mode():
            want = reference(**one).images[0]
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-4, msg=f"row {i} ({name}@{scale})")
        assert (want - base[i]).abs().max() > 1e-3, f"adapter {name} had no effect on row {i}"


@pytest.mark.parametrize("rows", [
    [(1, 1.0), (-1, 0.0), (2, 0.7), (1, 0.5), (2, 0.0)],  # some rows without LoRA: only the others convolve
    [(2, 1.0), (1, 0.3), (2, 0.7), (1, 0.5), (1, 2.0)],  # every row
], ids=["some-rows", "all-rows"])
def test_two_locon_adapters_in_one_conv_batch_match_the_per_row_formula(rows):
    """Two LoCon slots of different ranks in one batch (the stacked down conv over both), a strided padded
    conv: y_i = base(x_i) + c_i * conv1x1(conv(x_i, A_s, stride, padding), B_s); rows without LoRA bit-identical."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Conv2d(6, 10, 3, stride=2, padding=1)
    model = torch.nn.Sequential(base)
    context = LoRAContext(max_loras=3, max_rank=4, dtype=torch.float32, device="cpu")
    patch_convs(model, context, r"0")
    weights = {}
    for slot, r in ((1, 2), (2, 4)):
        a, b = torch.randn(r, 6, 3, 3, generator=gen), torch.randn(10, r, generator=gen)
        weights[slot] = (a, b)
        module = ModuleLoRA(A=a.reshape(r, -1), Bt=b.t().contiguous())
        context.load_slot(slot, LoRAAdapter(path=None, config=LoRAConfig(r, r, ("0",)), modules={"0": module}))
    x = torch.randn(5, 6, 9, 9, generator=gen)
    with torch.no_grad(), context.use(LoRABatch.build([s for s, _ in rows], [c for _, c in rows])):
        got = model(x)
    with torch.no_grad():
        plain = base(x)
        want = plain.clone()
        for i, (slot, scale) in enumerate(rows):
            if slot >= 0 and scale:
                a, b = weights[slot]
                h = torch.nn.functional.conv2d(x[i : i + 1], a, stride=2, padding=1)
                want[i] += scale * torch.nn.functional.conv2d(h, b[:, :, None, None])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for i, (slot, scale) in enumerate(rows):
        assert (slot >= 0 and scale != 0) or torch.equal(got[i], plain[i]), f"row {i}"


@pytest.fixture(scope="module")
def sdxl():
    return _served(TINY_SDXL, max_loras=2)


def test_flux_adapter_on_sdxl_is_refused_naming_file_and_modules(sdxl):
    _, lora, _, _ = sdxl
    with pytest.raises(AdapterError) as err:
        lora.load(str(A / "tiny-flux-b"))
    message = str(err.value)
    assert "tiny-flux-b/pytorch_lora_weights.safetensors" in message
    assert "does not LoRA-enable" in message and "transformer.single_transformer_blocks.0.attn.to_q" in message
    assert "this StableDiffusionXLPipeline has no transformer" in message


def test_locon_kernel_mismatch_is_refused_then_a_good_request_runs(sdxl, tmp_path):
    loaded, lora, cache, generator = sdxl
    state = load_file(A / "tiny-sdxl-locon-kohya" / "tiny-sdxl-locon.safetensors")
    key = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"
    assert state[key].shape[2:] == (3, 3)
    state[key] = state[key][:, :, 1:2, 1:2].contiguous()  # a 1x1 LoCon kernel for a 3x3 convolution
    save_file(state, tmp_path / "bad-locon.safetensors")
    with pytest.raises(AdapterError) as err:
        lora.load(str(tmp_path / "bad-locon.safetensors"))
    message = str(err.value)
    assert "bad-locon.safetensors" in message and "unet.down_blocks.0.resnets.0.conv1" in message
    assert "lora_A [4, 16, 1, 1]" in message and "expected [4, 16, 3, 3] (the layer's 3x3 kernel)" in message

    good = LoRASelection(AdapterRef(7, "locon", str(A / "tiny-sdxl-locon-kohya")), 1.0)
    batch = [build_request(loaded, generator.limits, prompt="a cat", height=SIZE, width=SIZE, steps=1, seed=1,
                           num_images=2, lora=(good,)),
             build_request(loaded, generator.limits, prompt="a dog", negative_prompt="blurry", height=SIZE,
                           width=SIZE, steps=1, seed=2)]
    result = generator.run(batch)
    assert [len(images) for images in result.images] == [2, 1]
    assert all(png.startswith(b"\x89PNG") for images in result.images for png in images)
    assert cache.slots_in_use() == 0


def test_flux_refuses_negative_prompt_and_serves_sizes_in_multiples_of_16():
    loaded = load_pipeline(str(fixtures_dir() / TINY_FLUX))
    assert (loaded.size_factor, loaded.default_size) == (16, 64)
    with pytest.raises(InvalidArgument, match="takes no negative_prompt"):
        build_request(loaded, ImageLimits(), prompt="a cat", negative_prompt="blurry")
    with pytest.raises(InvalidArgument, match="height must be a multiple of 16"):
        build_request(loaded, ImageLimits(), prompt="a cat", height=40)
    request = build_request(loaded, ImageLimits(), prompt="a cat", negative_prompt="", steps=1, seed=3)
    assert (request.height, request.width) == (64, 64)


def test_flux_true_cfg_scale_runs_its_negative_prompt_pass_as_diffusers_does():
    """vLLM-Omni's true_cfg_scale: on Flux (guidance embedded) it turns on the second, negative-prompt pass."""
    loaded = load_pipeline(str(fixtures_dir() / TINY_FLUX))
    limits = ImageLimits()
    fields = dict(prompt="a cat", height=32, width=32, steps=1, seed=3)
    request = build_request(loaded, limits, negative_prompt="blurry", true_cfg_scale=2.0, **fields)
    with pytest.raises(InvalidArgument, match="without true_cfg_scale > 1"):
        build_request(loaded, limits, negative_prompt="blurry", true_cfg_scale=1.0, **fields)
    with pytest.raises(InvalidArgument, match="true_cfg_scale 2.0 needs a negative_prompt"):
        build_request(loaded, limits, true_cfg_scale=2.0, **fields)  # diffusers would skip the pass silently
    generator = DiffusionGenerator(loaded, limits)
    (png,) = generator.run([request]).images[0]
    want = loaded.pipe(prompt=["a cat"], negative_prompt=["blurry"], true_cfg_scale=2.0, height=32, width=32,
                       num_inference_steps=1, generator=[torch.Generator("cpu").manual_seed(3)],
                       output_type="pil").images[0]
    assert png == encode_png(want)
    (plain,) = generator.run([build_request(loaded, limits, **fields)]).images[0]
    assert plain != png
    # Never one denoising call: diffusers runs the true-CFG pass for the whole call once a row has a negative prompt.
    assert build_request(loaded, limits, **fields).batch_key != request.batch_key


def test_text_encoder_names_from_transformers_4_files_load(sdxl, tmp_path):
    """Kohya files name CLIPTextModel's layers under text_model (transformers 4); transformers 5 has no such level."""
    _, lora, _, _ = sdxl
    state = load_file(A / "tiny-sdxl-b-kohya" / "tiny-sdxl-b.safetensors")
    assert any(k.startswith("lora_te1_encoder_") for k in state)
    save_file({k.replace("lora_te1_encoder_", "lora_te1_text_model_encoder_"): v for k, v in state.items()},
              tmp_path / "v4.safetensors")
    old, new = lora.load(str(tmp_path / "v4.safetensors")), lora.load(str(A / "tiny-sdxl-b-kohya"))
    assert old.modules.keys() == new.modules.keys()
    assert "text_encoder.encoder.layers.0.self_attn.q_proj" in old.modules
    for name, module in new.modules.items():
        assert torch.equal(old.modules[name].Bt, module.Bt), name


def test_metadata_alpha_and_rank_patterns_are_honoured(sdxl, tmp_path):
    _, lora, _, _ = sdxl
    state = load_file(A / "tiny-sdxl-a-diffusers" / "pytorch_lora_weights.safetensors")
    unet = {k.removeprefix("unet."): v for k, v in state.items()}
    meta = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
            "alpha_pattern": {"attn1.to_q": 2}, "rank_pattern": {}}
    type(lora.loaded.pipe).save_lora_weights(tmp_path / "p", unet_lora_layers=unet, unet_lora_adapter_metadata=meta)
    adapter = lora.load(str(tmp_path / "p"))
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0."
    for module, alpha in (("attn1.to_q", 2), ("attn2.to_q", 8)):
        b = state[f"{prefix}{module}.lora_B.weight"]
        torch.testing.assert_close(adapter.modules[prefix + module].Bt, b.t() * alpha / 4)
    bad = {**meta, "rank_pattern": {"attn2.to_k": 2}}
    type(lora.loaded.pipe).save_lora_weights(tmp_path / "q", unet_lora_layers=unet, unet_lora_adapter_metadata=bad)
    with pytest.raises(AdapterError, match=r"attn2\.to_k: rank 4, but the file's metadata says r/rank_pattern 2"):
        lora.load(str(tmp_path / "q"))


def test_sdxl_rows_with_and_without_a_negative_prompt_are_not_batched_together(sdxl):
    """SDXL guides against zero embeddings without a negative prompt, but encodes "" once any row of the call has
    one: mixing them would make an image depend on its batch mates. SD3 encodes "" either way and may mix them."""
    for pipeline, batches in ((TINY_SDXL, 2), (TINY_SD3, 1)):
        loaded, _, _, generator = sdxl if pipeline == TINY_SDXL else _served(TINY_SD3)
        requests = [build_request(loaded, generator.limits, prompt="a cat", negative_prompt=negative, height=SIZE,
                                  width=SIZE, steps=1, seed=1) for negative in (None, "blurry", None)]
        assert len(generator.plan(requests)) == batches, pipeline


# -- LoRA stacks ---------------------------------------------------------------------------------------------

def test_diffusion_stack_equals_diffusers_set_adapters_with_both():
    """SDXL, a PEFT adapter and a kohya file (plus a LoCon) in stacks, one batch: [a@0.7 + b@0.3], [], [b@0.5 +
    locon@0.7 + a@1.0], [a@0 + b@0] each equal diffusers `load_lora_weights` for all + `set_adapters([...],
    adapter_weights=[...])` (fp32, 1e-5); all-zero scales equal the base bit for bit."""
    from backends.diffusion.generate import ImageLimits, build_request
    from backends.diffusion.pipeline import load_pipeline
    from backends.lora.manager.request import AdapterRef, LoRASelection
    from tools.fixtures.pipelines import fixtures_dir

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


def test_diffusion_planner_counts_every_adapter_of_a_stack_against_the_slots():
    from backends.diffusion.generate import ImageLimits, build_request
    from backends.lora.manager.request import AdapterRef, LoRASelection

    family = FAMILIES["sdxl"]
    loaded, _, _, generator = _served(family.pipeline, max_loras=2)
    refs = {n: AdapterRef(i + 1, n, str(A / path)) for i, (n, path) in enumerate(family.ours.items())}

    def req(*names):
        return build_request(loaded, ImageLimits(), prompt="x", height=SIZE, width=SIZE, steps=1,
                             lora=tuple(LoRASelection(refs[n], 1.0) for n in names))

    assert generator.plan([req("a", "b"), req("a"), req("b"), req()]) == [[0, 1, 2, 3]]
    assert generator.plan([req("a", "b"), req("locon"), req("b", "locon")]) == [[0], [1, 2]]
