"""One real tritonserver per test session, on free loopback ports, serving model_repository."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from backends.settings import default_llm_model_path
from scripts.triton_launcher import TritonServer, free_port


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    if not (default_llm_model_path() / "config.json").is_file():
        pytest.fail(f"converted model missing at {default_llm_model_path()}: run scripts/setup first")
    log_file = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = TritonServer(
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), log_file=log_file
    )
    server.start(timeout=300)
    try:
        yield server
    finally:
        server.stop()
        print(f"\ntritonserver log: {log_file}")


@pytest.fixture(scope="session")
def http_client(triton_server):
    client = httpclient.InferenceServerClient(triton_server.http_url)
    yield client
    client.close()


@pytest.fixture
def grpc_client(triton_server):
    """A fresh gRPC client per test: a stream left open by a failing test cannot leak into the next one."""
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    yield client
    client.stop_stream()
    client.close()
