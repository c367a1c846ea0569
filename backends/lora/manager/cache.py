"""Tiered LRU cache of LoRA adapters: device slots (stacked buffers in `LoRAContext`) over host memory over disk.

- Host tier: validated `LoRAAdapter`s, bounded by `max_cpu_loras` and optionally a byte budget, LRU evicted.
  Loads are single-flight: N threads asking for the same cold adapter wait on one load.
- Device tier: `max_loras` slots; `acquire` puts every adapter of a batch in a slot and marks it in use until
  `release`, so an adapter of an in-flight batch is never evicted mid-step.
- Pinned adapters (static ones from the model config) are never evicted from either tier.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Mapping, Sequence

from backends.errors import InvalidArgument, Unavailable
from backends.lora.adapters.peft import LoRAAdapter
from backends.lora.layers.context import LoRAContext
from backends.lora.manager.request import AdapterRef

log = logging.getLogger(__name__)


@dataclass
class CacheStats:
    hits: int = 0  # found in host or device tier
    misses: int = 0  # had to be read from disk
    loads: int = 0
    load_failures: int = 0
    load_seconds: float = 0.0
    bytes_loaded: int = 0
    host_evictions: int = 0
    device_evictions: int = 0
    device_loads: int = 0  # host -> slot copies

    def snapshot(self) -> "CacheStats":
        return replace(self)


class NoFreeSlot(Unavailable):
    """Every device slot is held by an in-flight batch or pinned; the scheduler should wait a step."""


class LoRACache:
    def __init__(
        self,
        context: LoRAContext,
        loader: Callable[[AdapterRef], LoRAAdapter],
        max_cpu_loras: int,
        max_cpu_bytes: int | None = None,
    ):
        if max_cpu_loras < context.max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({context.max_loras})")
        self.context = context
        self._loader = loader
        self.max_loras = context.max_loras
        self.max_cpu_loras = max_cpu_loras
        self.max_cpu_bytes = max_cpu_bytes
        self._lock = threading.RLock()
        self._host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU order, oldest first
        self._host_bytes = 0
        self._loading: dict[int, Future] = {}
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # int_id -> slot, LRU order
        self._dora_in_slots: set[int] = set()  # int_ids in slots that are DoRA adapters (never stacked)
        # A heap: the lowest free slot is taken first, which keeps the span of slots a batch uses short (the dense
        # decode shrink reads every slot from the lowest to the highest one in use).
        self._free_slots = list(range(self.max_loras))
        self._in_use: Counter[int] = Counter()
        self._pinned: set[int] = set()
        self._stats = CacheStats()

    # -- host tier ---------------------------------------------------------------------------------------------
    def lookup(self, ref: AdapterRef) -> LoRAAdapter | None:
        """The adapter if it is in host memory (counted as a hit), else None; never loads."""
        with self._lock:
            adapter = self._host.get(ref.key)
            if adapter is not None:
                self._host.move_to_end(ref.key)
                self._stats.hits += 1
            return adapter

    def content_digest(self, ref: AdapterRef) -> bytes | None:
        """The adapter's content digest if it is in host memory (no hit counted), else None."""
        with self._lock:
            adapter = self._host.get(ref.key)
        return None if adapter is None else adapter.digest

    def get(self, ref: AdapterRef) -> LoRAAdapter:
        """The adapter in host memory, loading it from disk once however many threads ask at the same time."""
        with self._lock:  # re-entrant: the hit check and the load registration are one atomic step
            adapter = self.lookup(ref)
            if adapter is not None:
                return adapter
            future = self._loading.get(ref.key)
            owner = future is None
            if owner:
                future = self._loading[ref.key] = Future()
                self._stats.misses += 1
        if not owner:
            return future.result()

        started = time.monotonic()
        try:
            adapter = self._loader(ref)
            if self.context.device.type == "cuda":  # pinned host memory: fast, async host -> device copies
                for m in adapter.modules.values():
                    m.A, m.Bt = m.A.pin_memory(), m.Bt.pin_memory()
                    if m.magnitude is not None:
                        m.magnitude = m.magnitude.pin_memory()
        except BaseException as exc:
            with self._lock:
                del self._loading[ref.key]
                self._stats.load_failures += 1
            future.set_exception(exc)
            raise
        seconds = time.monotonic() - started
        with self._lock:
            self._host[ref.key] = adapter
            self._host_bytes += adapter.nbytes
            self._stats.loads += 1
            self._stats.load_seconds += seconds
            self._stats.bytes_loaded += adapter.nbytes
            del self._loading[ref.key]
            self._evict_host(keep=ref.key)
        log.info("loaded LoRA adapter '%s' (%s, id %d, rank %d, %.1f MB) in %.3f s", ref.name, ref.path,
                 ref.int_id, adapter.rank, adapter.nbytes / 1e6, seconds)
        future.set_result(adapter)
        return adapter

    def _host_over(self) -> bool:
        over_bytes = self.max_cpu_bytes is not None and self._host_bytes > self.max_cpu_bytes
        return len(self._host) > self.max_cpu_loras or over_bytes

    def _evict_host(self, keep: int) -> None:
        for int_id in list(self._host):
            if not self._host_over():
                return
            if int_id == keep or int_id in self._pinned:
                continue
            self._host_bytes -= self._host.pop(int_id).nbytes
            self._stats.host_evictions += 1
            log.info("evicted LoRA adapter id %d from host memory", int_id)
        if self._host_over():
            log.warning("host LoRA cache over budget: %d adapters, %d bytes (pinned: %d)",
                        len(self._host), self._host_bytes, len(self._pinned))

    # -- device tier -------------------------------------------------------------------------------------------
    def acquire(self, refs: Sequence[AdapterRef], loaded: Mapping[int, LoRAAdapter] | None = None) -> list[int]:
        """Slots for `refs` (one per ref, repeats allowed), held until `release(refs)`. All or nothing. `loaded`:
        host copies already read (cache key -> adapter), used when the host tier evicted them meanwhile."""
        distinct = list(dict.fromkeys(r.key for r in refs))
        if len(distinct) > self.max_loras:
            raise InvalidArgument(f"{len(distinct)} distinct LoRA adapters in one batch, max_loras is "
                                  f"{self.max_loras}")
        by_id = {r.key: r for r in refs}
        adapters: dict[int, LoRAAdapter] = {k: a for k, a in (loaded or {}).items() if k in by_id}
        while True:
            # Disk/host work happens outside the lock; a host copy stays referenced here even if evicted meanwhile.
            for int_id in distinct:
                if int_id not in self._slot_of and int_id not in adapters:
                    adapters[int_id] = self.get(by_id[int_id])
            with self._lock:
                if any(i not in self._slot_of and i not in adapters for i in distinct):
                    continue  # a slot was evicted between the two steps: fetch its host copy, then retry
                if len(distinct) > 1:
                    self._refuse_dora_stack(distinct, adapters, by_id)
                taken: list[int] = []
                try:
                    for int_id in distinct:
                        if int_id in self._slot_of:
                            self._stats.hits += int_id not in adapters
                        else:
                            self._place(int_id, adapters[int_id])
                        self._slot_of.move_to_end(int_id)
                        self._in_use[int_id] += 1
                        taken.append(int_id)
                except BaseException:
                    self._release_ids(taken)
                    raise
                return [self._slot_of[r.key] for r in refs]

    def _refuse_dora_stack(self, distinct: list[int], adapters: Mapping[int, LoRAAdapter],
                           by_id: Mapping[int, AdapterRef]) -> None:
        """DoRA rescales a layer's whole output by its own norms: two adapters' rescalings do not compose (PEFT's
        result depends on the order it applies them), so a DoRA adapter is served alone."""
        dora = [by_id[i].name for i in distinct if (adapters[i].dora if i in adapters else i in self._dora_in_slots)]
        if dora:
            raise InvalidArgument(f"LoRA adapter '{dora[0]}' is a DoRA adapter (use_dora): DoRA adapters are served "
                                  f"alone, not in a LoRA stack")

    def _place(self, int_id: int, adapter: LoRAAdapter) -> None:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            victim = next((i for i in self._slot_of if not self._in_use[i] and i not in self._pinned), None)
            if victim is None:
                raise NoFreeSlot(f"all {self.max_loras} LoRA slots are in use by running batches or pinned")
            slot = self._slot_of.pop(victim)
            self._dora_in_slots.discard(victim)
            self._stats.device_evictions += 1
        self.context.load_slot(slot, adapter)
        self._slot_of[int_id] = slot
        if adapter.dora:
            self._dora_in_slots.add(int_id)
        self._stats.device_loads += 1

    def release(self, refs: Sequence[AdapterRef]) -> None:
        with self._lock:
            self._release_ids(list(dict.fromkeys(r.key for r in refs)))

    def _release_ids(self, ids: list[int]) -> None:
        for int_id in ids:
            self._in_use[int_id] -= 1
            if self._in_use[int_id] <= 0:
                del self._in_use[int_id]

    @contextlib.contextmanager
    def activate(self, refs: Sequence[AdapterRef]) -> Iterator[list[int]]:
        slots = self.acquire(refs)
        try:
            yield slots
        finally:
            self.release(refs)

    # -- pinning and removal -----------------------------------------------------------------------------------
    def pin(self, ref: AdapterRef) -> None:
        """Keep an adapter in host memory and in a device slot for good (static adapters)."""
        with self._lock:
            if ref.key not in self._pinned and len(self._pinned) + 1 > min(self.max_loras, self.max_cpu_loras):
                raise InvalidArgument(
                    f"cannot pin LoRA adapter '{ref.name}': {len(self._pinned)} adapters are pinned already and "
                    f"max_loras is {self.max_loras}, max_cpu_loras {self.max_cpu_loras}"
                )
        self.get(ref)
        with self._lock:
            self._pinned.add(ref.key)
        self.acquire([ref])
        self.release([ref])

    def unpin(self, int_id: int) -> None:
        with self._lock:
            self._pinned.discard(int_id)

    def remove(self, key: int) -> bool:
        """Drop an adapter (by cache key) from both tiers (unload). Refused while a running batch uses it."""
        with self._lock:
            if self._in_use[key]:
                raise Unavailable(f"LoRA adapter (cache key {key}) is in use by a running batch; retry")
            self._pinned.discard(key)
            found = False
            if key in self._host:
                self._host_bytes -= self._host.pop(key).nbytes
                found = True
            slot = self._slot_of.pop(key, None)
            self._dora_in_slots.discard(key)
            if slot is not None:
                self.context.clear_slot(slot)
                heapq.heappush(self._free_slots, slot)
                found = True
            return found

    # -- introspection -----------------------------------------------------------------------------------------
    def fits(self, keys: set) -> bool:
        """Whether these adapters (cache keys) can hold device slots at the same time, next to the pinned ones."""
        with self._lock:
            return len(set(keys) | self._pinned) <= self.max_loras

    def check_admissible(self, ref: AdapterRef) -> None:
        """Refuse at once an adapter that can never get a slot because pinned adapters hold every one (it would
        otherwise wait forever)."""
        if not self.fits({ref.key}):
            raise InvalidArgument(
                f"LoRA adapter '{ref.name}' cannot be served: all {self.max_loras} LoRA slots (max_loras) are held "
                f"by pinned adapters; unpin one or raise max_loras")

    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats.snapshot()

    def slots_in_use(self) -> int:
        """Slots held by in-flight batches (pinned but idle slots are not counted)."""
        with self._lock:
            return len(self._in_use)

    def slot_of(self, int_id: int) -> int | None:
        return self._slot_of.get(int_id)

    def host_ids(self) -> list[int]:
        with self._lock:
            return list(self._host)

    def device_ids(self) -> list[int]:
        with self._lock:
            return list(self._slot_of)

    @property
    def host_bytes(self) -> int:
        return self._host_bytes


