"""Adapters and the dynamic registry in object storage (issue 15), against a real S3 API: moto's standalone server
in its own process, reached through boto3's standard configuration (AWS_ENDPOINT_URL and credentials)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest

from backends.errors import InvalidArgument, NotFound, Unavailable
from backends.lora.store.downloads import AdapterDownloads, version_of
from backends.lora.store.entries import AdapterEntry
from backends.lora.store.locations import S3Uri, split_locations
from backends.lora.store.registry_s3 import S3RegistryObject
from backends.lora.store.roots import PathPolicy
from backends.lora.store.s3 import s3_client
from tools.launchers.s3 import S3Server

BUCKET = "adapters"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log").start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # boto3 in this process finds the server as a deployment would
    server.client().create_bucket(Bucket=BUCKET)
    try:
        yield server
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        server.stop()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A small PEFT adapter folder (adapter_config.json + adapter_model.safetensors) for the tiny Llama."""
    from tools.fixtures.adapters import make_random_adapter
    from tools.fixtures.llm_families import load_family, make_family

    folder = make_family("llama")
    return make_random_adapter(lambda: load_family(folder), tmp_path_factory.mktemp("peft") / "a", seed=3, std=0.5, r=4,
                               lora_alpha=8, target_modules=["q_proj", "v_proj"])


class CountingClient:
    """The real boto3 client, counting downloads (what "one download per adapter" is about)."""

    def __init__(self):
        self.client = s3_client()
        self.downloads = 0
        self._lock = threading.Lock()

    def download_file(self, *args, **kwargs):
        with self._lock:
            self.downloads += 1
        return self.client.download_file(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_locations_parse_and_allowed_roots_cover_buckets_and_prefixes():
    assert split_locations("s3://a-bucket/x:/tmp/y:s3://b-bucket") == ["s3://a-bucket/x", Path("/tmp/y"),
                                                                      "s3://b-bucket"]
    policy = PathPolicy(["s3://team-a/adapters", "s3://shared-bucket"])
    assert policy.check("s3://team-a/adapters/sql/") == "s3://team-a/adapters/sql"
    assert policy.check("s3://shared-bucket/any/thing") == "s3://shared-bucket/any/thing"
    for bad in ("s3://team-a/adapters-evil/x", "s3://team-a/other/x", "s3://team-b/adapters/x",
                "s3://team-a/adapters/../secrets/x", "s3://team-a/adapters//x", "s3://Bad_Bucket/x", "s3://team-a"):
        with pytest.raises(InvalidArgument, match="s3://"):
            policy.check(bad)
    with pytest.raises(InvalidArgument, match="outside the allowed adapter roots"):
        PathPolicy(["/tmp"]).check("s3://team-a/adapters/sql")  # no bucket allowed: nothing in S3 is


def test_an_adapter_downloads_once_under_concurrency_and_a_changed_object_is_a_new_version(s3, adapter, tmp_path):
    uri = s3.upload(adapter, BUCKET, "team/one")
    counting = CountingClient()
    downloads = AdapterDownloads(tmp_path / "cache", check_ttl_s=0, client_factory=lambda: counting)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(downloads.fetch(uri))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 8
    local = results[0]
    files = len(list(adapter.iterdir()))  # adapter_config.json, adapter_model.safetensors, README.md
    assert counting.downloads == files  # each once
    for f in adapter.iterdir():
        assert (local / f.name).read_bytes() == f.read_bytes()

    # Another process on the same disk (a second cache object over the same folder) finds the copy.
    other = CountingClient()
    assert AdapterDownloads(tmp_path / "cache", client_factory=lambda: other).fetch(uri) == local
    assert other.downloads == 0

    weights = adapter / "adapter_model.safetensors"
    s3.client().put_object(Bucket=BUCKET, Key="team/one/adapter_model.safetensors", Body=weights.read_bytes() + b" ")
    newer = downloads.fetch(uri)
    assert newer != local and (newer / "adapter_model.safetensors").stat().st_size == weights.stat().st_size + 1
    assert counting.downloads == 2 * files  # a new version is a whole new folder


def test_the_download_cache_is_bounded_least_recently_used_first(s3, adapter, tmp_path):
    a, b = s3.upload(adapter, BUCKET, "lru/a"), s3.upload(adapter, BUCKET, "lru/b")
    size = sum(f.stat().st_size for f in adapter.iterdir())
    downloads = AdapterDownloads(tmp_path / "cache", max_bytes=int(size * 1.5), check_ttl_s=0, min_age_s=0)
    first = downloads.fetch(a)
    second = downloads.fetch(b)
    assert not first.exists() and second.exists()  # a was least recently used
    assert downloads.fetch(a).exists() and not second.exists()


def test_a_single_file_adapter_is_fetched_as_that_file(s3, tmp_path):
    single = tmp_path / "style.safetensors"
    single.write_bytes(b"not checked here: the loader validates the contents")
    uri = s3.upload(single, BUCKET, "kohya/style.safetensors")
    local = AdapterDownloads(tmp_path / "cache").fetch(uri)
    assert local.name == "style.safetensors" and local.read_bytes() == single.read_bytes()


def test_a_missing_object_is_not_found_by_name(s3, tmp_path):
    downloads = AdapterDownloads(tmp_path / "cache")
    with pytest.raises(NotFound, match=r"'s3://adapters/nowhere/x' not found"):
        downloads.fetch("s3://adapters/nowhere/x")
    with pytest.raises(NotFound, match="no bucket 'no-such-bucket'"):
        downloads.fetch("s3://no-such-bucket/x")


def test_when_the_store_is_down_cached_adapters_keep_serving_and_others_are_unavailable(adapter, tmp_path):
    server = S3Server(tmp_path / "moto.log").start()
    server.client().create_bucket(Bucket=BUCKET)
    uri = server.upload(adapter, BUCKET, "down/a")
    server.upload(adapter, BUCKET, "down/b")
    factory = lambda: S3Server.client(server)  # noqa: E731  (bound to this server's port)
    downloads = AdapterDownloads(tmp_path / "cache", check_ttl_s=0, client_factory=factory)
    local = downloads.fetch(uri)
    server.stop()
    assert downloads.fetch(uri) == local
    with pytest.raises(Unavailable, match=r"unreachable for LoRA adapter 's3://adapters/down/b' and no local copy"):
        downloads.fetch("s3://adapters/down/b")


# -- the shared registry ----------------------------------------------------------------------------------------
def _entry(name: str) -> AdapterEntry:
    return AdapterEntry(name, f"s3://{BUCKET}/reg/{name}", base_model="llm")


def _add(registry: S3RegistryObject, name: str, during=None):
    def change(entries):
        if during is not None:
            during()
        entries[name] = _entry(name)
        return entries

    return registry.update(change)


def test_the_registry_object_is_shared_and_a_write_conflict_loses_nothing(s3, caplog):
    uri = f"s3://{BUCKET}/registries/shared.json"
    one, two = S3RegistryObject(uri, ttl_s=0), S3RegistryObject(uri, ttl_s=0)
    assert one.read() == (0, {})
    assert _add(one, "first") == 1
    assert set(two.read()[1]) == {"first"}  # the other replica sees it

    # `two` computes its change while `one` writes: its conditional write fails, it re-reads and reapplies.
    with caplog.at_level(logging.INFO, logger="backends.lora.store.registry_s3"):
        version = _add(two, "second", during=lambda: _add(one, "third") if "third" not in one.read()[1] else None)
    assert "changed under us" in caplog.text
    assert version == 3 and set(one.read()[1]) == {"first", "second", "third"}

    threads = [threading.Thread(target=_add, args=(S3RegistryObject(uri, ttl_s=0), f"t{i}")) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    version, entries = one.read()
    assert version == 9 and {f"t{i}" for i in range(6)} <= set(entries)


def test_a_corrupt_registry_object_keeps_the_last_good_one_and_the_next_write_repairs_it(s3, caplog):
    uri = f"s3://{BUCKET}/registries/corrupt.json"
    writer, reader = S3RegistryObject(uri, ttl_s=0), S3RegistryObject(uri, ttl_s=0)
    _add(writer, "kept")
    assert set(reader.read()[1]) == {"kept"}
    s3.client().put_object(Bucket=BUCKET, Key="registries/corrupt.json", Body=b'{"version": 2, "adapt')
    with caplog.at_level(logging.ERROR, logger="backends.lora.store.registry_s3"):
        version, entries = reader.read()
    assert (version, set(entries)) == (1, {"kept"})
    assert "s3://adapters/registries/corrupt.json is not valid" in caplog.text
    assert _add(writer, "next") == 2
    body = s3.client().get_object(Bucket=BUCKET, Key="registries/corrupt.json")["Body"].read()
    assert set(json.loads(body)["adapters"]) == {"kept", "next"}


def test_with_the_store_down_the_registry_reads_its_last_state_and_writes_are_unavailable(tmp_path):
    server = S3Server(tmp_path / "moto.log").start()
    server.client().create_bucket(Bucket=BUCKET)
    registry = S3RegistryObject(f"s3://{BUCKET}/r.json", ttl_s=0, client_factory=lambda: S3Server.client(server))
    _add(registry, "a")
    server.stop()
    assert set(registry.read()[1]) == {"a"}
    with pytest.raises(Unavailable, match="unreachable"):
        _add(registry, "b")


def test_a_name_loaded_a_moment_ago_elsewhere_resolves_at_once_despite_the_polling_ttl(s3):
    """A replica's backend read "no registry yet" a moment before its frontend wrote the adapter in: the miss
    re-reads (conditionally, at most every MISS_RECHECK_S) instead of answering 404 until the TTL runs out (a
    fresh-clone run of test_scale_out caught that 404 right after a 200 load)."""
    from backends.lora.store.registry import LoRARegistry

    uri = f"s3://{BUCKET}/registries/fresh.json"
    backend = LoRARegistry(registry_file=uri, allowed_roots=[f"s3://{BUCKET}/reg"])
    assert backend.file.ttl_s >= 1.0 and backend.known_names() == []  # cached: nothing there
    _add(S3RegistryObject(uri), "new")
    assert backend.resolve("new").path == f"s3://{BUCKET}/reg/new"
    with pytest.raises(NotFound, match="'other' not found; known adapters: \\['new'\\]"):
        backend.resolve("other")


def test_s3_uri_rejects_what_is_not_an_object_location():
    assert S3Uri.parse("s3://my.bucket-1/a/b/").uri == "s3://my.bucket-1/a/b"
    for bad in ("s3://", "s3://x/a", "s3://bucket/a\x00b", "s3://bucket/./a"):
        with pytest.raises(InvalidArgument):
            S3Uri.parse(bad)


def test_a_resolver_dir_in_a_bucket_offers_its_adapter_folders_by_name(s3, adapter, tmp_path, monkeypatch):
    from backends.lora.store import downloads as store_downloads
    from backends.lora.store.entries import RESOLVER
    from backends.lora.store.registry import LoRARegistry

    monkeypatch.setattr(store_downloads, "_downloads", AdapterDownloads(tmp_path / "cache"))
    s3.upload(adapter, BUCKET, "resolver/alpha")
    s3.client().put_object(Bucket=BUCKET, Key="resolver/not-an-adapter/notes.txt", Body=b"x")
    registry = LoRARegistry(resolver_dirs=[f"s3://{BUCKET}/resolver"])
    entry = registry.resolve("alpha")
    assert (entry.path, entry.source) == (f"s3://{BUCKET}/resolver/alpha", RESOLVER)
    assert "alpha" in registry.known_names()
    with pytest.raises(NotFound, match="'not-an-adapter' not found; known adapters: .*alpha"):
        registry.resolve("not-an-adapter")


def test_folder_markers_are_skipped_and_a_new_download_of_the_same_objects_keeps_its_version(s3, adapter, tmp_path):
    """A "folder" created in an S3 console is an empty object "prefix/name/"; evicting and downloading the same
    objects again must not look like a changed adapter (the resolver keys loaded adapters by this version)."""
    uri = s3.upload(adapter, BUCKET, "marker/a")
    s3.client().put_object(Bucket=BUCKET, Key="marker/a/", Body=b"")
    downloads = AdapterDownloads(tmp_path / "cache", check_ttl_s=0)
    local = downloads.fetch(uri)
    assert sorted(f.name for f in local.iterdir() if not f.name.startswith(".")) == sorted(
        f.name for f in adapter.iterdir())
    version = version_of(local)
    assert version_of(downloads.fetch(uri)) == version
    shutil.rmtree(local)  # evicted
    assert downloads.fetch(uri) == local and version_of(local) == version


def test_a_recently_used_version_is_not_evicted_under_a_running_load(s3, adapter, tmp_path):
    a, b = s3.upload(adapter, BUCKET, "age/a"), s3.upload(adapter, BUCKET, "age/b")
    size = sum(f.stat().st_size for f in adapter.iterdir())
    downloads = AdapterDownloads(tmp_path / "cache", max_bytes=int(size * 1.5), check_ttl_s=0, min_age_s=60)
    first = downloads.fetch(a)
    assert downloads.fetch(b).exists() and first.exists()  # over budget for a moment rather than pull it away


def test_the_resolver_keeps_an_s3_adapter_loaded_across_checks_and_serves_it_from_memory_when_all_else_is_gone(
        tmp_path, monkeypatch):
    """Each check against the store touches the download; that must not look like new files (a reload every few
    seconds). With the store down and the download evicted, the weights in memory still serve."""
    from backends.lora.manager.request import LoRAFields
    from backends.lora.manager.selector import AdapterSelector
    from backends.lora.store import downloads as store_downloads
    from backends.lora.store.registry import LoRARegistry
    from tools.fixtures.adapters import ALL_PROJECTIONS, counting_cache, make_random_adapter, tiny_llama

    folder = make_random_adapter(tiny_llama, tmp_path / "peft", seed=1, r=4, lora_alpha=8,
                                 target_modules=ALL_PROJECTIONS)
    server = S3Server(tmp_path / "moto.log").start()
    server.client().create_bucket(Bucket=BUCKET)
    uri = server.upload(folder, BUCKET, "mem/a")
    monkeypatch.setattr(store_downloads, "_downloads", AdapterDownloads(
        tmp_path / "cache", check_ttl_s=0, client_factory=lambda: S3Server.client(server)))
    cache, loader = counting_cache()
    resolver = AdapterSelector(LoRARegistry(allowed_roots=[f"s3://{BUCKET}"]), cache)
    first = resolver.select(LoRAFields(path=uri)).ref
    assert [resolver.select(LoRAFields(path=uri)).ref.key for _ in range(3)] == [first.key] * 3
    assert len(loader.calls) == 1
    server.stop()
    shutil.rmtree(first.path)
    assert resolver.select(LoRAFields(path=uri)).ref.key == first.key
    with pytest.raises(Unavailable, match="mem/b' and no local copy"):
        resolver.select(LoRAFields(path=f"s3://{BUCKET}/mem/b"))
