"""Engine counters published through the Python backend's custom metrics API (Triton's metrics port)."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from backends.lora.cache import CacheStats

# CacheStats field -> (counter name, help). Counters advance by the change since the last report.
_LORA_COUNTERS = {
    "hits": ("multilora_lora_cache_hits_total", "LoRA adapter lookups served from host memory or a device slot"),
    "misses": ("multilora_lora_cache_misses_total", "LoRA adapter lookups that had to read the adapter from disk"),
    "loads": ("multilora_lora_loads_total", "LoRA adapters read from disk and validated"),
    "load_failures": ("multilora_lora_load_failures_total", "LoRA adapter loads that failed (bad or missing files)"),
    "load_seconds": ("multilora_lora_load_seconds_total", "Time spent reading and validating LoRA adapters"),
    "host_evictions": ("multilora_lora_host_evictions_total", "LoRA adapters evicted from host memory"),
    "device_evictions": ("multilora_lora_device_evictions_total", "LoRA adapters evicted from a device slot"),
    "device_loads": ("multilora_lora_device_loads_total", "LoRA adapters copied into a device slot"),
}


class TritonEngineMetrics:
    """Implements `EngineObserver`; names follow Prometheus conventions, labelled by Triton model name."""

    def __init__(self, model_name: str):
        self._labels = {"model": model_name}
        # Triton invalidates a Metric once its MetricFamily is garbage-collected: keep the families.
        self._families: list = []
        self._finished_family = self._family(
            "multilora_llm_requests_finished_total",
            "Finished generation requests by finish reason (stop, length, abort)",
            pb_utils.MetricFamily.COUNTER,
        )
        self._finished: dict[str, object] = {}
        self._prompt_tokens = self._metric(
            "multilora_llm_prompt_tokens_total", "Prompt tokens processed", pb_utils.MetricFamily.COUNTER
        )
        self._generation_tokens = self._metric(
            "multilora_llm_generation_tokens_total", "Tokens generated", pb_utils.MetricFamily.COUNTER
        )
        self._waiting = self._metric(
            "multilora_llm_num_requests_waiting", "Requests queued, not started", pb_utils.MetricFamily.GAUGE
        )
        self._running = self._metric(
            "multilora_llm_num_requests_running", "Requests being generated", pb_utils.MetricFamily.GAUGE
        )

        self._lora_counters = {
            field: self._metric(name, help_, pb_utils.MetricFamily.COUNTER)
            for field, (name, help_) in _LORA_COUNTERS.items()
        }
        self._lora_seen = CacheStats()
        self._slots_in_use = self._metric(
            "multilora_lora_slots_in_use", "LoRA device slots held by running sequences", pb_utils.MetricFamily.GAUGE
        )
        self._adapters_resident = self._metric(
            "multilora_lora_adapters_in_host_memory", "LoRA adapters cached in host memory",
            pb_utils.MetricFamily.GAUGE,
        )

    def _family(self, name: str, description: str, kind):
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self._families.append(family)
        return family

    def _metric(self, name: str, description: str, kind):
        return self._family(name, description, kind).Metric(labels=self._labels)

    def on_finished(self, finish_reason: str, num_input_tokens: int, num_output_tokens: int) -> None:
        metric = self._finished.get(finish_reason)
        if metric is None:
            metric = self._finished_family.Metric(labels={**self._labels, "finish_reason": finish_reason})
            self._finished[finish_reason] = metric
        metric.increment(1)
        self._prompt_tokens.increment(num_input_tokens)

    def on_tokens(self, count: int) -> None:
        self._generation_tokens.increment(count)

    def on_queue(self, waiting: int, running: int) -> None:
        self._waiting.set(waiting)
        self._running.set(running)

    def on_lora(self, stats: CacheStats, slots_in_use: int, adapters_in_host: int) -> None:
        for field, metric in self._lora_counters.items():
            delta = getattr(stats, field) - getattr(self._lora_seen, field)
            if delta:
                metric.increment(delta)
        self._lora_seen = stats
        self._slots_in_use.set(slots_in_use)
        self._adapters_resident.set(adapters_in_host)
