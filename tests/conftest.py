"""One real tritonserver per test session, on free loopback ports, serving model_repository."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from backends.settings import ALLOWED_LORA_ROOTS_ENV, LORA_REGISTRY_ENV, cache_dir, default_llm_model_path
from tools.fixtures.llm_families import make_family
from tools.fixtures.pipelines import TINY_SD3, TINY_SD15
from tools.launchers.triton import TritonServer, copy_model, free_port
from tools.session import BATCHED_MODEL, BF16_MODEL, CHECK_DEVICE_ENV, PHI3_MODEL, PINNED_MODEL, SD15_MODEL, TIGHT_MODEL


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    dry_run = os.environ.get(CHECK_DEVICE_ENV) == "cpu"
    for item in items:
        if "gpu" in item.keywords and not (dry_run and "cpu_dry_run" in item.keywords):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory) -> Path:
    """Adapters the tests make live here; the session's server allows this root and keeps its registry here."""
    return tmp_path_factory.mktemp("lora_root")


# The served LLMs run in float32: tests compare them with transformers/PEFT at 1e-4 and require a request's greedy
# tokens to be the same alone and in any batch, which holds in float32 only (a bfloat16 GEMM of another batch shape
# rounds differently). BF16_MODEL serves the product default on CPUs with AVX512-BF16 for the bfloat16 tests.
FP32 = {"dtype": "float32"}


def _main_repository(root: Path) -> Path:
    """model_repository as shipped, the llm in float32."""
    repo = root / "models"
    copy_model(repo, "llm", "llm", FP32)
    copy_model(repo, "diffusion", "diffusion", {})
    return repo


def _extra_repository(root: Path) -> Path:
    repo = root / "extra_models"
    copy_model(repo, "llm", TIGHT_MODEL,
                {**FP32, "max_loras": "2", "max_cpu_loras": "2", "lora_modules": "", "max_num_seqs": "8"})
    copy_model(repo, "llm", PINNED_MODEL, {**FP32, "max_loras": "1", "max_cpu_loras": "2", "max_num_seqs": "4",
                                           "lora_modules": "uppercase=adapters/demo/uppercase"})
    copy_model(repo, "llm", PHI3_MODEL, {**FP32, "model_path": str(make_family("phi3")), "lora_modules": "",
                                         "max_loras": "2", "max_model_len": "128", "max_num_seqs": "4"})
    copy_model(repo, "llm", BF16_MODEL, {"dtype": "bfloat16", "max_loras": "2", "max_num_seqs": "4",
                                         "lora_modules": "uppercase=adapters/demo/uppercase"})
    copy_model(repo, "diffusion", SD15_MODEL, {
        "model_path": str(cache_dir() / "models" / TINY_SD15),
        "lora_modules": "tiny-sd15-a=adapters/diffusion/tiny-sd15-a",
    })
    # Triton's batcher waits until 4 requests are queued (or 5 s): 4 concurrent requests form one batch.
    copy_model(repo, "diffusion", BATCHED_MODEL, {}, {
        "max_queue_delay_microseconds: 20000": "max_queue_delay_microseconds: 5000000\n  preferred_batch_size: [ 4 ]"})
    return repo


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, lora_root):
    if not (default_llm_model_path() / "config.json").is_file():
        pytest.fail(f"converted model missing at {default_llm_model_path()}: run scripts/setup first")
    for name in (TINY_SD3, TINY_SD15):
        if not (cache_dir() / "models" / name / "model_index.json").is_file():
            pytest.fail(f"tiny diffusion pipeline {name} missing: run scripts/setup first")
    log_file = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    repos = tmp_path_factory.mktemp("repo")
    server = TritonServer(
        model_repository=_main_repository(repos), http_port=free_port(), grpc_port=free_port(),
        metrics_port=free_port(), log_file=log_file,
        extra_args=[f"--model-repository={_extra_repository(repos)}"],
        env={**os.environ, ALLOWED_LORA_ROOTS_ENV: str(lora_root),
             LORA_REGISTRY_ENV: str(lora_root / "registry.json")},
    )
    server.start(timeout=300)
    try:
        yield server
    finally:
        server.stop()
        print(f"\ntritonserver log: {log_file}")


@pytest.fixture(scope="session")
def http_client(triton_server):
    import tritonclient.http as httpclient  # here, not at import: the GPU check machine has no tritonclient

    client = httpclient.InferenceServerClient(triton_server.http_url)
    yield client
    client.close()


@pytest.fixture
def grpc_client(triton_server):
    """A fresh gRPC client per test: a stream left open by a failing test cannot leak into the next one."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.stop_stream()
    client.close()


@pytest.fixture(scope="session")
def frontend(triton_server, lora_root, tmp_path_factory):
    """The OpenAI frontend as a real process over the session's tritonserver (keys, runtime LoRA updating on)."""
    from tools.launchers.frontend import FrontendProcess
    from tools.session import ADMIN_KEY, API_KEY

    proc = FrontendProcess(
        triton_server.grpc_url, triton_server.metrics_url, tmp_path_factory.mktemp("frontend") / "frontend.log",
        "--api-key", API_KEY, "--admin-key", ADMIN_KEY, "--allow-runtime-lora-updating",
        "--lora-registry-file", str(lora_root / "registry.json"), "--allowed-lora-root", str(lora_root),
        "--max-body-bytes", "65536", "--max-images", "2",
    ).start()
    yield proc
    proc.stop()
