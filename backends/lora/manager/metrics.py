"""LoRA cache counters and gauges published through the Python backend's custom metrics API (Triton's metrics
port), labelled by Triton model name; shared by every model that serves adapters.

Besides the cache's counters, a router needs to know per adapter what each replica is doing with it: requests
running or waiting in this model's own queue, and whether the adapter is resident (in a device slot, or in host
memory). The frontend turns these into the Gateway API Inference Extension's vLLM-named series; they come from
the backend so that several frontends in front of one Triton all report the same thing."""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Iterable

import triton_python_backend_utils as pb_utils

from backends.lora.manager.cache import CacheStats, LoRACache
from backends.lora.manager.request import AdapterRef

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
DEVICE, HOST = "device", "host"
MAX_IDLE_SERIES = 16
MAX_ADAPTER_SERIES = 256

log = logging.getLogger(__name__)


class _SeriesSet:
    """A gauge family with series per adapter: `update` sets the given (non-zero) series and zeroes the others.

    pb_utils deletes a series only with its whole family (the family holds every Metric it made), so a series that
    goes idle is set to 0 and kept for reuse (adapters come back) until more than MAX_IDLE_SERIES have piled up;
    then the family is made anew holding the live series only. A scrape thus carries at most
    MAX_ADAPTER_SERIES + MAX_IDLE_SERIES series per family, however many adapters were ever served. A value is
    sent only when it changed: each `set` is a round trip to the Triton process, and the LLM engine reports after
    every step."""

    def __init__(self, families: dict, name: str, description: str, labels: dict[str, str],
                 label_names: tuple[str, ...]):
        self._families, self._name, self._description = families, name, description  # see TritonLoRAMetrics.close
        self._labels, self._label_names = labels, label_names
        self._metrics: dict[tuple[str, ...], object] = {}  # label values -> Metric
        self._values: dict[tuple[str, ...], float] = {}  # the non-zero series, as last set
        self._capped = False
        self._renew()

    def _renew(self) -> None:
        self._metrics.clear()
        self._values.clear()
        self._families.pop(self._name, None)  # the last reference: its series are deleted on Triton's side now
        self._families[self._name] = pb_utils.MetricFamily(name=self._name, description=self._description,
                                                           kind=pb_utils.MetricFamily.GAUGE)

    def update(self, values: dict[tuple[str, ...], float]) -> None:
        """`values` in priority order: past MAX_ADAPTER_SERIES, the first ones are kept."""
        if self._name not in self._families:  # closed: the model is going away
            return
        capped = len(values) > MAX_ADAPTER_SERIES
        if capped and not self._capped:
            log.warning("%s: %d adapters to report, only the first %d get a series (MAX_ADAPTER_SERIES)",
                        self._name, len(values), MAX_ADAPTER_SERIES)
        self._capped = capped
        if capped:
            values = dict(list(values.items())[:MAX_ADAPTER_SERIES])
        gone = self._values.keys() - values.keys()
        if len(self._metrics) - len(self._values) + len(gone) > MAX_IDLE_SERIES:
            self._renew()
        for key in gone & self._values.keys():
            self._metrics[key].set(0)
            del self._values[key]
        for key, value in values.items():
            if self._values.get(key) != value:
                self._metric(key).set(value)
                self._values[key] = value

    def _metric(self, key: tuple[str, ...]):
        metric = self._metrics.get(key)
        if metric is None:
            labels = {**self._labels, **dict(zip(self._label_names, key))}
            metric = self._metrics[key] = self._families[self._name].Metric(labels=labels)
        return metric


class TritonLoRAMetrics:
    def __init__(self, model_name: str):
        self._labels = {"model": model_name}
        # Triton invalidates a Metric once its MetricFamily is garbage-collected: keep the families, here only.
        self._families: dict[str, object] = {}
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
        resident = self._family(
            "multilora_lora_adapters_resident", "LoRA adapters resident per tier: device = in a slot (pinned, "
            "running or idle), host = in host memory (an adapter is usually in both)", pb_utils.MetricFamily.GAUGE)
        self._slot_wait = self._metric(
            "multilora_lora_slot_wait_seconds", "How long the oldest request passed over for want of a LoRA slot has "
            "waited so far (0 when none waits for a slot); bounded by the scheduler's rotation",
            pb_utils.MetricFamily.GAUGE)
        self._rotations = self._metric(
            "multilora_lora_rotations_total", "Requests that waited max_bypass_steps for a LoRA slot, for which "
            "running adapters were closed to new requests until they drained", pb_utils.MetricFamily.COUNTER)
        self._admission_seen = (0.0, 0)
        self._resident = {tier: resident.Metric(labels={**self._labels, "tier": tier}) for tier in (DEVICE, HOST)}
        self._resident_counts: dict[str, int] = {}
        self._resident_info = self._series_set(
            "multilora_lora_adapter_resident_info", "1 per LoRA adapter resident in this model's cache; tier: "
            "device (in a slot) or host (host memory only); pinned: a static adapter, never evicted",
            ("adapter", "tier", "pinned"))
        self._requests = self._series_set(
            "multilora_lora_adapter_requests", "Requests per LoRA adapter in this model's own queue: running (in "
            "the batch) or waiting; a LoRA stack counts for each of its adapters", ("adapter", "state"))
        self._pinned: frozenset[str] = frozenset()
        # Cache key -> the names requests gave the resident adapters (the cache knows keys only; one adapter's
        # files may be asked for under two names). Requests are noted on Triton's execute thread, reports may run
        # on the LLM engine's thread.
        self._names: dict[int, set[str]] = {}
        self._names_lock = threading.Lock()

    def _family(self, name: str, description: str, kind):
        family = self._families[name] = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        return family

    def _metric(self, name: str, description: str, kind):
        return self._family(name, description, kind).Metric(labels=self._labels)

    def _series_set(self, name: str, description: str, label_names: tuple[str, ...]) -> _SeriesSet:
        return _SeriesSet(self._families, name, description, self._labels, label_names)

    def close(self) -> None:
        """Delete this model's series (call it from `finalize`): a MetricFamily deletes its series when it goes,
        but only while the stub still talks to Triton; left to the stub's exit they stay on the metrics port with
        their last values, and a router would see an unloaded model's adapters as resident."""
        self._families.clear()

    def start(self, static_adapters: Iterable[str], cache: LoRACache) -> None:
        """Static adapters are pinned, so always resident; reporting once now lets a router see them before any
        traffic arrives."""
        self._pinned = frozenset(static_adapters)
        self.report(cache)

    def note(self, refs: Iterable[AdapterRef]) -> None:
        """Names of the adapters a request resolved (a cold one was just loaded for it), even if the request then
        fails before it is queued."""
        with self._names_lock:
            for ref in refs:
                self._names.setdefault(ref.key, set()).add(ref.name)

    def report(self, cache: LoRACache, running: Iterable[AdapterRef] = (),
               waiting: Iterable[AdapterRef] = ()) -> None:
        """The requests per adapter (one ref per request and adapter), residency, and the cache's counters; the
        per-adapter series first, so that once the slot gauge reads idle the adapter lists do too."""
        running, waiting = list(running), list(waiting)
        counts = Counter([(r.name, "running") for r in running] + [(r.name, "waiting") for r in waiting])
        self._requests.update(dict(sorted(counts.items(), key=lambda kv: (kv[0][1] != "running", -kv[1]))))
        self._report_residency(set(cache.device_ids()), set(cache.host_ids()), running + waiting)
        stats = cache.stats()
        self._max_loras.set(cache.max_loras)
        for field, metric in self._counters.items():
            delta = getattr(stats, field) - getattr(self._seen, field)
            if delta:
                metric.increment(delta)
        self._seen = stats
        self._slots_in_use.set(cache.slots_in_use())

    def report_admission(self, slot_wait: float, rotations: int) -> None:
        slot_wait = round(slot_wait, 2)  # a set is a round trip to Triton: not for every millisecond
        last_wait, last_rotations = self._admission_seen
        if slot_wait != last_wait:
            self._slot_wait.set(slot_wait)
        if rotations > last_rotations:
            self._rotations.increment(rotations - last_rotations)
        self._admission_seen = (slot_wait, rotations)

    def _report_residency(self, device: set[int], host: set[int], queued: list[AdapterRef]) -> None:
        for tier, count in ((DEVICE, len(device)), (HOST, len(host))):
            if self._resident_counts.get(tier) != count:  # a set is a round trip to Triton: only on change
                self._resident[tier].set(count)
                self._resident_counts[tier] = count
        self.note(queued)
        with self._names_lock:  # forget evicted adapters: the book stays as small as the cache
            self._names = {key: names for key, names in self._names.items() if key in device or key in host}
            named = [(key, name) for key, names in self._names.items() for name in names]
        tiers = dict.fromkeys(self._pinned, DEVICE)
        for key, name in named:  # one name may have two cache keys (an adapter rewritten on disk): best tier wins
            if tiers.get(name) != DEVICE:
                tiers[name] = DEVICE if key in device else HOST
        order = sorted(tiers.items(), key=lambda nt: (nt[0] not in self._pinned, nt[1] != DEVICE))  # stable: LRU
        self._resident_info.update({(name, tier, str(name in self._pinned).lower()): 1 for name, tier in order})
