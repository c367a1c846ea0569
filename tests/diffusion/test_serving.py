"""Diffusion serving through a real tritonserver: tiny random SD3- and SD1.5-style pipelines, per-request LoRA in
PEFT, diffusers and kohya formats, mixed-adapter batches formed by Triton's dynamic batcher, the scale sweep tool,
and every bad input."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from safetensors.torch import load_file, save_file
from tritonclient.utils import InferenceServerException

from backends.lora.store.entries import AdapterEntry
from backends.lora.store.registry import LoRARegistry
from backends.settings import REPO_ROOT, adapters_dir
from tools.clients.diffusion import generate, pixels
from tools.fixtures.pipelines import diffusion_adapters_dir
from tools.session import BATCHED_MODEL, SD15_MODEL

FAST = dict(num_inference_steps=3)
A = diffusion_adapters_dir()


@pytest.fixture(scope="module")
def client(triton_server):
    c = httpclient.InferenceServerClient(triton_server.http_url, concurrency=8, network_timeout=300)
    yield c
    c.close()


@pytest.fixture(scope="module")
def extra_model(http_client):
    """Load a model of the tests' second repository for one test module; unload it afterwards."""
    loaded = []

    def load(name: str) -> str:
        if name not in loaded:
            http_client.load_model(name)
            loaded.append(name)
        return name

    yield load
    for name in loaded:
        http_client.unload_model(name)


def _one(client, model="diffusion", **fields) -> bytes:
    images, _, _ = generate(client, model, **{**FAST, **fields})
    assert len(images) == 1
    return images[0]


def _max_diff(a: bytes, b: bytes) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def _together(triton_server, model: str, rows: list[dict]) -> list:
    """Send the rows at once (one client per thread, so none waits for another) -> PNG bytes or the error."""
    def call(row):
        c = httpclient.InferenceServerClient(triton_server.http_url, network_timeout=300)
        try:
            return _one(c, model, **row)
        except InferenceServerException as exc:
            return exc
        finally:
            c.close()

    with ThreadPoolExecutor(len(rows)) as pool:
        return list(pool.map(call, rows))


def _batches(triton_server, model: str) -> float:
    text = httpx.get(triton_server.metrics_url).text
    match = re.search(rf'^multilora_diffusion_batches_total{{model="{model}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_served_pipeline_returns_png_of_the_requested_size(client):
    images, seed, pipeline = generate(client, height=32, width=48, seed=7, **FAST)
    assert pipeline == "tiny-random-sd3"  # the tiny random pipeline says what it is
    assert seed == 7 and len(images) == 1
    assert images[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert pixels(images[0]).shape == (32, 48, 3)


def test_same_seed_gives_identical_png_bytes(client):
    first = _one(client, seed=11)
    assert _one(client, seed=11) == first
    assert _one(client, seed=12) != first
    images, seed, _ = generate(client, **FAST)  # no seed: the server picks one and returns it
    assert _one(client, seed=seed) == images[0]


def test_num_images_uses_consecutive_seeds(client):
    images, seed, _ = generate(client, seed=20, num_images=3, **FAST)
    assert seed == 20 and len(images) == 3 and len(set(images)) == 3
    assert _max_diff(images[2], _one(client, seed=22)) <= 1  # batch of 3 vs 1 may round differently


def test_scale_zero_is_bit_identical_to_base_and_scale_one_differs(client):
    base = _one(client, seed=3)
    for adapter in ("tiny-sd3-a", "tiny-sd3-b"):  # b also has LoRA on both text encoders
        assert _one(client, seed=3, lora_name=adapter, lora_scale=0.0) == base
        full = _one(client, seed=3, lora_name=adapter)
        half = _one(client, seed=3, lora_name=adapter, lora_scale=0.5)
        assert _max_diff(full, base) > 20, f"{adapter} had no visible effect"
        assert 0 < _max_diff(half, base) and half != full


def test_mixed_adapter_batch_gives_each_row_its_solo_image(client, triton_server, extra_model):
    """[a, none, b, a@0.5] arrive together, Triton batches them, each row equals its solo image (1/255)."""
    model = extra_model(BATCHED_MODEL)
    rows = [dict(lora_name="tiny-sd3-a", seed=1, prompt="a red cat"),
            dict(seed=2, prompt="a blue dog"),
            dict(lora_name="tiny-sd3-b", seed=3, prompt="a green tree", negative_prompt="blurry"),
            dict(lora_name="tiny-sd3-a", lora_scale=0.5, seed=4, prompt="a red cat")]
    # Triton batches only requests with the same set of input tensors (LoRA fields travel as parameters).
    rows = [{"negative_prompt": "", **row} for row in rows]
    solo = [_one(client, **row) for row in rows]
    assert len(set(solo)) == 4
    before = _batches(triton_server, model)
    batched = _together(triton_server, model, rows)
    assert _batches(triton_server, model) - before == 1, "the 4 requests did not share one batch"
    for i, (got, want) in enumerate(zip(batched, solo)):
        assert _max_diff(got, want) <= 1, f"row {i} differs from its solo image"
    assert batched[1] == solo[1]  # the row without an adapter is exactly the base image


def test_bad_request_in_a_batch_fails_alone(client, triton_server, extra_model):
    model = extra_model(BATCHED_MODEL)
    rows = [dict(seed=5), dict(lora_name="tiny-sd3-a", seed=6), dict(lora_name="no-such-adapter", seed=7),
            dict(lora_name="tiny-sd3-b", seed=8)]
    results = _together(triton_server, model, rows)
    assert isinstance(results[2], InferenceServerException) and results[2].status() == "404"
    assert "no-such-adapter" in str(results[2])
    for i in (0, 1, 3):
        assert _max_diff(results[i], _one(client, **rows[i])) <= 1


def test_lora_fields_as_tensors_equal_request_parameters(client):
    as_params = _one(client, seed=9, lora_name="tiny-sd3-b", lora_scale=0.7)
    assert _one(client, seed=9, lora_name="tiny-sd3-b", lora_scale=0.7, lora_as_tensors=True) == as_params
    with pytest.raises(InferenceServerException, match="'nope' not found"):
        _one(client, seed=9, lora_name="nope", lora_as_tensors=True)


def test_diffusers_file_and_peft_folder_of_the_same_weights_give_the_same_image(client):
    peft = _one(client, seed=9, lora_name="tiny-sd3-a")
    assert _one(client, seed=9, lora_path=str(A / "tiny-sd3-a-diffusers")) == peft
    assert _one(client, seed=9, lora_path=str(A / "tiny-sd3-a-diffusers" / "pytorch_lora_weights.safetensors")) == peft


def test_kohya_file_and_peft_folder_of_the_same_weights_give_the_same_image(client, extra_model):
    model = extra_model(SD15_MODEL)
    images, _, pipeline = generate(client, model, seed=4, **FAST)
    assert pipeline == "tiny-random-sd15"
    peft = _one(client, model, seed=4, lora_name="tiny-sd15-a")
    kohya = _one(client, model, seed=4, lora_path=str(A / "tiny-sd15-a-kohya" / "tiny-sd15-a.safetensors"))
    assert kohya == peft
    assert _max_diff(peft, images[0]) > 20
    assert _one(client, model, seed=4, lora_name="tiny-sd15-a", lora_scale=0.0) == images[0]


def test_dynamic_registry_adapter_is_served(client, lora_root):
    folder = lora_root / "diffusion_dyn"
    shutil.copytree(A / "tiny-sd3-a-diffusers", folder)
    registry = LoRARegistry(registry_file=lora_root / "registry.json", allowed_roots=[lora_root])
    registry.add(AdapterEntry("style-dyn", str(folder)))
    try:
        assert _one(client, seed=9, lora_name="style-dyn") == _one(client, seed=9, lora_name="tiny-sd3-a")
    finally:
        registry.remove("style-dyn")
    with pytest.raises(InferenceServerException, match="'style-dyn' not found"):
        _one(client, seed=9, lora_name="style-dyn")


@pytest.fixture(scope="module")
def bad_adapters(lora_root: Path) -> dict[str, Path]:
    corrupt = lora_root / "diffusion_corrupt"
    shutil.copytree(A / "tiny-sd3-a-diffusers", corrupt)
    weights = corrupt / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    zero = lora_root / "diffusion_zero"  # a valid adapter that changes nothing (B = 0, PEFT's initialisation)
    shutil.copytree(A / "tiny-sd3-a", zero)
    state = load_file(zero / "adapter_model.safetensors")
    save_file({k: (v.zero_() if "lora_B" in k else v) for k, v in state.items()}, zero / "adapter_model.safetensors")
    outside = REPO_ROOT.parent / "not_an_allowed_root"
    return {"corrupt": corrupt, "zero": zero, "outside": outside}


BAD = {
    "height not a multiple of 16": (dict(height=70), "400", "height must be a multiple of 16"),
    "width above the maximum": (dict(width=2048), "400", "between 16 and 1024"),
    "zero steps": (dict(num_inference_steps=0), "400", "num_inference_steps must be between 1 and 100"),
    "too many steps": (dict(num_inference_steps=101), "400", "num_inference_steps must be between 1 and 100"),
    "too many images": (dict(num_images=5), "400", "num_images must be between 1 and 4"),
    "empty prompt": (dict(prompt=" "), "400", "'prompt' must be a non-empty string"),
    "negative guidance": (dict(guidance_scale=-1.0), "400", "guidance_scale must be a finite number"),
    "unknown adapter": (dict(lora_name="nope"), "404", "LoRA adapter 'nope' not found; known adapters"),
    "LLM adapter": (dict(lora_path=str(adapters_dir() / "demo" / "uppercase")), "400",
                    "match zero layers of the served model"),
    "corrupt file": (dict(lora_path="{corrupt}"), "400", "is not valid safetensors"),
    "path outside roots": (dict(lora_path="{outside}"), "400", "outside the allowed adapter roots"),
    "negative scale": (dict(lora_name="tiny-sd3-a", lora_scale=-1.0), "400", "lora_scale must be a finite number"),
    "huge scale": (dict(lora_name="tiny-sd3-a", lora_scale=1e30), "400", "lora_scale must be at most 100"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_refused_and_server_keeps_serving(case, client, bad_adapters):
    fields, status, message = BAD[case]
    fields = {k: v.format(**bad_adapters) if isinstance(v, str) else v for k, v in fields.items()}
    with pytest.raises(InferenceServerException) as err:
        _one(client, **fields)
    assert err.value.status() == status, str(err.value)
    assert message in str(err.value)
    assert len(generate(client, seed=1, **FAST)[0]) == 1


def _verify(triton_server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.verify_lora", "--url", triton_server.http_url, "--steps", "3", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )


def test_verify_lora_passes_for_a_working_adapter(triton_server, tmp_path):
    sheet = tmp_path / "sheet.png"
    run = _verify(triton_server, "--lora-name", "tiny-sd3-a", "--out", str(sheet))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "LoRA verified" in run.stdout
    assert sheet.read_bytes()[:4] == b"\x89PNG"


def test_verify_lora_fails_for_an_ineffective_adapter_and_a_refused_one(triton_server, bad_adapters, tmp_path):
    run = _verify(triton_server, "--lora-path", str(bad_adapters["zero"]), "--out", str(tmp_path / "z.png"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAILED: scale 1.0 vs scale 0" in run.stdout
    run = _verify(triton_server, "--lora-name", "nope", "--out", str(tmp_path / "n.png"))
    assert run.returncode == 2 and "not found" in run.stdout


# -- LoRA stacks through tritonserver ----------------------------------------------------------------------------

def test_four_image_requests_with_four_stacks_share_one_batch(triton_server, http_client):
    """Four requests, four different stacks (LoRA fields as JSON-array request parameters), arrive together: Triton
    batches them (metric), and each image is within 1/255 of its solo image; a stack as tensors equals the
    parameter form."""
    import tritonclient.http as httpclient

    from tools.clients.diffusion import generate
    from tools.fixtures.pipelines import diffusion_adapters_dir
    from tools.session import BATCHED_MODEL

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

    run = _verify(triton_server, "--stack", "tiny-sd3-a@0.7", "tiny-sd3-b@0.3", "--out", str(tmp_path / "s.png"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "stack @ 0 vs base" in run.stdout and "stack vs tiny-sd3-b@0.3" in run.stdout
    assert "LoRA verified" in run.stdout
    run = _verify(triton_server, "--stack", "tiny-sd3-a", "tiny-sd3-a", "--out", str(tmp_path / "d.png"))
    assert run.returncode == 2 and "appears twice in one request" in " ".join(run.stdout.split())  # rich wraps
