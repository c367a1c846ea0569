"""Adapters in S3-compatible object storage (`s3://bucket/prefix/name`), downloaded into a local disk cache.

Every replica of a deployment reads the same bucket, so an adapter uploaded once is served everywhere. boto3 takes
the endpoint, region and credentials from the standard AWS environment and config files (`AWS_ENDPOINT_URL` points
it at MinIO or any other S3-compatible store).

Adapters are downloaded into a local disk cache, one folder per object version (the objects' ETags), so a changed
object is a new version and the selector's file fingerprint sees new files. Downloads land in a temporary folder
renamed into place (readers never see half an adapter); a lock file per adapter makes concurrent requests, threads
and processes alike, download it once. When the store cannot be reached, the newest local copy keeps serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from backends.errors import BackendError, InvalidArgument, NotFound, Unavailable
from backends.lora.adapters.files import CONFIG_FILE
from backends.lora.store.locations import S3Uri
from backends.lora.store.s3 import error_code, missing, s3_client, unreachable
from backends.settings import cache_dir

log = logging.getLogger(__name__)

S3_CACHE_DIR_ENV = "MULTILORA_S3_CACHE_DIR"
S3_CACHE_MAX_BYTES_ENV = "MULTILORA_S3_CACHE_MAX_BYTES"
DEFAULT_S3_CACHE_MAX_BYTES = 10 << 30
_COMPLETE = ".complete"  # marks a finished download; its mtime is the version's last use (for the LRU)


@dataclass(frozen=True)
class _Object:
    name: str  # file name in the local folder
    key: str
    etag: str
    size: int


class _Bounded(OrderedDict):
    """A dict that forgets its oldest entries beyond `size` (per-location state that clients can grow)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def version_of(local: Path) -> int:
    """The object version a local copy holds (from its folder's name, the digest of the objects' ETags): the same
    objects give the same number however often they are downloaded again. Never 0 (0 marks fixed adapters)."""
    folder = local if local.is_dir() else local.parent
    return int(folder.name[:15], 16) | 1


class AdapterDownloads:
    """Local disk cache of adapters held in object storage, bounded in bytes (least recently used leaves first)."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_S3_CACHE_MAX_BYTES, check_ttl_s: float = 5.0,
                 client_factory: Callable[[], object] = s3_client, min_age_s: float = 60.0):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.check_ttl_s = check_ttl_s  # how long a version, once checked against the store, is trusted
        self.min_age_s = min_age_s  # a version used this recently is never evicted: a load may be reading it
        self._client_factory = client_factory
        self._client = None
        self._lock = threading.Lock()
        self._locks = [threading.Lock() for _ in range(64)]  # striped by location: bounded, one per download
        self._checked: _Bounded = _Bounded(4096)  # uri -> (when checked, local copy)
        self._exists: _Bounded = _Bounded(4096)  # uri -> (when checked, holds an adapter)
        self._children: _Bounded = _Bounded(64)  # uri -> (when listed, folder names)

    @property
    def client(self):
        with self._lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def _folder(self, uri: S3Uri) -> Path:
        return self.root / hashlib.sha256(uri.uri.encode()).hexdigest()[:24]

    @contextlib.contextmanager
    def _exclusive(self, uri: S3Uri) -> Iterator[None]:
        """One download per adapter: a thread lock, then a file lock for other processes on this disk."""
        with self._locks[hash(uri.uri) % len(self._locks)]:
            folder = self._folder(uri)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / ".lock", "w") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                yield

    def fetch(self, location: str) -> Path:
        """The local copy of the adapter at `location` (a folder, or the file of a single-file adapter)."""
        uri = S3Uri.parse(location)
        checked = self._checked.get(uri.uri)
        if checked and time.monotonic() - checked[0] < self.check_ttl_s and checked[1].exists():
            return checked[1]
        try:
            objects = self._list(uri)  # before any local state: an unknown location leaves nothing behind
            with self._exclusive(uri):
                local = self._download(uri, objects)
        except BackendError:
            raise
        except Exception as exc:
            if missing(exc):  # deleted between the listing and the download
                raise NotFound(f"LoRA adapter '{uri.uri}' not found (an object of it is gone)") from None
            if not unreachable(exc):
                raise InvalidArgument(f"object store refused LoRA adapter '{uri.uri}': {exc}") from None
            local = self._newest_local(uri)
            if local is None:
                raise Unavailable(f"object store unreachable for LoRA adapter '{uri.uri}' and no local copy "
                                  f"({type(exc).__name__}: {exc})") from None
            log.warning("object store unreachable for '%s' (%s); serving the cached copy %s", uri.uri, exc, local)
        self._checked[uri.uri] = (time.monotonic(), local)
        return local

    def has_adapter(self, location: str) -> bool:
        """Whether a PEFT adapter folder (its adapter_config.json) is at `location`: resolver dirs in a bucket. While
        the store is unreachable, a local copy counts."""
        uri = S3Uri.parse(location)
        checked = self._exists.get(uri.uri)
        if checked and time.monotonic() - checked[0] < self.check_ttl_s:
            return checked[1]
        try:
            self.client.head_object(Bucket=uri.bucket, Key=f"{uri.key}/{CONFIG_FILE}")
            found = True
        except Exception as exc:
            if unreachable(exc):
                return self._newest_local(uri) is not None
            if not missing(exc):
                raise
            found = False
        self._exists[uri.uri] = (time.monotonic(), found)
        return found

    def children(self, location: str) -> list[str]:
        """Names of the folders directly under `location` (the adapters a resolver dir in a bucket offers); none
        while the store is unreachable."""
        uri = S3Uri.parse(location, allow_bucket=True)
        listed = self._children.get(uri.uri)
        if listed and time.monotonic() - listed[0] < self.check_ttl_s:
            return listed[1]
        prefix = f"{uri.key}/" if uri.key else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=uri.bucket, Prefix=prefix,
                                                                          Delimiter="/")
            names = [p["Prefix"][len(prefix):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", [])]
        except Exception as exc:
            if not unreachable(exc) and error_code(exc) != "NoSuchBucket":
                raise
            log.warning("cannot list LoRA adapters under '%s': %s", uri.uri, exc)
            return []
        self._children[uri.uri] = (time.monotonic(), names)
        return names

    def _list(self, uri: S3Uri) -> list[_Object]:
        """The adapter's objects: the files directly under `key/` (a PEFT folder), else the object `key` itself
        (a single-file adapter such as a kohya .safetensors). Folder markers ("key/") and dot files are not
        adapter files."""
        from botocore.exceptions import ClientError

        client = self.client
        try:
            page = client.list_objects_v2(Bucket=uri.bucket, Prefix=uri.key + "/", Delimiter="/")
        except ClientError as exc:
            if error_code(exc) == "NoSuchBucket":
                raise NotFound(f"LoRA adapter '{uri.uri}' not found: no bucket '{uri.bucket}'") from None
            raise
        objects = [_Object(name, o["Key"], o["ETag"].strip('"'), int(o["Size"]))
                   for o in page.get("Contents", []) for name in [o["Key"].rsplit("/", 1)[-1]]
                   if name and not name.startswith(".")]
        if page.get("IsTruncated"):
            raise InvalidArgument(f"'{uri.uri}' holds more than {len(objects)} objects; that is not an adapter")
        if objects:
            return objects
        try:
            head = client.head_object(Bucket=uri.bucket, Key=uri.key)
        except ClientError as exc:
            if missing(exc):
                raise NotFound(f"LoRA adapter '{uri.uri}' not found (no object or folder there)") from None
            raise
        return [_Object(uri.key.rsplit("/", 1)[-1], uri.key, head["ETag"].strip('"'), int(head["ContentLength"]))]

    def _download(self, uri: S3Uri, objects: list[_Object]) -> Path:
        single = len(objects) == 1 and objects[0].key == uri.key
        version = hashlib.sha256(json.dumps(sorted((o.key, o.etag, o.size) for o in objects)).encode()).hexdigest()
        final = self._folder(uri) / version[:24]
        if not (final / _COMPLETE).exists():
            total = sum(o.size for o in objects)
            if total > self.max_bytes:
                raise InvalidArgument(f"LoRA adapter '{uri.uri}' is {total} bytes, more than the download cache "
                                      f"holds ({self.max_bytes}, {S3_CACHE_MAX_BYTES_ENV})")
            tmp = Path(tempfile.mkdtemp(dir=self._folder(uri), prefix=".tmp-"))
            try:
                for o in objects:
                    self.client.download_file(uri.bucket, o.key, str(tmp / o.name))
                (tmp / _COMPLETE).write_text(json.dumps({"uri": uri.uri, "file": objects[0].name if single else None}))
                shutil.rmtree(final, ignore_errors=True)  # a folder left by a crash mid-rename
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("downloaded LoRA adapter '%s' (%d files, %d bytes) to %s", uri.uri, len(objects), total, final)
            self._evict(keep=final)
        os.utime(final / _COMPLETE)
        return final / objects[0].name if single else final

    def _versions(self, folder: Path) -> list[Path]:
        """Finished versions under an adapter's folder (or under every adapter's, for the root); the temporary
        folders of downloads in progress start with '.' and are not versions."""
        pattern = f"[!.]*/{_COMPLETE}" if folder != self.root else f"[!.]*/[!.]*/{_COMPLETE}"
        return [marker.parent for marker in folder.glob(pattern)]

    def _newest_local(self, uri: S3Uri) -> Path | None:
        versions = []
        for folder in self._versions(self._folder(uri)):
            try:
                versions.append(((folder / _COMPLETE).stat().st_mtime, folder))
            except FileNotFoundError:
                continue
        if not versions:
            return None
        folder = max(versions)[1]
        single = json.loads((folder / _COMPLETE).read_text()).get("file")
        return folder / single if single else folder

    def _evict(self, keep: Path) -> None:
        """Drop least recently used versions until the cache fits. Loaded adapters live in memory and are keyed by
        object version, so a removed folder costs a download only when its adapter is requested cold again. A
        version used in the last `min_age_s` stays (a load may be reading it); another process's download in
        progress is skipped (its lock is held)."""
        versions = []
        for folder in self._versions(self.root):
            try:
                used = (folder / _COMPLETE).stat().st_mtime
                size = sum(f.stat().st_size for f in folder.iterdir())
            except FileNotFoundError:
                continue  # another process evicted it meanwhile
            versions.append((used, size, folder))
        total = sum(size for _, size, _ in versions)
        recent = time.time() - self.min_age_s
        for used, size, folder in sorted(versions):
            if total <= self.max_bytes:
                break
            if folder == keep or used > recent or not self._remove(folder, own=folder.parent == keep.parent):
                continue
            total -= size
            log.info("adapter download cache over %d bytes: removed %s", self.max_bytes, folder)

    def _remove(self, folder: Path, own: bool) -> bool:
        """Remove a version under its adapter's file lock (ours already, for `own`), renamed away first so that
        no half-removed folder ever looks finished."""
        with contextlib.ExitStack() as stack:
            if not own:
                lock = stack.enter_context(open(folder.parent / ".lock", "a"))
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # being downloaded or checked right now
            trash = folder.with_name(f".trash-{folder.name}")
            try:
                os.rename(folder, trash)
            except FileNotFoundError:
                return False
            shutil.rmtree(trash, ignore_errors=True)
            return True


_downloads: AdapterDownloads | None = None
_downloads_lock = threading.Lock()


def downloads() -> AdapterDownloads:
    """This process's download cache, configured from the environment."""
    global _downloads
    with _downloads_lock:
        if _downloads is None:
            root = os.environ.get(S3_CACHE_DIR_ENV) or cache_dir() / "s3-adapters"
            max_bytes = int(os.environ.get(S3_CACHE_MAX_BYTES_ENV) or DEFAULT_S3_CACHE_MAX_BYTES)
            _downloads = AdapterDownloads(Path(root).expanduser(), max_bytes)
        return _downloads
