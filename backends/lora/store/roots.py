"""The allowed adapter roots: every adapter path must lie, after symlinks, under one of them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from backends.errors import InvalidArgument
from backends.lora.store.locations import S3Uri, is_s3


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
