"""The dynamic LoRA registry as one object in S3-compatible storage, shared by every replica of a deployment."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import replace
from typing import Callable

from backends.errors import Unavailable
from backends.lora.store.entries import DYNAMIC, AdapterEntry, parse_registry_document, registry_document
from backends.lora.store.locations import S3Uri
from backends.lora.store.s3 import error_code, s3_client, unreachable

log = logging.getLogger(__name__)


class S3RegistryObject:
    """The dynamic registry as one JSON object shared by every replica: `{"version": n, "adapters": {...}}`, the
    same document as the local registry file.

    Writers read the object with its ETag and write it back only if it is unchanged (`If-Match`, or
    `If-None-Match: *` for the first write); a writer that loses the race reads again and reapplies its change, so
    no update is lost. Readers poll at most every `ttl_s` seconds, conditionally (`If-None-Match`). A corrupt
    object keeps the last good registry serving, and the next write replaces it."""

    def __init__(self, location: str, ttl_s: float = 1.0, attempts: int = 8,
                 client_factory: Callable[[], object] = s3_client):
        uri = S3Uri.parse(location)
        self.path = uri.uri  # for messages, like RegistryFile.path
        self.uri = uri
        self.ttl_s = ttl_s
        self.attempts = attempts
        self._client_factory = client_factory
        self._client = None
        self._lock = threading.Lock()
        self._etag: str | None = None
        self._checked = float("-inf")
        self._cached: tuple[int, dict[str, AdapterEntry]] = (0, {})
        self._bad_etag: str | None = None
        self._retry_at = float("-inf")  # while the store is unreachable: when to try it again
        self._down_for = 0.0

    @property
    def client(self):
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    def _get(self, etag: str | None) -> tuple[str | None, bytes | None]:
        """(ETag, body); body None when unchanged since `etag`; (None, None) when there is no object yet."""
        from botocore.exceptions import ClientError

        kwargs = {"IfNoneMatch": f'"{etag}"'} if etag else {}
        try:
            response = self.client.get_object(Bucket=self.uri.bucket, Key=self.uri.key, **kwargs)
        except ClientError as exc:
            code = error_code(exc)
            if code in ("304", "NotModified"):
                return etag, None
            if code in ("NoSuchKey", "404"):
                return None, None
            raise
        return response["ETag"].strip('"'), response["Body"].read()

    def _refresh(self, force: bool, since: float | None = None) -> None:
        """Bring the cached registry up to date (caller holds the lock); unreadable objects keep the last good.
        `since`: current if read at or after that time, whatever the TTL."""
        if not force and (self._checked >= since if since is not None else
                          time.monotonic() - self._checked < self.ttl_s):
            return
        started = time.monotonic()  # a GET under way when a fresh read was asked for is not fresh enough for it
        etag, body = self._get(None if force else self._etag)
        self._checked = started
        if etag is None:
            self._etag, self._cached = None, (0, {})
        elif body is not None:
            try:
                self._cached = parse_registry_document(json.loads(body))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                if etag != self._bad_etag:
                    log.error("LoRA registry %s is not valid (%s: %s); keeping the last good registry (version %d, "
                              "%d adapters)", self.path, type(exc).__name__, exc, self._cached[0],
                              len(self._cached[1]))
                self._bad_etag = etag
            self._etag = etag

    def read(self, fresh: bool = False) -> tuple[int, dict[str, AdapterEntry]]:
        """The registry, at most `ttl_s` old; `fresh` (a name missed it): read after this call began, so an adapter
        loaded a moment ago through any replica's frontend resolves at once. Concurrent fresh reads share the GETs
        made while they waited (one lock), so a flood of unknown names costs one conditional GET at a time."""
        asked = time.monotonic()
        with self._lock:
            if time.monotonic() < self._retry_at:
                return self._cached
            try:
                self._refresh(force=False, since=asked if fresh else None)
                self._down_for = 0.0
            except Exception as exc:
                if not unreachable(exc):
                    raise
                # Store down: adapters already known keep resolving, from the last registry read; retries back off
                # (each costs a connect timeout to every reader) up to 30 s.
                self._down_for = min(30.0, max(self.ttl_s, 2 * self._down_for))
                self._retry_at = time.monotonic() + self._down_for
                log.warning("LoRA registry %s unreachable (%s); using the last registry read, next try in %.0f s",
                            self.path, exc, self._down_for)
            return self._cached

    def update(self, change: Callable[[dict[str, AdapterEntry]], dict[str, AdapterEntry]]) -> int:
        """Apply `change` with compare-and-swap; returns the new version. Conflicts are retried with backoff."""
        from botocore.exceptions import BotoCoreError, ClientError

        for attempt in range(self.attempts):
            with self._lock:
                try:
                    self._refresh(force=True)
                except Exception as exc:
                    raise Unavailable(f"LoRA registry {self.path} unreachable: {exc}") from None
                etag = self._etag
                version, entries = self._cached
                entries = change(dict(entries))
                body = json.dumps(registry_document(version + 1, entries), indent=1).encode()
                condition = {"IfMatch": f'"{etag}"'} if etag else {"IfNoneMatch": "*"}
                try:
                    response = self.client.put_object(Bucket=self.uri.bucket, Key=self.uri.key, Body=body,
                                                      ContentType="application/json", **condition)
                except BotoCoreError as exc:  # the write may or may not have happened
                    raise Unavailable(f"LoRA registry {self.path} unreachable; the outcome of this change is "
                                      f"unknown, check the adapter list before retrying ({exc})") from None
                except ClientError as exc:
                    if error_code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                        raise Unavailable(f"LoRA registry {self.path} write failed: {exc}") from None
                    log.info("LoRA registry %s changed under us (attempt %d); re-reading", self.path, attempt + 1)
                    self._checked = float("-inf")
                else:
                    self._etag = response["ETag"].strip('"')
                    self._checked = time.monotonic()
                    self._cached = (version + 1, {n: replace(e, source=DYNAMIC) for n, e in entries.items()})
                    return version + 1
            time.sleep(random.uniform(0.01, 0.05) * (2 ** attempt))
        raise Unavailable(f"LoRA registry {self.path}: {self.attempts} conflicting writes in a row; retry")
