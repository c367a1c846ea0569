"""`/metrics`: the frontend's own Prometheus metrics, the backends' metrics re-exported from Triton's metrics port,
and the Gateway API Inference Extension's model-server metrics under vLLM's names, so an inference gateway can
route a request to the replica that already holds its adapter."""

from __future__ import annotations

import time
from collections import Counter
from typing import Sequence

import httpx
from prometheus_client import CollectorRegistry, Counter as PromCounter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families


# Backend gauges (Triton's metrics port) behind the vLLM names.
_BACKEND_GAUGES = {"multilora_llm_num_requests_waiting": "waiting", "multilora_llm_num_requests_running": "running",
                   "multilora_llm_kv_cache_usage_ratio": "kv", "multilora_lora_max_loras": "slots"}


class AdapterActivity:
    """In-flight requests per adapter: waiting until their first token/image, then running. A request with a LoRA
    stack counts for each of its adapters (each holds a slot while it runs)."""

    def __init__(self) -> None:
        self.waiting: Counter[str] = Counter()
        self.running: Counter[str] = Counter()

    def start(self, adapters: Sequence[str]) -> None:
        for adapter in adapters:
            self.waiting[adapter] += 1

    def first_output(self, adapters: Sequence[str]) -> None:
        for adapter in adapters:
            if self.waiting[adapter] > 0:
                self.waiting[adapter] -= 1
                self.running[adapter] += 1

    def finish(self, adapters: Sequence[str], started: bool) -> None:
        tally = self.running if started else self.waiting
        for adapter in adapters:
            tally[adapter] = max(0, tally[adapter] - 1)

    def names(self, tally: Counter[str]) -> str:
        return ",".join(sorted(n for n, c in tally.items() if c > 0))


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
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting LoRA adapters (value: update time)",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
                               registry=self.registry)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled (text models)",
                             registry=self.registry)
        self.running = Gauge("vllm:num_requests_running", "Requests being generated (text models)",
                             registry=self.registry)
        self.kv_usage = Gauge("vllm:gpu_cache_usage_perc", "KV-cache utilisation, 1 = full (text models)",
                              registry=self.registry)
        self.restarts = PromCounter("multilora_model_restarts_total", "Models reloaded by the supervisor after "
                                    "their process stopped", ["model"], registry=self.registry)
        self.activity = AdapterActivity()

    async def _triton_text(self) -> str:
        if not self.triton_metrics_url:
            return ""
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                response = await client.get(self.triton_metrics_url)
            return response.text if response.status_code == 200 else ""
        except httpx.HTTPError:
            return ""  # Triton down: the frontend's own metrics still answer

    @staticmethod
    def _backend_totals(triton_text: str) -> dict[str, float]:
        """Text-model queue gauges summed over models; KV use and slot count: the largest model's."""
        totals = dict.fromkeys(_BACKEND_GAUGES.values(), 0.0)
        for family in text_string_to_metric_families(triton_text):
            for sample in family.samples:
                key = _BACKEND_GAUGES.get(sample.name)
                if key in ("kv", "slots"):
                    totals[key] = max(totals[key], sample.value)
                elif key:
                    totals[key] += sample.value
        return totals

    async def render(self) -> bytes:
        triton = await self._triton_text()
        totals = self._backend_totals(triton)
        self.waiting.set(totals["waiting"])
        self.running.set(totals["running"])
        self.kv_usage.set(totals["kv"])
        self.lora_info.clear()
        self.lora_info.labels(str(int(totals["slots"])), self.activity.names(self.activity.running),
                              self.activity.names(self.activity.waiting)).set(time.time())
        return generate_latest(self.registry) + triton.encode()
