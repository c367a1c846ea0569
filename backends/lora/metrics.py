"""LoRA cache counters and gauges published through the Python backend's custom metrics API (Triton's metrics
port), labelled by Triton model name; shared by every model that serves adapters."""

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



class TritonLoRAMetrics:
    def __init__(self, model_name: str):
        self._labels = {"model": model_name}
        # Triton invalidates a Metric once its MetricFamily is garbage-collected: keep the families.
        self._families: list = []
        self._counters = {
            field: self._metric(name, help_, pb_utils.MetricFamily.COUNTER)
            for field, (name, help_) in _LORA_COUNTERS.items()
        }
        self._seen = CacheStats()
        self._slots_in_use = self._metric(
            "multilora_lora_slots_in_use", "LoRA device slots held by running batches", pb_utils.MetricFamily.GAUGE
        )
        self._max_loras = self._metric(
            "multilora_lora_max_loras", "LoRA device slots (distinct adapters per batch)", pb_utils.MetricFamily.GAUGE
        )
        self._adapters_resident = self._metric(
            "multilora_lora_adapters_in_host_memory", "LoRA adapters cached in host memory",
            pb_utils.MetricFamily.GAUGE,
        )

    def _metric(self, name: str, description: str, kind):
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self._families.append(family)
        return family.Metric(labels=self._labels)

    def report(self, stats: CacheStats, slots_in_use: int, adapters_in_host: int, max_loras: int) -> None:
        self._max_loras.set(max_loras)
        for field, metric in self._counters.items():
            delta = getattr(stats, field) - getattr(self._seen, field)
            if delta:
                metric.increment(delta)
        self._seen = stats
        self._slots_in_use.set(slots_in_use)
        self._adapters_resident.set(adapters_in_host)
