"""Adapter names -> folders: static adapters from the model config, a persisted dynamic registry file shared with
the frontend, and resolver directories (`<dir>/<name>/adapter_config.json`, like vLLM's filesystem resolver).

Every path must resolve, after symlinks, under an allowed root; anything else is refused.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from backends.errors import InvalidArgument, NotFound
from backends.lora.adapter import CONFIG_FILE
from backends.lora.object_store import S3Uri, downloads, is_s3, location

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATIC, DYNAMIC, RESOLVER = "static", "dynamic", "resolver"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    path: str
    base_model: str | None = None
    pinned: bool = False
    source: str = DYNAMIC
    int_id: int | None = None


def parse_lora_modules(spec: str) -> list[AdapterEntry]:
    """vLLM's --lora-modules forms: `name=path` items (space or comma separated), or JSON: one object
    `{"name": ..., "path": ..., "base_model_name": ...}`, a list of them, or a `{name: path}` mapping."""
    spec = spec.strip()
    if not spec:
        return []
    if spec[0] in "[{":
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"lora_modules is not valid JSON: {exc}") from None
        if isinstance(data, dict) and not {"name", "path"} & set(data):
            data = [{"name": k, "path": v} for k, v in data.items()]
        items = data if isinstance(data, list) else [data]
        entries = []
        for item in items:
            if not isinstance(item, dict) or not item.get("name") or not item.get("path"):
                raise InvalidArgument(f"lora_modules entry {item!r} needs 'name' and 'path'")
            entries.append(AdapterEntry(item["name"], str(item["path"]), item.get("base_model_name"),
                                        pinned=True, source=STATIC))
        return entries
    entries = []
    for item in re.split(r"[\s,]+", spec):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InvalidArgument(f"lora_modules item {item!r} must look like name=path")
        entries.append(AdapterEntry(name, path, pinned=True, source=STATIC))
    return entries


class PathPolicy:
    """Allowed adapter locations: local folders (compared after symlinks) and s3:// buckets or prefixes."""

    def __init__(self, roots: Iterable[str | Path]):
        roots = list(roots)
        self.s3_roots = [S3Uri.parse(r, allow_bucket=True) for r in roots if is_s3(r)]
        self.local_roots = [Path(r).expanduser().resolve() for r in roots if not is_s3(r)]

    @property
    def roots(self) -> list[str]:
        return [str(r) for r in self.local_roots] + [r.uri for r in self.s3_roots]

    def check(self, path: str | Path) -> str:
        """The real path of `path` (or the normalised s3:// URI) if it lies under an allowed root, else
        InvalidArgument."""
        if is_s3(path):
            uri = S3Uri.parse(str(path))
            if not any(uri.is_under(root) for root in self.s3_roots):
                raise InvalidArgument(f"LoRA path '{path}' is outside the allowed adapter roots "
                                      f"({', '.join(self.roots) or 'none configured'})")
            return uri.uri
        try:
            real = Path(path).expanduser().resolve()
        except ValueError as exc:  # a NUL byte: no file can have that name
            raise InvalidArgument(f"LoRA path {str(path)!r} is not a valid path ({exc})") from None
        if not any(real == root or real.is_relative_to(root) for root in self.local_roots):
            raise InvalidArgument(f"LoRA path '{path}' is outside the allowed adapter roots "
                                  f"({', '.join(self.roots) or 'none configured'})")
        return str(real)


def registry_document(version: int, entries: dict[str, AdapterEntry]) -> dict:
    """The registry as stored (file or object): names map to entries without their name and source."""
    return {"version": version,
            "adapters": {n: {k: v for k, v in asdict(e).items() if k not in ("name", "source")}
                         for n, e in sorted(entries.items())}}


def parse_registry_document(data: dict) -> tuple[int, dict[str, AdapterEntry]]:
    return int(data["version"]), {n: AdapterEntry(**{**e, "name": n, "source": DYNAMIC})
                                  for n, e in data["adapters"].items()}


def open_registry(location: str | Path) -> "RegistryFile":
    """The dynamic registry at `location`: a local JSON file, or an object shared by replicas (s3://...)."""
    if is_s3(location):
        from backends.lora.registry_s3 import S3RegistryObject

        return S3RegistryObject(str(location))
    return RegistryFile(location)


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

    def read(self) -> tuple[int, dict[str, AdapterEntry]]:
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


class LoRARegistry:
    def __init__(
        self,
        static: Iterable[AdapterEntry] = (),
        registry_file: str | Path | None = None,
        resolver_dirs: Iterable[str | Path] = (),  # folders or s3:// prefixes holding one adapter folder per name
        allowed_roots: Iterable[str | Path] = (),
    ):
        self.resolver_dirs = [d if is_s3(d) else Path(d).expanduser().resolve() for d in map(location, resolver_dirs)]
        self.static = {e.name: e for e in static}
        # Operators name static adapters and resolver dirs in config: those places are allowed by definition.
        self.paths = PathPolicy([*allowed_roots, *self.resolver_dirs, *(e.path for e in self.static.values())])
        self.static = {n: replace(e, path=self.paths.check(e.path)) for n, e in self.static.items()}
        self.file = open_registry(registry_file) if registry_file else None

    @property
    def version(self) -> int:
        return self.file.read()[0] if self.file else 0

    def _dynamic(self) -> dict[str, AdapterEntry]:
        return self.file.read()[1] if self.file else {}

    def _resolve_dir(self, name: str) -> AdapterEntry | None:
        if not SAFE_NAME.match(name) or name in (".", ".."):
            return None
        for root in self.resolver_dirs:
            if isinstance(root, str):  # a bucket prefix
                if downloads().has_adapter(f"{root}/{name}"):
                    return AdapterEntry(name, self.paths.check(f"{root}/{name}"), source=RESOLVER)
            elif (root / name / CONFIG_FILE).is_file():
                return AdapterEntry(name, self.paths.check(root / name), source=RESOLVER)
        return None

    def resolve(self, name: str) -> AdapterEntry:
        """Static first, then the dynamic registry, then resolver dirs; NotFound lists the known names."""
        entry = self.static.get(name) or self._dynamic().get(name)
        if entry is not None:
            return replace(entry, path=self.paths.check(entry.path))
        entry = self._resolve_dir(name)
        if entry is None:
            raise NotFound(f"LoRA adapter '{name}' not found; known adapters: {self.known_names()}")
        return entry

    def known_names(self) -> list[str]:
        names = set(self.static) | set(self._dynamic())
        for root in self.resolver_dirs:
            if isinstance(root, str):
                names.update(n for n in downloads().children(root) if SAFE_NAME.match(n))
            elif root.is_dir():
                names.update(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}"))
        return sorted(names)

    def add(self, entry: AdapterEntry, replace_existing: bool = False) -> int:
        if self.file is None:
            raise InvalidArgument("no dynamic LoRA registry file is configured")
        if not SAFE_NAME.match(entry.name):
            raise InvalidArgument(f"invalid LoRA adapter name {entry.name!r}: use letters, digits, '.', '_', '-'")
        if entry.name in self.static:
            raise InvalidArgument(f"LoRA adapter '{entry.name}' is static (model config); it cannot be replaced")
        real = self.paths.check(entry.path)

        def change(entries: dict[str, AdapterEntry]) -> dict[str, AdapterEntry]:
            if entry.name in entries and not replace_existing:
                raise InvalidArgument(f"The lora adapter '{entry.name}' has already been loaded.")
            entries[entry.name] = replace(entry, path=real, source=DYNAMIC)
            return entries

        return self.file.update(change)

    def remove(self, name: str) -> int:
        if self.file is None:
            raise InvalidArgument("no dynamic LoRA registry file is configured")

        def change(entries: dict[str, AdapterEntry]) -> dict[str, AdapterEntry]:
            if entries.pop(name, None) is None:
                raise NotFound(f"The lora adapter '{name}' cannot be found.")
            return entries

        return self.file.update(change)
