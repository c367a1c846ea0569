"""`/metrics`: the frontend's own Prometheus metrics, the backends' metrics re-exported from Triton's metrics port,
and the Gateway API Inference Extension's model-server metrics under vLLM's names, so an inference gateway can
route a request to the replica that already holds its adapter.

Every gateway series is built from the scrape of Triton's metrics port at the time of the request, never from
this process's own counts: several frontends in front of one Triton then all report the same queues and adapters.
The endpoint picker reads one series per name, so the models on the port are folded into one replica's view.
Per-adapter residency is carried once, as `vllm:lora_adapter_loaded` (Triton's port keeps the raw family)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families

# The KV cache's shape per text model: blocks, tokens per block, prefix caching on (1) or off (0).
_KV_SHAPE = {"multilora_llm_kv_cache_blocks": 0, "multilora_llm_kv_cache_block_size": 1,
             "multilora_llm_prefix_caching_enabled": 2}
# Backend counters of the text models, re-exported under vLLM's counter names (see `_ScrapedCounters`).
_COUNTERS = {"multilora_llm_prefix_cache_queries_total": "prefix_cache_queries",
             "multilora_llm_prefix_cache_hits_total": "prefix_cache_hits",
             "multilora_llm_num_preemptions_total": "num_preemptions"}
# Our residency tiers under the names vLLM's proposed residency metrics use (vllm-project/vllm#54830).
_LEVELS = {"device": "gpu", "host": "cpu"}
# Families of Triton's port that /metrics carries only under their vLLM names (vllm:lora_adapter_loaded): one
# series per resident adapter is the largest part of a scrape, and twice would be twice the bytes.
_NOT_REEXPORTED = ("multilora_lora_adapter_resident_info",)


@dataclass
class BackendState:
    """One scrape of Triton's metrics port, reduced to what the gateway series need."""

    waiting: float = 0.0  # the text models' queues, summed
    running: float = 0.0
    kv_usage: float = 0.0  # the fullest text model's
    max_lora: int = 0  # the most LoRA slots any model has
    kv_shapes: dict[str, list[int]] = field(default_factory=dict)  # model -> [blocks, block size, prefix caching]
    counters: dict[tuple[str, str], float] = field(default_factory=dict)  # (vLLM name, no prefix; model) -> value
    requests: dict[str, Counter[str]] = field(  # state -> adapter -> requests, over every model
        default_factory=lambda: {"running": Counter(), "waiting": Counter()})
    resident: Counter[str] = field(default_factory=Counter)  # tier -> adapters, over every model
    resident_adapters: list[dict[str, str]] = field(default_factory=list)  # labels: model, adapter, tier, pinned

    @classmethod
    def parse(cls, triton_text: str) -> "BackendState":
        state = cls()
        for family in text_string_to_metric_families(triton_text):
            for sample in family.samples:
                state._add(sample.name, sample.labels, sample.value)
        return state

    def _add(self, name: str, labels: dict[str, str], value: float) -> None:
        if name == "multilora_llm_num_requests_waiting":
            self.waiting += value
        elif name == "multilora_llm_num_requests_running":
            self.running += value
        elif name == "multilora_llm_kv_cache_usage_ratio":
            self.kv_usage = max(self.kv_usage, value)
        elif name == "multilora_lora_max_loras":
            self.max_lora = max(self.max_lora, int(value))
        elif name in _KV_SHAPE:
            self.kv_shapes.setdefault(labels["model"], [0, 0, 0])[_KV_SHAPE[name]] = int(value)
        elif name in _COUNTERS:
            self.counters[(_COUNTERS[name], labels["model"])] = value
        elif name == "multilora_lora_adapter_requests" and value > 0:
            self.requests[labels["state"]][labels["adapter"]] += int(value)
        elif name == "multilora_lora_adapters_resident":
            self.resident[labels["tier"]] += value
        elif name == "multilora_lora_adapter_resident_info" and value > 0:
            self.resident_adapters.append(labels)

    def kv_cache(self) -> tuple[int, int, bool] | None:
        """(blocks, tokens per block, prefix caching) of the text model with the largest KV cache; None without
        text models."""
        shape = max(self.kv_shapes.values(), key=lambda shape: shape[0] * shape[1], default=None)
        return None if shape is None else (shape[0], shape[1], bool(shape[2]))

    def adapters(self, state: str) -> str:
        return ",".join(sorted(self.requests[state]))


class _ScrapedCounters:
    """vLLM's counters (vllm:prefix_cache_queries, vllm:prefix_cache_hits, vllm:num_preemptions) over the text
    models, kept monotonic: a model's series go when it is unloaded and restart at 0 when it is reloaded, so each
    scrape adds every model's increase since the last one (a value below the last is a restart: all of it is new),
    and an unloaded model's counts stay. A prometheus_client Counter only counts this process's own increments."""

    HELP = {"prefix_cache_queries": "Prompt tokens looked up in the prefix cache (text models)",
            "prefix_cache_hits": "Prompt tokens found in the prefix cache (text models)",
            "num_preemptions": "Sequences preempted because the KV cache was full (text models)"}

    def __init__(self):
        self.totals: Counter[str] = Counter()
        self._last: dict[tuple[str, str], float] = {}

    def update(self, scraped: dict[tuple[str, str], float]) -> None:
        if not scraped:  # Triton unreachable (or no text model): nothing new, and the last values stay the base
            return
        for key, value in scraped.items():
            last = self._last.get(key, 0.0)
            self.totals[key[0]] += value - last if value >= last else value
        self._last = dict(scraped)

    def collect(self):
        for name, help_ in self.HELP.items():
            yield CounterMetricFamily(f"vllm:{name}", help_, value=self.totals.get(name, 0.0))


class FrontendMetrics:
    def __init__(self, triton_metrics_url: str | None):
        self.registry = CollectorRegistry()
        self.triton_metrics_url = triton_metrics_url
        self.requests = PromCounter("multilora_frontend_requests_total", "HTTP requests by route and status",
                                    ["route", "status"], registry=self.registry)
        self.latency = Histogram("multilora_frontend_request_duration_seconds", "Request latency by route",
                                 ["route"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.prompt_tokens = PromCounter("multilora_frontend_prompt_tokens_total", "Prompt tokens", ["model"],
                                         registry=self.registry)
        self.completion_tokens = PromCounter("multilora_frontend_completion_tokens_total", "Generated tokens",
                                             ["model"], registry=self.registry)
        self.images = PromCounter("multilora_frontend_images_total", "Images generated", ["model"],
                                  registry=self.registry)
        self.restarts = PromCounter("multilora_model_restarts_total", "Models reloaded by the supervisor after "
                                    "their process stopped", ["model"], registry=self.registry)
        self._gateway_series()

    def _gateway_series(self) -> None:
        """The model-server protocol's series (what the endpoint picker scrapes), and vLLM's proposed residency
        series for routers that score adapter residency."""
        gauge = self._gauge
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (text models)")
        self.running = gauge("vllm:num_requests_running", "Requests being generated (text models)")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = full (the fullest text model)")
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc under its older name "
                                     "(older endpoint pickers read it)")
        self.cache_config = gauge("vllm:cache_config_info", "KV-cache configuration (value 1) of the text model "
                                  "with the largest cache", ("block_size", "num_gpu_blocks", "enable_prefix_caching"))
        self.counters = _ScrapedCounters()
        self.registry.register(self.counters)
        self.lora_info = gauge("vllm:lora_requests_info", "Running and waiting LoRA adapters (value: update time)",
                               ("max_lora", "running_lora_adapters", "waiting_lora_adapters"))
        self.adapter_loaded = gauge("vllm:lora_adapter_loaded", "1 per resident LoRA adapter; level: gpu = in a "
                                    "device slot, cpu = in host memory only",
                                    ("model_name", "adapter_name", "level", "pinned"))
        self.gpu_loaded = gauge("vllm:num_gpu_loaded_lora_adapters", "LoRA adapters in device slots")
        self.cpu_loaded = gauge("vllm:num_cpu_loaded_lora_adapters", "LoRA adapters in host memory")
        self.max_gpu_loras = gauge("vllm:max_gpu_lora_adapters", "LoRA device slots (max_loras)")

    def _gauge(self, name: str, help_: str, labels: tuple[str, ...] = ()) -> Gauge:
        return Gauge(name, help_, labels, registry=self.registry)

    async def _triton_text(self) -> str:
        if not self.triton_metrics_url:
            return ""
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                response = await client.get(self.triton_metrics_url)
            return response.text if response.status_code == 200 else ""
        except httpx.HTTPError:
            return ""  # Triton down: the frontend's own metrics still answer

    def _set_gateway_series(self, backend: BackendState) -> None:
        self.waiting.set(backend.waiting)
        self.running.set(backend.running)
        self.kv_usage.set(backend.kv_usage)
        self.gpu_cache_usage.set(backend.kv_usage)
        self.cache_config.clear()
        kv_cache = backend.kv_cache()
        if kv_cache is not None:
            blocks, block_size, prefix_caching = kv_cache
            self.cache_config.labels(str(block_size), str(blocks), str(prefix_caching)).set(1)
        self.counters.update(backend.counters)
        self.lora_info.clear()
        self.lora_info.labels(str(backend.max_lora), backend.adapters("running"),
                              backend.adapters("waiting")).set(time.time())
        self.adapter_loaded.clear()
        for labels in backend.resident_adapters:
            self.adapter_loaded.labels(labels["model"], labels["adapter"], _LEVELS[labels["tier"]],
                                       labels["pinned"]).set(1)
        self.gpu_loaded.set(backend.resident["device"])
        self.cpu_loaded.set(backend.resident["host"])
        self.max_gpu_loras.set(backend.max_lora)

    async def render(self) -> bytes:
        triton = await self._triton_text()
        self._set_gateway_series(BackendState.parse(triton))
        return generate_latest(self.registry) + _without(triton, _NOT_REEXPORTED).encode()


def _without(text: str, families: tuple[str, ...]) -> str:
    """Prometheus text without the samples and HELP/TYPE lines of `families`."""
    def kept(line: str) -> bool:
        name = line.split(" ", 3)[2] if line.startswith("# ") and line.count(" ") >= 2 else line
        return not any(name.startswith(f) and name[len(f):len(f) + 1] in ("", "{", " ") for f in families)
    return "".join(line for line in text.splitlines(keepends=True) if kept(line))
