"""Stable adapter ids, compatible with vLLM-Omni: derived from the adapter path when the request gives none."""

from __future__ import annotations

import hashlib
import threading

from backends.errors import InvalidArgument

_MASK_63 = (1 << 63) - 1


def stable_lora_int_id(path: str) -> int:
    """First 8 bytes of SHA-256(path) as a 63-bit positive int; 0 (reserved for "no LoRA") becomes 1."""
    value = int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big") & _MASK_63
    return value or 1


class IdBook:
    """Remembers which path each id stands for, so one id can never silently mean two adapters."""

    def __init__(self) -> None:
        self._paths: dict[int, str] = {}
        self._lock = threading.Lock()

    def assign(self, path: str, int_id: int | None = None) -> int:
        """An explicit id wins over the derived one; reusing an id for another path is an error."""
        if int_id is None:
            int_id = stable_lora_int_id(path)
        elif int_id <= 0:
            raise InvalidArgument(f"lora_int_id must be a positive integer, got {int_id}")
        with self._lock:
            known = self._paths.setdefault(int_id, path)
        if known != path:
            raise InvalidArgument(
                f"lora_int_id {int_id} already refers to adapter '{known}', cannot also refer to '{path}'"
            )
        return int_id

    def forget(self, int_id: int) -> None:
        with self._lock:
            self._paths.pop(int_id, None)
