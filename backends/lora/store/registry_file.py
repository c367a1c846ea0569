"""The dynamic LoRA registry as one local JSON file, shared by the frontend and the backends of one machine."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

from backends.lora.store.entries import DYNAMIC, AdapterEntry, parse_registry_document, registry_document

log = logging.getLogger(__name__)


class RegistryFile:
    """JSON file `{"version": n, "adapters": {name: entry}}`, replaced atomically on every change.

    Writers serialise on a lock file and write temp file + fsync + rename, so readers (any process) see the old
    or the new file, never half of one. Readers re-parse only when the file's stat signature changes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sig: tuple | None = None
        self._cached: tuple[int, dict[str, AdapterEntry]] = (0, {})
        self._lock = threading.Lock()

    def _signature(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self, fresh: bool = False) -> tuple[int, dict[str, AdapterEntry]]:
        """Always current (one stat per read); `fresh` is for the S3 registry's interface."""
        with self._lock:
            sig = self._signature()
            if sig == self._sig:
                return self._cached
            try:
                data = json.loads(self.path.read_text()) if sig is not None else {"version": 0, "adapters": {}}
                version, adapters = parse_registry_document(data)
            except FileNotFoundError:  # removed between stat and read: read again next time
                return self._cached
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # A file broken by hand (truncated, not JSON, wrong shape): keep serving the last good entries and
                # say so once per broken version of the file; the next atomic write replaces it.
                self._sig = sig
                log.error("LoRA registry %s is not valid (%s: %s); keeping the last good registry (version %d, "
                          "%d adapters)", self.path, type(exc).__name__, exc, self._cached[0], len(self._cached[1]))
                return self._cached
            self._sig, self._cached = sig, (version, adapters)
            return self._cached

    def update(self, change: Callable[[dict[str, AdapterEntry]], dict[str, AdapterEntry]]) -> int:
        """Apply `change` to the current entries under the writers' lock; returns the new version."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with self._lock:
                self._sig = None  # another process may have written: re-read under the lock
            version, entries = self.read()
            entries = change(dict(entries))
            data = registry_document(version + 1, entries)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            with self._lock:  # what we wrote is the last good registry, even if someone breaks the file next
                self._sig, self._cached = None, (version + 1, {n: replace(e, source=DYNAMIC)
                                                                for n, e in entries.items()})
            return version + 1
