"""Adapter names -> locations: static adapters from the model config, the dynamic registry (a file, or an object
shared by replicas) and resolver directories (`<dir>/<name>/adapter_config.json`, like vLLM's filesystem
resolver). Every location must lie under an allowed root; anything else is refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterable

from backends.errors import InvalidArgument, NotFound
from backends.lora.adapters.files import CONFIG_FILE
from backends.lora.store.downloads import downloads
from backends.lora.store.entries import DYNAMIC, RESOLVER, SAFE_NAME, AdapterEntry, check_name
from backends.lora.store.locations import is_s3, location
from backends.lora.store.registry_file import RegistryFile
from backends.lora.store.registry_s3 import S3RegistryObject
from backends.lora.store.roots import PathPolicy


def open_registry(location: str | Path) -> RegistryFile | S3RegistryObject:
    """The dynamic registry at `location`: a local JSON file, or an object shared by replicas (s3://...)."""
    if is_s3(location):
        return S3RegistryObject(str(location))
    return RegistryFile(location)


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

    def _dynamic(self, fresh: bool = False) -> dict[str, AdapterEntry]:
        return self.file.read(fresh)[1] if self.file else {}

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
        """Static first, then the dynamic registry, then resolver dirs, then the dynamic registry read afresh (an
        adapter loaded a moment ago through any replica); NotFound lists the known names."""
        entry = self.static.get(name) or self._dynamic().get(name)
        if entry is None:
            entry = self._resolve_dir(name)
            if entry is not None:
                return entry
            entry = self._dynamic(fresh=True).get(name)
        if entry is None:
            raise NotFound(f"LoRA adapter '{name}' not found; known adapters: {self.known_names()}")
        return replace(entry, path=self.paths.check(entry.path))

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
        check_name(entry.name)
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
