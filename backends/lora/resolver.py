"""A request's LoRA fields -> the adapter to run (validated, in host memory) and its scale.

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
from typing import Callable

from backends.errors import InvalidArgument, Unavailable
from backends.lora.cache import AdapterRef, LoRACache
from backends.lora.ids import IdBook
from backends.lora.registry import LoRARegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRAFields:
    """The LoRA part of a request, as sent (None = not given)."""

    name: str | None = None
    path: str | None = None
    scale: float | None = None
    int_id: int | None = None

    @property
    def empty(self) -> bool:
        return self.name is None and self.path is None and self.int_id is None


@dataclass(frozen=True)
class LoRASelection:
    ref: AdapterRef
    scale: float


def _files_signature(path: str) -> tuple:
    """Identity of an adapter's files (a folder's files, or a single-file adapter) to notice in-place rewrites."""
    p = Path(path)
    try:
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
        return tuple((f.name, st.st_mtime_ns, st.st_size, st.st_ino) for f in files for st in [f.stat()])
    except OSError:
        return ()


class AdapterResolver:
    def __init__(self, registry: LoRARegistry, cache: LoRACache, ids: IdBook | None = None,
                 run: Callable[[Callable], object] = lambda fn: fn()):
        self.registry = registry
        self.cache = cache
        self.ids = ids or IdBook()
        self._run = run  # where cold loads execute (the thread that owns torch work, for the LLM engine)
        self._lock = threading.Lock()
        self._seen_version = registry.version
        self._loaded: dict[int, tuple[str, str, tuple]] = {}  # int_id -> (name, path, files signature at load)
        self._stale: set[int] = set()  # to drop from the cache once no running batch uses them

    def pin_static(self) -> list[AdapterRef]:
        """Load and pin every static adapter (model config); the first bad one raises with its error."""
        refs = []
        for entry in self.registry.static.values():
            ref = AdapterRef(self.ids.assign(entry.path, entry.int_id), entry.name, entry.path)
            self.cache.pin(ref)
            refs.append(ref)
            log.info("static LoRA adapter '%s' pinned (%s, id %d)", entry.name, entry.path, ref.int_id)
        return refs

    def select(self, fields: LoRAFields) -> LoRASelection | None:
        """None for a base-model request; raises InvalidArgument / NotFound with the reason otherwise."""
        if fields.empty:
            if fields.scale is not None:
                raise InvalidArgument("lora_scale was given without lora_name or lora_path")
            return None
        scale = 1.0 if fields.scale is None else float(fields.scale)
        if not math.isfinite(scale) or scale < 0:
            raise InvalidArgument(f"lora_scale must be a finite number >= 0, got {fields.scale}")
        self.sync()
        if fields.path:
            path = str(self.registry.paths.check(fields.path))
            name = fields.name or Path(path).name
            int_id = fields.int_id
        elif fields.name:
            entry = self.registry.resolve(fields.name)
            name, path = entry.name, entry.path
            int_id = fields.int_id if fields.int_id is not None else entry.int_id
        else:
            raise InvalidArgument("lora_int_id was given without lora_name or lora_path")
        ref = AdapterRef(self.ids.assign(path, int_id), name, path)
        if self.cache.lookup(ref) is None:  # validate a cold adapter now: a broken one never reaches a batch
            self._run(lambda: self.cache.get(ref))
        with self._lock:
            self._loaded.setdefault(ref.int_id, (name, path, _files_signature(path)))
        return LoRASelection(ref, scale)

    def sync(self) -> None:
        """After a registry change, drop cached adapters whose name is gone, re-pointed or whose files changed."""
        version = self.registry.version
        with self._lock:
            if version == self._seen_version and not self._stale:
                return
            if version != self._seen_version:
                self._seen_version = version
                for int_id, (name, path, sig) in list(self._loaded.items()):
                    if name in self.registry.static:
                        continue
                    try:
                        current = self.registry.resolve(name).path
                    except Exception:  # NotFound, or a path now outside the roots
                        current = None
                    if current != path or _files_signature(path) != sig:
                        self._stale.add(int_id)
            for int_id in list(self._stale):
                try:
                    self.cache.remove(int_id)
                except Unavailable:
                    continue  # a running batch still uses it: retry at the next sync
                self._stale.discard(int_id)
                name, path, _ = self._loaded.pop(int_id, ("?", "?", ()))
                self.ids.forget(int_id)
                log.info("LoRA adapter '%s' (%s, id %d) dropped from the cache after a registry change",
                         name, path, int_id)


def select_lora(resolver: AdapterResolver | None, fields: LoRAFields) -> LoRASelection | None:
    """A model's request LoRA fields -> selection; a model without LoRA (max_loras 0) refuses any adapter."""
    if resolver is not None:
        return resolver.select(fields)
    if not fields.empty:
        raise InvalidArgument("this model serves no LoRA adapters (max_loras is 0)")
    return None
