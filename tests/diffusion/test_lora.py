"""Diffusion LoRA in-process: our per-row LoRA equals diffusers' own `load_lora_weights` on the same files, and
the format reader refuses what it cannot serve with a message naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backends.diffusion.lora import PipelineLoRA
from backends.diffusion.pipeline import load_pipeline
from backends.lora.adapters.files import AdapterError, AdapterNotFoundError
from backends.lora.manager.cache import LoRACache
from backends.lora.manager.request import AdapterRef
from backends.lora.ops.batch import LoRABatch
from tools.fixtures.pipelines import TINY_SD3, TINY_SD15, diffusion_adapters_dir, fixtures_dir

A = diffusion_adapters_dir()
CALL = dict(num_inference_steps=3, output_type="np")


def _ours(pipeline: str, adapter: str, rows: list[tuple[int, float]], prompts: list[str]) -> np.ndarray:
    loaded = load_pipeline(str(fixtures_dir() / pipeline))
    lora = PipelineLoRA(loaded, max_loras=2, max_rank=16)
    cache = LoRACache(lora.context, lambda ref: lora.load(ref.path), max_cpu_loras=2)
    ref = AdapterRef(1, "x", str(A / adapter))
    slot = cache.acquire([ref])[0]
    with lora.use(LoRABatch.build([slot if s >= 0 else -1 for s, _ in rows], [scale for _, scale in rows])):
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return loaded.pipe(prompts, generator=gens, **CALL).images


def _diffusers(pipeline: str, adapter: str | None, prompt: str, seed: int, **load_kwargs) -> np.ndarray:
    pipe = load_pipeline(str(fixtures_dir() / pipeline)).pipe
    if adapter:
        pipe.load_lora_weights(str(A / adapter), **load_kwargs)
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **CALL).images[0]


@pytest.mark.parametrize("pipeline,adapter,load_kwargs", [
    (TINY_SD3, "tiny-sd3-b", {}),  # diffusers file with transformer + both text encoders
    (TINY_SD15, "tiny-sd15-a-kohya", {"weight_name": "tiny-sd15-a.safetensors"}),  # kohya keys, .alpha
], ids=["sd3-diffusers-with-text-encoders", "sd15-kohya"])
def test_mixed_rows_match_diffusers_load_lora_weights(pipeline, adapter, load_kwargs):
    prompts = ["a red cat", "a blue dog", "a red cat"]
    got = _ours(pipeline, adapter, [(0, 1.0), (-1, 0.0), (0, 0.0)], prompts)
    with_lora = _diffusers(pipeline, adapter, prompts[0], 0, **load_kwargs)
    base1 = _diffusers(pipeline, None, prompts[1], 1)
    base2 = _diffusers(pipeline, None, prompts[2], 2)
    np.testing.assert_allclose(got[0], with_lora, atol=1e-5)
    np.testing.assert_allclose(got[1], base1, atol=1e-5)
    np.testing.assert_allclose(got[2], base2, atol=1e-5)  # scale 0 row = base
    assert np.abs(with_lora - _diffusers(pipeline, None, prompts[0], 0)).max() > 0.05


@pytest.fixture(scope="module")
def sd3_lora():
    return PipelineLoRA(load_pipeline(str(fixtures_dir() / TINY_SD3)), max_loras=1, max_rank=8)


def _write(folder, state: dict):
    folder.mkdir(parents=True)
    save_file(state, folder / "pytorch_lora_weights.safetensors")
    return folder


def test_unknown_modules_incomplete_pairs_and_rank_are_listed_together(tmp_path, sd3_lora):
    state = load_file(A / "tiny-sd3-b" / "pytorch_lora_weights.safetensors")
    key = next(k for k in state if k.startswith("transformer.") and "lora_B" in k)
    state.pop(key)
    state["transformer.pos_embed.proj.lora_A.weight"] = torch.zeros(4, 4, 2, 2)  # a conv layer (LoCon)
    state["transformer.pos_embed.proj.lora_B.weight"] = torch.zeros(8, 4, 1, 1)
    with pytest.raises(AdapterError) as err:
        sd3_lora.load(str(_write(tmp_path / "a", state)))
    message = str(err.value)
    assert "pytorch_lora_weights.safetensors" in message
    assert "does not LoRA-enable" in message and "transformer.pos_embed.proj" in message
    assert "pair incomplete for 1 modules" in message
    with pytest.raises(AdapterError, match="rank exceeds max_lora_rank 4"):
        PipelineLoRA(load_pipeline(str(fixtures_dir() / TINY_SD3)), 1, 4).load(str(A / "tiny-sd3-b"))


def _dora_state(seed: int = 0) -> dict:
    """tiny-sd3-b (transformer + text encoders) as DoRA: a magnitude per targeted transformer linear, near the
    base rows' norms, as diffusers' save_lora_weights writes a PEFT DoRA adapter."""
    state = load_file(A / "tiny-sd3-b" / "pytorch_lora_weights.safetensors")
    transformer = load_pipeline(str(fixtures_dir() / TINY_SD3)).pipe.transformer
    gen = torch.Generator().manual_seed(seed)
    for key in [k for k in state if k.startswith("transformer.") and ".lora_A." in k]:
        module = key.removeprefix("transformer.").split(".lora_A.")[0]
        norm = transformer.get_submodule(module).weight.detach().norm(dim=1)
        state[f"transformer.{module}.lora_magnitude_vector"] = norm * (1 + 0.3 * torch.randn(norm.shape, generator=gen))
    return state


def test_dora_rows_match_diffusers_load_lora_weights(tmp_path):
    """A DoRA row (per-row scale 1), a base row and a scale-0 DoRA row in one batch, against diffusers + PEFT's DoRA
    on the same file."""
    global A
    folder = _write(tmp_path / "tiny-sd3-dora", _dora_state())
    saved, A = A, tmp_path
    try:
        prompts = ["a red cat", "a blue dog", "a red cat"]
        got = _ours(TINY_SD3, folder.name, [(0, 1.0), (-1, 0.0), (0, 0.0)], prompts)
        with_dora = _diffusers(TINY_SD3, folder.name, prompts[0], 0)
    finally:
        A = saved
    np.testing.assert_allclose(got[0], with_dora, atol=1e-5)
    np.testing.assert_allclose(got[1], _diffusers(TINY_SD3, None, prompts[1], 1), atol=1e-5)
    # scale 0 = base (bit for bit in one batch: tests/lora/test_dora.py; a batch of 1 rounds differently)
    np.testing.assert_allclose(got[2], _diffusers(TINY_SD3, None, prompts[2], 2), atol=1e-5)
    plain = _diffusers(TINY_SD3, "tiny-sd3-b", prompts[0], 0)
    assert np.abs(with_dora - plain).max() > 0.01, "the magnitudes changed nothing"


def test_bad_dora_files_are_refused_naming_the_problem(tmp_path, sd3_lora):
    state = _dora_state()
    key = next(k for k in state if k.endswith("lora_magnitude_vector"))
    module = key.removesuffix(".lora_magnitude_vector")
    with pytest.raises(AdapterError, match=rf"{module}: lora_magnitude_vector \[3\], expected \[\d+\]"):
        PipelineLoRA(load_pipeline(str(fixtures_dir() / TINY_SD3)), 1, 16).load(
            str(_write(tmp_path / "shape", {**state, key: torch.ones(3)})))
    kohya = load_file(A / "tiny-sd3-a-diffusers" / "pytorch_lora_weights.safetensors")
    with pytest.raises(AdapterError, match=r"kohya DoRA weights \(dora_scale\) are not supported"):
        sd3_lora.load(str(_write(tmp_path / "k", {**kohya, "lora_unet_x.dora_scale": torch.ones(32)})))


def test_dora_on_a_unet_convolution_is_refused_naming_it(tmp_path):
    lora = PipelineLoRA(load_pipeline(str(fixtures_dir() / TINY_SD15)), 1, 16)
    conv = next(n for n in lora.context.spec.kernels)
    channels, kh, kw = lora.context.spec.kernels[conv]
    out = lora.context.spec.modules[conv][1]
    state = {f"{conv}.lora_A.weight": torch.randn(2, channels, kh, kw),
             f"{conv}.lora_B.weight": torch.randn(out, 2, 1, 1), f"{conv}.lora_magnitude_vector": torch.ones(1, out, 1, 1)}
    with pytest.raises(AdapterError, match=rf"DoRA is served on linear layers only, not on the convolutions {conv}"):
        lora.load(str(_write(tmp_path / "c", state)))


def test_pickle_nan_and_missing_files_are_refused(tmp_path, sd3_lora):
    state = load_file(A / "tiny-sd3-a-diffusers" / "pytorch_lora_weights.safetensors")
    nan = {k: (torch.full_like(v, float("nan")) if i == 0 else v) for i, (k, v) in enumerate(state.items())}
    with pytest.raises(AdapterError, match="NaN or Inf"):
        sd3_lora.load(str(_write(tmp_path / "n", nan)))
    pickled = tmp_path / "p"
    pickled.mkdir()
    torch.save(state, pickled / "lora.bin")
    with pytest.raises(AdapterError, match="only .safetensors"):
        sd3_lora.load(str(pickled / "lora.bin"))
    with pytest.raises(AdapterError, match="neither a PEFT folder"):
        sd3_lora.load(str(pickled))  # a folder without a PEFT config or a .safetensors file
    with pytest.raises(AdapterNotFoundError):
        sd3_lora.load(str(tmp_path / "missing"))


def test_batch_plan_leaves_room_for_pinned_adapters():
    """3 slots, 1 pinned: 3 distinct dynamic adapters must be split into 2 batches. Before: one batch, which then
    failed as a whole with NoFreeSlot."""
    from backends.diffusion.generate import DiffusionGenerator, ImageLimits, build_request
    from backends.lora.manager.request import LoRASelection

    loaded = load_pipeline(str(fixtures_dir() / TINY_SD3))
    lora = PipelineLoRA(loaded, max_loras=3, max_rank=16)
    cache = LoRACache(lora.context, lambda ref: lora.load(ref.path), max_cpu_loras=4)
    cache.pin(AdapterRef(1, "pinned", str(A / "tiny-sd3-a")))
    limits = ImageLimits()
    generator = DiffusionGenerator(loaded, limits, lora, cache)
    requests = [build_request(loaded, limits, prompt="a cat", height=32, width=32, steps=1, seed=i,
                              lora=(LoRASelection(AdapterRef(10 + i, f"d{i}", str(A / "tiny-sd3-b")), 1.0),))
                for i in range(3)]
    plan = generator.plan(requests)
    assert sorted(len(chunk) for chunk in plan) == [1, 2]
    for chunk in plan:
        result = generator.run([requests[j] for j in chunk])
        assert len(result.images) == len(chunk)
    assert cache.slots_in_use() == 0
