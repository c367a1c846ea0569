"""Stable adapter ids, compatible with vLLM-Omni: derived from the adapter path when the request gives none."""

from __future__ import annotations

import hashlib
import threading
from typing import Callable, Iterable

from backends.errors import InvalidArgument, Unavailable

_MASK_63 = (1 << 63) - 1
MAX_IDS = 4096


def stable_lora_int_id(path: str) -> int:
    """First 8 bytes of SHA-256(path) as a 63-bit positive int; 0 (reserved for "no LoRA") becomes 1."""
    value = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") & _MASK_63
    return value or 1


class IdBook:
    """Remembers which path each id stands for, so one id can never silently mean two adapters.

    Bounded: when `max_ids` ids are bound, ids whose adapter is no longer cached (`resident` says which are)
    are forgotten; a client can therefore not grow the table without bound with made-up ids."""

    def __init__(self, max_ids: int = MAX_IDS, resident: Callable[[], Iterable[int]] = lambda: ()) -> None:
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()
        self.max_ids = max_ids
        self._resident = resident

    def assign(self, path: str, int_id: int | None = None) -> int:
        """An explicit id wins over the derived one; reusing an id for another path is an error that names
        neither adapter (ids are visible to every client; paths are not)."""
        if int_id is None:
            int_id = stable_lora_int_id(path)
        elif int_id <= 0:
            raise InvalidArgument(f"lora_int_id must be a positive integer, got {int_id}")
        with self._lock:
            full = int_id not in self._paths and len(self._paths) >= self.max_ids
        keep = set(self._resident()) if full else set()  # outside our lock: `resident` takes other locks
        with self._lock:
            known = self._paths.get(int_id)
            if known is None:
                if full:
                    self._paths = {i: p for i, p in self._paths.items() if i in keep}
                if len(self._paths) >= self.max_ids:
                    raise Unavailable(f"{self.max_ids} LoRA adapter ids are bound to cached adapters; "
                                      f"retry once some leave the cache")
                self._paths[int_id] = known = path
        if known != path:
            raise InvalidArgument(f"lora_int_id {int_id} is already bound to another adapter; use another id or "
                                  f"omit lora_int_id to derive one from the path")
        return int_id

    def forget(self, int_id: int) -> None:
        with self._lock:
            self._paths.pop(int_id, None)

    def __len__(self) -> int:
        return len(self._paths)
