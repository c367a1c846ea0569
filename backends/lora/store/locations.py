"""Places for adapters and the registry: local paths or `s3://bucket/prefix` URIs, parsed and normalised once."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from backends.errors import InvalidArgument

S3_SCHEME = "s3://"
# S3's bucket naming rules (3-63 lower-case letters, digits, dots, hyphens); keys: no empty, "." or ".." segments.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def is_s3(location: str | os.PathLike | None) -> bool:
    return isinstance(location, str) and location.startswith(S3_SCHEME)


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # no leading or trailing "/"; "" for a whole bucket (allowed roots only)

    @classmethod
    def parse(cls, uri: str, allow_bucket: bool = False) -> "S3Uri":
        bucket, _, key = uri[len(S3_SCHEME):].partition("/")
        key = key.strip("/")
        segments = key.split("/") if key else []
        if not _BUCKET.match(bucket) or "\x00" in key or any(s in ("", ".", "..") for s in segments):
            raise InvalidArgument(f"'{uri}' is not a valid s3:// location (s3://bucket/key, no empty, '.' or '..' "
                                  f"parts)")
        if not key and not allow_bucket:
            raise InvalidArgument(f"'{uri}' names a bucket, not an adapter (s3://bucket/prefix/name)")
        return cls(bucket, key)

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"

    def is_under(self, root: "S3Uri") -> bool:
        return self.bucket == root.bucket and (not root.key or self.key == root.key
                                               or self.key.startswith(root.key + "/"))


def location(value: str | Path) -> str | Path:
    """A configured place for adapters or the registry: an s3:// URI (checked, normalised) or a local path."""
    return S3Uri.parse(value, allow_bucket=True).uri if is_s3(value) else Path(value).expanduser()


def split_locations(value: str, sep: str = os.pathsep) -> list[str | Path]:
    """A list of folders and s3:// locations: `sep` separates them, except the ':' of "s3://"."""
    return [location(p.strip()) for p in re.split(re.escape(sep) + r"(?!//)", value) if p.strip()]
