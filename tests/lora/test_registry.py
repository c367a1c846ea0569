"""Name/path resolution, vLLM's --lora-modules forms, path rules, atomic registry file, stable ids."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from backends.errors import InvalidArgument, NotFound, Unavailable
from backends.lora.store.entries import AdapterEntry, parse_lora_modules
from backends.lora.store.ids import IdBook, stable_lora_int_id
from backends.lora.store.registry import LoRARegistry
from backends.lora.store.registry_file import RegistryFile


def fake_adapter(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return folder


def test_stable_id_is_sha256_prefix_as_63_bit_int():
    path = "/adapters/pirate"
    expected = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") & (2**63 - 1)
    assert stable_lora_int_id(path) == expected and 0 < expected < 2**63
    assert stable_lora_int_id(path) == stable_lora_int_id(path) != stable_lora_int_id(path + "2")


def test_explicit_id_wins_and_clashes_are_refused():
    book = IdBook()
    assert book.assign("/a") == stable_lora_int_id("/a")
    assert book.assign("/b", 7) == 7
    assert book.assign("/b", 7) == 7  # same pair again is fine
    with pytest.raises(InvalidArgument, match="lora_int_id 7 is already bound to another adapter") as err:
        book.assign("/c", 7)
    assert "/b" not in str(err.value)  # the other adapter's path is not revealed
    with pytest.raises(InvalidArgument, match="positive"):
        book.assign("/d", 0)


def test_id_table_is_bounded_and_keeps_resident_ids():
    resident = {1, 2}
    book = IdBook(max_ids=3, resident=lambda: resident)
    for i in (1, 2, 3):
        book.assign(f"/p{i}", i)
    assert book.assign("/p4", 4) == 4 and len(book) == 3  # 3 was not cached: forgotten to make room
    with pytest.raises(InvalidArgument):
        book.assign("/other", 1)  # resident ids keep their binding
    resident.add(4)
    with pytest.raises(Unavailable, match="3 LoRA adapter ids are bound"):
        book.assign("/p5", 5)


@pytest.mark.parametrize("spec,expected", [
    ("a=/x/a b=/x/b", [("a", "/x/a"), ("b", "/x/b")]),
    ("a=/x/a,b=/x/b", [("a", "/x/a"), ("b", "/x/b")]),
    ('{"name": "a", "path": "/x/a", "base_model_name": "m"}', [("a", "/x/a")]),
    ('[{"name": "a", "path": "/x/a"}, {"name": "b", "path": "/x/b"}]', [("a", "/x/a"), ("b", "/x/b")]),
    ('{"a": "/x/a"}', [("a", "/x/a")]),
])
def test_parse_lora_modules_forms(spec, expected):
    entries = parse_lora_modules(spec)
    assert [(e.name, e.path) for e in entries] == expected
    assert all(e.pinned and e.source == "static" for e in entries)


@pytest.mark.parametrize("spec", ["a", "=/x", '{"name": "a"}', "[1, 2]", "{bad json"])
def test_parse_lora_modules_rejects_malformed(spec):
    with pytest.raises(InvalidArgument):
        parse_lora_modules(spec)


def test_resolution_order_and_not_found_lists_known(tmp_path):
    root = tmp_path / "adapters"
    static = fake_adapter(root / "static")
    fake_adapter(root / "dyn")
    fake_adapter(tmp_path / "resolver" / "auto")
    reg = LoRARegistry(static=[AdapterEntry("s", str(static), pinned=True, source="static")],
                       registry_file=tmp_path / "registry.json", resolver_dirs=[tmp_path / "resolver"],
                       allowed_roots=[root])
    reg.add(AdapterEntry("d", str(root / "dyn")))
    assert reg.resolve("s").source == "static" and reg.resolve("d").source == "dynamic"
    assert reg.resolve("auto").path == str((tmp_path / "resolver" / "auto").resolve())
    with pytest.raises(NotFound, match=r"LoRA adapter 'nope' not found; known adapters: \['auto', 'd', 's'\]"):
        reg.resolve("nope")
    with pytest.raises(InvalidArgument, match="has already been loaded"):
        reg.add(AdapterEntry("d", str(root / "dyn")))
    assert reg.version == 1
    reg.add(AdapterEntry("d", str(root / "static")), replace_existing=True)
    assert reg.version == 2 and reg.resolve("d").path == str(static.resolve())
    reg.remove("d")
    with pytest.raises(NotFound):
        reg.resolve("d")
    with pytest.raises(NotFound, match="cannot be found"):
        reg.remove("d")


def test_a_second_reader_sees_changes_without_restart(tmp_path):
    fake_adapter(tmp_path / "root" / "x")
    writer = LoRARegistry(registry_file=tmp_path / "r.json", allowed_roots=[tmp_path / "root"])
    reader = LoRARegistry(registry_file=tmp_path / "r.json", allowed_roots=[tmp_path / "root"])
    with pytest.raises(NotFound):
        reader.resolve("x")
    writer.add(AdapterEntry("x", str(tmp_path / "root" / "x")))
    assert reader.resolve("x").name == "x" and reader.version == 1


def test_path_escapes_are_refused(tmp_path):
    root = tmp_path / "root"
    fake_adapter(root / "ok")
    outside = fake_adapter(tmp_path / "outside")
    os.symlink(outside, root / "link")
    reg = LoRARegistry(registry_file=tmp_path / "r.json", allowed_roots=[root], resolver_dirs=[])
    for path in (str(root / ".." / "outside"), str(root / "link"), "/etc", str(tmp_path)):
        with pytest.raises(InvalidArgument, match="outside the allowed adapter roots"):
            reg.add(AdapterEntry("x", path))
        with pytest.raises(InvalidArgument, match="outside the allowed adapter roots"):
            reg.paths.check(path)
    reg.add(AdapterEntry("ok", str(root / "sub" / ".." / "ok")))
    assert reg.resolve("ok").path == str((root / "ok").resolve())


def test_resolver_refuses_names_that_walk_out(tmp_path):
    fake_adapter(tmp_path / "secret")
    reg = LoRARegistry(resolver_dirs=[tmp_path / "resolver"])
    (tmp_path / "resolver").mkdir()
    for name in ("../secret", "..", "a/b"):
        with pytest.raises(NotFound):
            reg.resolve(name)


def test_concurrent_readers_never_see_half_written_file(tmp_path):
    path = tmp_path / "r.json"
    root = tmp_path / "root"
    for i in range(4):
        fake_adapter(root / f"a{i}")
    stop = threading.Event()
    errors: list[Exception] = []
    reads = [0]

    def writer(w):
        reg = LoRARegistry(registry_file=path, allowed_roots=[root])  # own file handle and lock, like a process
        for i in range(40):
            reg.add(AdapterEntry(f"w{w}-{i}", str(root / f"a{i % 4}")))
            if i % 3 == 0:
                reg.remove(f"w{w}-{i}")

    def reader():
        while not stop.is_set():
            try:
                if path.exists():
                    data = json.loads(path.read_text())
                    assert isinstance(data["adapters"], dict)
                    reads[0] += 1
            except FileNotFoundError:
                pass
            except Exception as exc:  # a torn read
                errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors[:3]
    assert reads[0] > 10
    version, entries = RegistryFile(path).read()
    assert version == 3 * (40 + 14)  # every add and remove counted once: no lost update
    assert len(entries) == 3 * (40 - 14)


@pytest.mark.parametrize("damage", ["truncated", "not json", "wrong shape"])
def test_a_broken_registry_file_keeps_the_last_good_entries(tmp_path, caplog, damage):
    fake_adapter(tmp_path / "root" / "x")
    path = tmp_path / "r.json"
    writer = LoRARegistry(registry_file=path, allowed_roots=[tmp_path / "root"])
    reader = LoRARegistry(registry_file=path, allowed_roots=[tmp_path / "root"])
    writer.add(AdapterEntry("x", str(tmp_path / "root" / "x")))
    assert reader.resolve("x").name == "x"
    good = path.read_text()
    path.write_text({"truncated": good[: len(good) // 2], "not json": "nonsense",
                     "wrong shape": '{"version": 3, "adapters": [1, 2]}'}[damage])
    with caplog.at_level("ERROR"):
        assert reader.resolve("x").name == "x" and reader.version == 1
    assert f"LoRA registry {path} is not valid" in caplog.text and "keeping the last good registry" in caplog.text
    writer.add(AdapterEntry("y", str(tmp_path / "root" / "x")))  # the next write repairs the file
    assert reader.resolve("y").name == "y" and json.loads(path.read_text())["version"] == 2
