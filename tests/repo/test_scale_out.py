"""Two replicas, each a tritonserver + OpenAI frontend pair on its own ports and its own download cache, share
their adapters and the dynamic registry through one S3 server (issue 15): an adapter loaded through one replica is
listed and served by the other without a restart, and keeps serving from its cache when the store goes down."""

from __future__ import annotations

import os
import time

import httpx
import pytest

from backends.lora.store.downloads import S3_CACHE_DIR_ENV
from backends.settings import ALLOWED_LORA_ROOTS_ENV, LORA_REGISTRY_ENV
from tools.launchers.frontend import FrontendProcess
from tools.launchers.s3 import S3Server
from tools.launchers.triton import TritonServer, copy_model, free_port

BUCKET = "team-adapters"
ROOT = f"s3://{BUCKET}/adapters"
REGISTRY = f"s3://{BUCKET}/registry.json"
KEY = "replica-key"


class Replica:
    def __init__(self, repo, workdir, s3: S3Server):
        env = {**os.environ, **s3.env, LORA_REGISTRY_ENV: REGISTRY, ALLOWED_LORA_ROOTS_ENV: ROOT,
               S3_CACHE_DIR_ENV: str(workdir / "s3-cache")}
        self.triton = TritonServer(model_repository=repo, models=["llm"], http_port=free_port(),
                                   grpc_port=free_port(), metrics_port=free_port(),
                                   log_file=workdir / "tritonserver.log", env=env).start(timeout=300)
        # As deployed behind the inference gateway: keys on /v1, /metrics open to the endpoint picker's scrapes.
        self.frontend = FrontendProcess(self.triton.grpc_url, self.triton.metrics_url, workdir / "frontend.log",
                                        "--allow-runtime-lora-updating", "--api-key", KEY, "--public-metrics",
                                        env=env).start()
        self.http = httpx.Client(base_url=self.frontend.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})

    def stop(self) -> None:
        self.http.close()
        self.frontend.stop()
        self.triton.stop()

    def models(self) -> set[str]:
        return {m["id"] for m in self.http.get("/v1/models").json()["data"]}

    def complete(self, model: str):
        return self.http.post("/v1/completions", json={"model": model, "prompt": "The sea is", "max_tokens": 6,
                                                       "temperature": 0})

    def text(self, model: str) -> str:
        response = self.complete(model)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    def load(self, name: str, path: str, **extra):
        return self.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, **extra})


def _eventually(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tools.fixtures.adapters import make_random_adapter
    from tools.fixtures.llm_families import load_family, make_family

    folder = make_family("llama")
    s3 = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    s3.client().create_bucket(Bucket=BUCKET)
    for name, seed in (("tiny-a", 5), ("tiny-b", 6), ("tiny-c", 7)):
        adapter = make_random_adapter(lambda: load_family(folder), tmp_path_factory.mktemp("peft") / name, seed=seed,
                                      std=0.5, r=4, lora_alpha=8, target_modules="all-linear")
        s3.upload(adapter, BUCKET, f"adapters/{name}")
    s3.client().put_object(Bucket=BUCKET, Key="adapters/junk/notes.txt", Body=b"not an adapter")

    repo = tmp_path_factory.mktemp("replica_repo")
    copy_model(repo, "llm", "llm", {"model_path": str(folder), "lora_modules": "", "max_loras": "2",
                                    "max_model_len": "128", "max_num_seqs": "4"})
    replicas = []
    try:
        for i in range(2):
            replicas.append(Replica(repo, tmp_path_factory.mktemp(f"replica{i}"), s3))
        yield s3, replicas
    finally:
        for replica in replicas:
            replica.stop()
        s3.stop()


def test_an_adapter_loaded_through_one_replica_is_listed_and_served_by_the_other(cluster):
    s3, (one, two) = cluster
    base = one.text("llm")
    response = one.load("tiny-a", f"{ROOT}/tiny-a")
    assert response.status_code == 200, response.text
    _eventually(lambda: "tiny-a" in two.models())
    assert two.text("tiny-a") == one.text("tiny-a") != base

    # Unloading through the other replica removes it everywhere.
    assert two.http.post("/v1/unload_lora_adapter", json={"lora_name": "tiny-a"}).status_code == 200
    _eventually(lambda: "tiny-a" not in one.models())
    assert one.complete("tiny-a").status_code == 404


def test_the_endpoint_picker_scrapes_metrics_without_the_key_that_v1_routes_need(cluster):
    s3, (one, _) = cluster
    scrape = httpx.get(f"{one.frontend.url}/metrics", timeout=30)
    assert scrape.status_code == 200 and "vllm:num_requests_waiting" in scrape.text
    assert httpx.get(f"{one.frontend.url}/v1/models", timeout=30).status_code == 401


@pytest.mark.parametrize("path, status, message", [
    (f"s3://{BUCKET}/elsewhere/x", 400, "outside the allowed adapter roots"),
    ("s3://other-bucket/adapters/x", 400, "outside the allowed adapter roots"),
    (f"{ROOT}/missing", 404, f"'{ROOT}/missing' not found"),
    (f"{ROOT}/junk", 400, f"invalid LoRA adapter at {ROOT}/junk: adapter_config.json is missing"),
])
def test_bad_object_store_adapters_are_refused_by_name(cluster, path, status, message):
    s3, (one, two) = cluster
    response = one.load("bad", path, base_model_name="llm")
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    assert "bad" not in two.models()
    assert one.text("llm")  # still serving


def test_with_the_store_down_cached_adapters_keep_serving_and_new_loads_are_503(cluster):
    s3, (one, two) = cluster
    assert one.load("tiny-b", f"{ROOT}/tiny-b").status_code == 200
    _eventually(lambda: "tiny-b" in two.models())
    served = two.text("tiny-b")  # the second replica downloads and caches it
    s3.stop()
    assert two.text("tiny-b") == served
    assert "tiny-b" in two.models()
    never_fetched = one.load("tiny-c", f"{ROOT}/tiny-c")
    assert never_fetched.status_code == 503, never_fetched.text
    assert f"unreachable for LoRA adapter '{ROOT}/tiny-c'" in never_fetched.json()["error"]["message"]
    cached = one.load("tiny-a", f"{ROOT}/tiny-a")  # its files are here, but the registry cannot take the entry
    assert cached.status_code == 503, cached.text
    assert f"LoRA registry {REGISTRY} unreachable" in cached.json()["error"]["message"]
    assert "tiny-a" not in one.models()
