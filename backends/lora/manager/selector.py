"""`AdapterSelector`: a request's LoRA fields -> the adapters to run (validated, in host memory) and their scales.

Shared by every model that serves adapters. Names resolve through the registry (static, dynamic file, resolver
dirs); explicit paths must lie under an allowed root. The adapter is loaded (or found in the cache) here, on the
caller's thread, so a broken adapter is refused before the request is queued. When the dynamic registry changes,
adapters that were unloaded, re-pointed or rewritten on disk (vLLM's `load_inplace`) leave the cache.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from backends.errors import BackendError, InvalidArgument, Unavailable, same_kind
from backends.lora.adapters.peft import LoRAAdapter, load_adapter
from backends.lora.layers.context import LoRAContext
from backends.lora.manager.cache import LoRACache
from backends.lora.manager.config import LoRAServingConfig
from backends.lora.manager.prefetch import Prefetcher, abandon
from backends.lora.manager.request import DEFAULT_MAX_LORAS_PER_REQUEST, AdapterRef, LoRAFields, LoRASelection
from backends.lora.store.downloads import downloads, version_of
from backends.lora.store.entries import STATIC, check_name
from backends.lora.store.ids import IdBook
from backends.lora.store.locations import is_s3
from backends.lora.store.registry import LoRARegistry

log = logging.getLogger(__name__)

# Far above any useful strength (1 is the trained one; image users sweep up to 2 or 3), far below what turns an
# fp32 forward into inf/NaN logits (a scale of 1e24 did, found by the OpenAPI fuzz test).
MAX_LORA_SCALE = 100.0


def files_version(path: str) -> int:
    """A cheap fingerprint of an adapter's files (names, sizes, mtimes, inodes of a folder's files, or of a
    single-file adapter): a rewritten or replaced adapter gets a new one. Never 0 (0 marks fixed adapters)."""
    p = Path(path)
    try:  # dot files (editors' swap files, our download markers) are not the adapter
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        sig = tuple((f.name, st.st_mtime_ns, st.st_size, st.st_ino) for f in files for st in [f.stat()])
    except OSError:
        sig = ()
    return (hash(sig) & ((1 << 62) - 1)) | 1


def local_copy(location: str) -> str:
    """Where the adapter's files are on this machine: the location itself, or the download of an s3:// one."""
    return str(downloads().fetch(location)) if is_s3(location) else location


def version(location: str, path: str) -> int:
    """The version of an adapter's files: the object version for a download (the same objects downloaded again
    are the same adapter), else the files' fingerprint."""
    return version_of(Path(path)) if is_s3(location) else files_version(path)


@dataclass(frozen=True)
class _Loaded:
    name: str
    location: str  # a folder or file, or an s3:// URI
    by_name: bool  # resolved through the dynamic registry or a resolver dir (not an explicit path)


class AdapterSelector:
    def __init__(self, registry: LoRARegistry, cache: LoRACache, ids: IdBook | None = None,
                 prefetcher: Prefetcher | None = None,
                 max_per_request: int = DEFAULT_MAX_LORAS_PER_REQUEST):
        self.registry = registry
        self.cache = cache
        self.max_per_request = max_per_request  # adapters in one request's LoRA stack
        self.ids = ids or IdBook(resident=self._resident_ids)
        self.prefetcher = prefetcher  # reads cold adapters off the caller's thread (`select(wait=False)`)
        self._lock = threading.Lock()
        self._seen_version = registry.version
        self._loaded: dict[int, tuple[AdapterRef, _Loaded]] = {}  # cache key -> what was loaded under it
        self._stale: set[int] = set()  # cache keys to drop once no running batch uses them
        self._static: list[AdapterRef] = []

    @classmethod
    def build(cls, context: LoRAContext, config: LoRAServingConfig, prefetch: bool = False,
              load: Callable[[str], LoRAAdapter] | None = None) -> "AdapterSelector":
        """Registry + cache + selector over a patched model's context; static adapters are loaded and pinned.

        `prefetch`: a loader thread reads cold adapters for `select(wait=False)`, at most `max_cpu_loras` of them
        waiting for a slot at once. `load` reads one adapter (path -> validated adapter); default: a PEFT folder
        for `context`."""
        spec = context.spec
        load = load or (lambda path: load_adapter(path, spec, config.max_lora_rank, dtype=context.dtype))
        registry = LoRARegistry(config.static, config.registry_file, config.resolver_dirs, config.allowed_roots)
        cache = LoRACache(context, lambda ref: load(ref.path), config.max_cpu_loras, config.max_cpu_lora_bytes)
        selector = cls(registry, cache, prefetcher=Prefetcher(config.max_cpu_loras) if prefetch else None,
                       max_per_request=config.max_loras_per_request)
        selector.pin_static()
        log.info("LoRA: %d slots, max rank %d, host cache %d adapters; registry %s; allowed roots %s",
                 config.max_loras, config.max_lora_rank, config.max_cpu_loras, config.registry_file,
                 registry.paths.roots)
        return selector

    def close(self) -> None:
        """Stop the loader thread; reads not started fail their requests with Unavailable."""
        if self.prefetcher is not None:
            self.prefetcher.shutdown()

    def _resident_ids(self) -> set[int]:
        with self._lock:
            keys = set(self.cache.host_ids()) | set(self.cache.device_ids())
            return {ref.int_id for key, (ref, _) in self._loaded.items() if key in keys} | {
                ref.int_id for ref in self._static}

    def pin_static(self) -> list[AdapterRef]:
        """Load and pin every static adapter (model config); the first bad one raises with its error."""
        refs = []
        for entry in self.registry.static.values():
            ref = AdapterRef(self.ids.assign(entry.path, entry.int_id), entry.name, local_copy(entry.path))
            self.cache.pin(ref)
            refs.append(ref)
            log.info("static LoRA adapter '%s' pinned (%s, id %d)", entry.name, entry.path, ref.int_id)
        self._static = refs
        return refs

    def select(self, fields: LoRAFields, wait: bool = True) -> LoRASelection | None:
        """None for a base-model request; raises InvalidArgument / NotFound with the reason otherwise. A cold
        adapter is read here, unless `wait` is False and there is a prefetcher: then the selection's `ready`
        future settles once the loader thread has read it (or failed, with the reason)."""
        if fields.empty:
            if fields.scale is not None:
                raise InvalidArgument("lora_scale was given without lora_name or lora_path")
            return None
        scale = 1.0 if fields.scale is None else float(fields.scale)
        if not math.isfinite(scale) or scale < 0:
            raise InvalidArgument(f"lora_scale must be a finite number >= 0, got {fields.scale}")
        if scale > MAX_LORA_SCALE:
            raise InvalidArgument(f"lora_scale must be at most {MAX_LORA_SCALE:g}, got {fields.scale:g} "
                                  f"(a delta scaled that much overflows the model's activations)")
        self.sync()
        if fields.path:
            where = self.registry.paths.check(fields.path)
            if fields.name is not None:  # the registry's rules: names label metrics a router reads
                check_name(fields.name)
            name = fields.name or Path(where).name
            int_id, by_name, static = fields.int_id, False, False
        elif fields.name:
            entry = self.registry.resolve(fields.name)
            name, where = entry.name, entry.path
            int_id = fields.int_id if fields.int_id is not None else entry.int_id
            by_name, static = True, entry.source == STATIC
        else:
            raise InvalidArgument("lora_int_id was given without lora_name or lora_path")
        int_id = self.ids.assign(where, int_id)  # by location: an object's new version keeps the adapter's id
        pinned = next((r for r in self._static if r.int_id == int_id), None) if static else None
        if pinned is not None:  # in memory for good, whatever happens to its files or its store
            return LoRASelection(pinned, scale)
        try:
            path = local_copy(where)
        except Unavailable:
            resident = self._resident(where)  # the store is down and the download evicted, the weights in memory
            if resident is None:
                raise
            return LoRASelection(resident, scale)
        # Every non-static adapter is checked against its files on each request (a few stat calls), so a
        # rewritten adapter is a new cache entry.
        ref = AdapterRef(int_id, name, path, 0 if static else version(where, path))
        self.cache.check_admissible(ref)
        entry = _Loaded(name, where, by_name)
        if self.cache.lookup(ref) is not None:
            self._note_loaded(ref, entry, static)
            return LoRASelection(ref, scale)
        if wait or self.prefetcher is None:  # validate a cold adapter now: a broken one never reaches a batch
            self._load(ref, entry, static)
            return LoRASelection(ref, scale)
        return LoRASelection(ref, scale, ready=self.prefetcher.submit(lambda: self._load(ref, entry, static)))

    def _load(self, ref: AdapterRef, entry: _Loaded, static: bool) -> LoRAAdapter:
        """Read a cold adapter into the cache (on the caller's or the loader's thread); errors name its location."""
        try:
            adapter = self.cache.get(ref)
        except BackendError as exc:
            if ref.path == entry.location:
                raise
            message = str(exc).replace(ref.path, entry.location)  # name the object, not our download of it
            raise same_kind(exc, message if entry.location in message else
                            f"LoRA adapter '{entry.location}': {message}") from None
        cached = set(self.cache.host_ids()) | set(self.cache.device_ids())
        with self._lock:
            for key, (old, _) in list(self._loaded.items()):
                if old.int_id == ref.int_id and key != ref.key:
                    self._stale.add(key)  # an older version of the same files
                    log.info("LoRA adapter '%s' (%s) changed on disk; the new files are loaded", entry.name,
                             ref.path)
                elif key not in cached and key not in self._stale:
                    del self._loaded[key]  # evicted by the cache's LRU meanwhile
        self._note_loaded(ref, entry, static)
        return adapter

    def _note_loaded(self, ref: AdapterRef, entry: _Loaded, static: bool) -> None:
        if not static:
            with self._lock:
                self._loaded.setdefault(ref.key, (ref, entry))

    def _resident(self, where: str) -> AdapterRef | None:
        """The newest loaded version of the adapter at `where` still in the cache."""
        cached = set(self.cache.host_ids()) | set(self.cache.device_ids())
        with self._lock:
            found = [ref for key, (ref, loaded) in self._loaded.items()
                     if loaded.location == where and key in cached and key not in self._stale]
        return found[-1] if found else None

    def select_stack(self, stack: Sequence[LoRAFields], wait: bool = True) -> tuple[LoRASelection, ...]:
        """A request's adapters (() = base model); refuses more than `max_per_request`, one adapter twice, and a
        stack that could never hold its slots at once."""
        if len(stack) > self.max_per_request:
            raise InvalidArgument(f"{len(stack)} LoRA adapters in one request, max_loras_per_request is "
                                  f"{self.max_per_request}")
        selections: list[LoRASelection] = []
        try:
            for fields in stack:
                if (selection := self.select(fields, wait)) is not None:
                    selections.append(selection)
            self._check_stack(selections)
        except BaseException:
            abandon(selections)
            raise
        return tuple(selections)

    def _check_stack(self, selections: list[LoRASelection]) -> None:
        seen: dict[int, str] = {}
        for selection in selections:
            ref = selection.ref
            if ref.int_id in seen:
                raise InvalidArgument(f"LoRA adapter '{ref.name}' ({ref.path}) appears twice in one request; give "
                                      f"it once, with the scales added")
            seen[ref.int_id] = ref.name
        if len(selections) > 1 and not self.cache.fits({s.ref.key for s in selections}):
            raise InvalidArgument(f"the LoRA stack {[s.ref.name for s in selections]} needs {len(selections)} "
                                  f"adapter slots at once, more than max_loras ({self.cache.max_loras}) leaves "
                                  f"free next to the pinned adapters")

    def sync(self) -> None:
        """Drop older versions of rewritten adapters, and after a registry change, the adapters whose registry
        name is gone or points elsewhere now (adapters requested by path are not affected)."""
        version = self.registry.version
        with self._lock:
            if version == self._seen_version and not self._stale:
                return
            if version != self._seen_version:
                self._seen_version = version
                for key, (ref, loaded) in self._loaded.items():
                    if not loaded.by_name:
                        continue
                    try:
                        current = self.registry.resolve(loaded.name).path
                    except Exception:  # NotFound, or a path now outside the roots
                        current = None
                    if current != loaded.location:
                        self._stale.add(key)
            for key in list(self._stale):
                try:
                    self.cache.remove(key)
                except Unavailable:
                    continue  # a running batch still uses it: retry at the next sync
                self._stale.discard(key)
                ref, loaded = self._loaded.pop(key)
                if not any(r.int_id == ref.int_id for r, _ in self._loaded.values()):
                    self.ids.forget(ref.int_id)
                log.info("LoRA adapter '%s' (%s, id %d) dropped from the cache", loaded.name, loaded.location,
                         ref.int_id)


def select_lora(selector: AdapterSelector | None, stack: Sequence[LoRAFields],
                wait: bool = True) -> tuple[LoRASelection, ...]:
    """A request's LoRA stack -> selections (() = base model); a model without LoRA (max_loras 0) refuses any."""
    if selector is not None:
        return selector.select_stack(stack, wait)
    if any(not fields.empty for fields in stack):
        raise InvalidArgument("this model serves no LoRA adapters (max_loras is 0)")
    return ()
