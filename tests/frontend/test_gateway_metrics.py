"""The Gateway API Inference Extension's model-server protocol on our /metrics, as its endpoint picker reads it
(llm-d/llm-d-router, pkg/epp/framework/plugins/datalayer/extractor/metrics: one series per name, LoRA from the
newest `vllm:lora_requests_info`, block size and block count from `vllm:cache_config_info` labels), plus vLLM's
proposed residency series. Parsed with the Prometheus text parser, over the session's real tritonserver + frontend.

The adapter requests run straight against Triton, never through the frontend: what the frontend reports must come
from the backend's own queue, so that every frontend in front of one Triton reports the same."""

from __future__ import annotations

import queue
import time
import uuid
from pathlib import Path

import httpx
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from backends.llm.chat import apply_chat_template
from tools.clients.diffusion import generate as generate_images
from tools.clients.llm import generate, make_inputs
from tools.fixtures.adapters import load_smollm2, make_random_adapters
from tools.fixtures.pipelines import diffusion_adapters_dir
from tools.session import API_KEY, PINNED_MODEL, TIGHT_MODEL

STORY = apply_chat_template("Tell me a long story about a dragon.")
QUEUE_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running")
KV_GAUGES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def _scrape(frontend) -> dict:
    text = httpx.get(f"{frontend.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def _one(families: dict, name: str):
    """The picker reads the first series of a name: each must be a gauge with exactly one series."""
    family = families[name]
    assert family.type == "gauge" and len(family.samples) == 1, (name, family.type, family.samples)
    return family.samples[0]


def _lora_info(families: dict) -> tuple[str, str]:
    labels = _one(families, "vllm:lora_requests_info").labels
    return labels["running_lora_adapters"], labels["waiting_lora_adapters"]


def _series(families: dict, name: str, **labels) -> list:
    return [s for s in families[name].samples if labels.items() <= s.labels.items()]


def _wait_for(frontend, check, timeout: float = 60) -> dict:
    """Scrape until `check(families)` holds; the last scrape shows in the failure."""
    deadline = time.monotonic() + timeout
    while True:
        families = _scrape(frontend)
        if check(families):
            return families
        assert time.monotonic() < deadline, [(s.name, s.labels, s.value) for n, f in families.items()
                                             if n.startswith("vllm:") for s in f.samples]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def gateway_adapters(lora_root: Path) -> dict[str, Path]:
    names = ["gw-a", "gw-b", "gw-c", "gw-d"]
    outs = make_random_adapters(load_smollm2, [lora_root / n for n in names], [41, 42, 43, 44], std=0.05, r=4,
                                lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return dict(zip(names, outs))


@pytest.fixture(scope="module")
def tight_model(http_client):
    """`llm` with 2 LoRA slots (tests/conftest.py writes it): a third adapter has to wait for a slot."""
    http_client.load_model(TIGHT_MODEL)
    yield TIGHT_MODEL
    http_client.unload_model(TIGHT_MODEL)


class _HeldStream:
    """One long generation on its own gRPC stream, held until `close` cancels it: a client of Triton that never
    passes through the frontend under test, as a second frontend would be."""

    def __init__(self, triton_server, model: str, name: str, path: Path):
        self.client = grpcclient.InferenceServerClient(triton_server.grpc_url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put(error or result))
        inputs = make_inputs(STORY, max_tokens=1000, temperature=0.0, stream=True, lora_name=name,
                             lora_path=str(path))
        self.client.async_stream_infer(model, inputs, request_id=uuid.uuid4().hex,
                                       enable_empty_final_response=True)

    def first_token(self) -> "_HeldStream":
        response = self.responses.get(timeout=60)
        assert not isinstance(response, Exception), response
        return self

    def close(self) -> None:
        if self.client is not None:
            self.client.stop_stream(cancel_requests=True)
            self.client.close()
            self.client = None


def test_queue_kv_and_lora_series_are_single_gauges_with_the_pickers_labels(frontend):
    families = _scrape(frontend)
    for name in QUEUE_GAUGES + KV_GAUGES:
        assert _one(families, name).labels == {}, name
    info = _one(families, "vllm:lora_requests_info")
    assert set(info.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert info.labels["max_lora"] == "16"  # the llm model's max_loras, the most slots of any model
    assert abs(info.value - time.time()) < 60  # the picker keeps the series with the newest timestamp


def test_cache_config_info_is_the_kv_cache_shape(frontend):
    families = _scrape(frontend)
    config = _one(families, "vllm:cache_config_info").labels
    assert set(config) == {"block_size", "num_gpu_blocks", "enable_prefix_caching"}
    sizes = {s.labels["model"]: int(s.value) for s in families["multilora_llm_kv_cache_block_size"].samples}
    blocks = {s.labels["model"]: int(s.value) for s in families["multilora_llm_kv_cache_blocks"].samples}
    assert sizes["llm"] == 16 and blocks["llm"] >= 1
    largest = max(blocks, key=lambda model: blocks[model] * sizes[model])
    assert (config["block_size"], config["num_gpu_blocks"]) == (str(sizes[largest]), str(blocks[largest]))
    assert config["enable_prefix_caching"] == "True"


def test_prefix_cache_counters_count_a_repeated_prompt(frontend):
    """vllm:prefix_cache_queries / hits (tokens) as vLLM names them: a prompt sent twice hits on the second."""
    def counters():
        families = _scrape(frontend)
        for name in ("prefix_cache_queries", "prefix_cache_hits"):
            assert families[f"vllm:{name}"].type == "counter" and len(families[f"vllm:{name}"].samples) == 1
        return [families[f"vllm:{name}"].samples[0].value for name in ("prefix_cache_queries", "prefix_cache_hits")]

    before = counters()
    body = {"model": "llm", "messages": [{"role": "user", "content": f"{uuid.uuid4()} " + "a b c d " * 20}],
            "max_tokens": 1}
    for _ in range(2):
        response = httpx.post(f"{frontend.url}/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.status_code == 200, response.text
    queries, hits = (after - b for after, b in zip(counters(), before))
    assert queries >= 2 * 80 and hits >= 64, (queries, hits)


def test_vllm_counters_stay_monotonic_while_text_models_come_and_go():
    """A model's backend counters vanish when it is unloaded and restart at 0 when reloaded; the vLLM counters over
    all text models never go down (this failed while they were the sum of the latest scrape)."""
    from openai_frontend.metrics import _ScrapedCounters

    counters = _ScrapedCounters()

    def scrape(**models):
        counters.update({("prefix_cache_hits", model): value for model, value in models.items()})
        return counters.totals["prefix_cache_hits"]

    assert scrape(llm=100, llm_tight=32) == 132
    assert scrape(llm=228) == 260  # llm_tight unloaded: its 32 stay counted
    assert scrape(llm=228, llm_tight=16) == 276  # reloaded from 0
    assert scrape() == 276  # Triton unreachable: nothing new, nothing lost
    assert scrape(llm=240, llm_tight=16) == 288


def test_lora_requests_info_names_the_backends_running_and_waiting_adapters(frontend, triton_server, tight_model,
                                                                            gateway_adapters):
    """Two slots: gw-a and gw-b run, gw-c waits; when gw-a leaves gw-c runs; when all leave nothing is listed."""
    streams = []

    def hold(name: str) -> _HeldStream:
        streams.append(_HeldStream(triton_server, tight_model, name, gateway_adapters[name]))
        return streams[-1]

    try:
        a = hold("gw-a").first_token()
        hold("gw-b").first_token()  # both slots taken before gw-c comes
        hold("gw-c")
        families = _wait_for(frontend, lambda f: _lora_info(f) == ("gw-a,gw-b", "gw-c"))
        assert [s.value for s in _series(families, "multilora_lora_adapter_requests", model=tight_model,
                                         adapter="gw-c", state="waiting")] == [1]
        kv = [_one(families, name).value for name in KV_GAUGES]
        assert kv[0] == kv[1] > 0  # both names, one value: the tight model's running rows
        a.close()
        _wait_for(frontend, lambda f: _lora_info(f) == ("gw-b,gw-c", ""))
    finally:
        for stream in streams:
            stream.close()
    families = _wait_for(frontend, lambda f: _lora_info(f) == ("", ""))
    # The backend's per-adapter series drop to 0 with their adapter's last request.
    series = [s for s in _series(families, "multilora_lora_adapter_requests", model=tight_model)
              if s.labels["adapter"].startswith("gw-")]
    assert {s.labels["adapter"] for s in series} == {"gw-a", "gw-b", "gw-c"} and all(s.value == 0 for s in series)


def test_residency_follows_the_adapters_loaded(frontend, grpc_client, gateway_adapters):
    def llm_tiers(families) -> dict[str, float]:
        return {s.labels["tier"]: s.value for s in _series(families, "multilora_lora_adapters_resident", model="llm")}

    def vllm_counts(families) -> tuple[float, float]:
        return tuple(_one(families, f"vllm:num_{level}_loaded_lora_adapters").value for level in ("gpu", "cpu"))

    before = _scrape(frontend)
    assert not _series(before, "vllm:lora_adapter_loaded", adapter_name="gw-d")
    out = generate(grpc_client, STORY, max_tokens=2, temperature=0.0, lora_name="gw-d",
                   lora_path=str(gateway_adapters["gw-d"]))
    assert out.error is None, out.error
    after = _scrape(frontend)
    # One more adapter in a slot and in host memory (llm: 16 slots, 64 in host memory; a full tier evicts one).
    tiers = llm_tiers(before)
    assert llm_tiers(after) == {"device": min(tiers["device"] + 1, 16), "host": min(tiers["host"] + 1, 64)}
    # The vLLM-style counts are the sums over the models: they moved by as much.
    moved = tuple(llm_tiers(after)[tier] - tiers[tier] for tier in ("device", "host"))
    assert tuple(x - y for x, y in zip(vllm_counts(after), vllm_counts(before))) == moved
    assert [s.labels for s in _series(after, "vllm:lora_adapter_loaded", adapter_name="gw-d")] == [
        {"model_name": "llm", "adapter_name": "gw-d", "level": "gpu", "pinned": "false"}]


def test_static_adapters_are_resident_and_pinned(frontend):
    families = _scrape(frontend)
    for model, adapter in (("llm", "uppercase"), ("llm", "signature"), ("diffusion", "tiny-sd3-a")):
        assert [s.labels for s in _series(families, "vllm:lora_adapter_loaded", model_name=model,
                                          adapter_name=adapter)] == [
            {"model_name": model, "adapter_name": adapter, "level": "gpu", "pinned": "true"}], (model, adapter)


def test_a_loaded_models_pinned_adapter_shows_before_any_request_and_goes_with_the_model(frontend, http_client):
    """Unloading a model deletes its series: left behind, a router would keep sending its adapters here."""
    http_client.load_model(PINNED_MODEL)
    try:
        assert [s.labels for s in _series(_scrape(frontend), "vllm:lora_adapter_loaded", model_name=PINNED_MODEL)] \
            == [{"model_name": PINNED_MODEL, "adapter_name": "uppercase", "level": "gpu", "pinned": "true"}]
    finally:
        http_client.unload_model(PINNED_MODEL)
    _wait_for(frontend, lambda f: not _series(f, "vllm:lora_adapter_loaded", model_name=PINNED_MODEL)
              and not _series(f, "multilora_llm_kv_cache_blocks", model=PINNED_MODEL), timeout=30)


def test_a_diffusion_batch_counts_its_adapters_while_it_runs(frontend, http_client):
    """A backend series is made when first set non-zero: a `running` series at 0 for a name nobody else uses
    proves the diffusion model reported the batch while it denoised, and back at 0 when it was done."""
    path = diffusion_adapters_dir() / "tiny-sd3-a-diffusers"
    generate_images(http_client, lora_name="gw-image", lora_path=str(path), num_inference_steps=2, height=32,
                    width=32)
    families = _scrape(frontend)
    assert [(s.labels["state"], s.value) for s in _series(families, "multilora_lora_adapter_requests",
                                                          model="diffusion", adapter="gw-image")] == [("running", 0)]
    assert [s.labels for s in _series(families, "vllm:lora_adapter_loaded", adapter_name="gw-image")] == [
        {"model_name": "diffusion", "adapter_name": "gw-image", "level": "gpu", "pinned": "false"}]


def test_per_adapter_series_stay_bounded_however_many_adapters_were_seen(frontend, triton_server, grpc_client,
                                                                         lora_root):
    """40 adapters pass through one after another: their request series go idle as each finishes; past 16 idle
    ones (MAX_IDLE_SERIES in backends/lora/manager/metrics.py) the family is made anew with the live ones only.
    Before, every adapter ever served kept a series on Triton's port and on /metrics (2,000 adapters: 79 kB)."""
    names = [f"many-{i}" for i in range(40)]
    paths = make_random_adapters(load_smollm2, [lora_root / n for n in names], list(range(500, 540)), std=0.05,
                                 r=4, lora_alpha=8, target_modules=["q_proj"])

    def llm_series(name: str) -> list:
        text = httpx.get(triton_server.metrics_url, timeout=30).text
        return [s for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == name and s.labels.get("model") == "llm"]

    for name, path in zip(names, paths):
        out = generate(grpc_client, "Hi", max_tokens=1, temperature=0.0, lora_name=name, lora_path=str(path))
        assert out.error is None, (name, out.error)
    requests = llm_series("multilora_lora_adapter_requests")
    assert len(requests) <= 16 and all(s.value == 0 for s in requests), len(requests)
    assert not any(s.labels["adapter"] == "many-0" for s in requests)  # the first ones went with a renewal
    # Residency: one series per adapter the cache holds (64 in host memory), not per adapter ever seen.
    resident = llm_series("multilora_lora_adapter_resident_info")
    assert {s.labels["adapter"] for s in resident if s.value} >= {"many-39"}
    assert len(resident) <= 64 + 16
    # The frontend counts tokens per base model, not per adapter.
    response = httpx.post(f"{frontend.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "uppercase", "prompt": "Hi", "max_tokens": 1}, timeout=60)
    assert response.status_code == 200, response.text
    scraped = _scrape(frontend)
    tokens = _series(scraped, "multilora_frontend_completion_tokens")
    # Residency reaches /metrics once, under vLLM's name, not also as the backend's raw family.
    assert "multilora_lora_adapter_resident_info" not in scraped
    assert _series(scraped, "vllm:lora_adapter_loaded", adapter_name="many-39")
    assert not {s.labels["model"] for s in tokens} & {"uppercase", *names}, tokens
    assert any(s.labels["model"] == "llm" and s.value > 0 for s in tokens)
