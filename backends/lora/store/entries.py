"""What the registry holds: one `AdapterEntry` per adapter name, where entries come from (static, dynamic,
resolver dir), the names allowed, vLLM's `--lora-modules` forms, and the registry document format shared by the
file and the object-store registry."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from backends.errors import InvalidArgument

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATIC, DYNAMIC, RESOLVER = "static", "dynamic", "resolver"


def check_name(name: str) -> None:
    """Adapter names label metrics a router reads (comma-separated adapter lists): a few safe characters only."""
    if not SAFE_NAME.match(name):
        raise InvalidArgument(f"invalid LoRA adapter name {name!r}: use letters, digits, '.', '_', '-' (at most 128)")


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


def registry_document(version: int, entries: dict[str, AdapterEntry]) -> dict:
    """The registry as stored (file or object): names map to entries without their name and source."""
    return {"version": version,
            "adapters": {n: {k: v for k, v in asdict(e).items() if k not in ("name", "source")}
                         for n, e in sorted(entries.items())}}


def parse_registry_document(data: dict) -> tuple[int, dict[str, AdapterEntry]]:
    return int(data["version"]), {n: AdapterEntry(**{**e, "name": n, "source": DYNAMIC})
                                  for n, e in data["adapters"].items()}
