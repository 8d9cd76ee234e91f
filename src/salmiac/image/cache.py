"""Content-addressed blob cache: ``ROOT/sha256/<hex>``.

A blob enters the cache only through ``put()``/``ingest()``: streamed to a temp file in the same directory,
size and digest checked, then renamed into place. So a file at its final name has been verified once and
readers never see partial content. Several processes may fill the same cache; the rename is atomic and
both writers produce identical bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from salmiac.errors import ImageError
from salmiac.image.models import Descriptor, digest_hasher, validate_digest

#: Default upper bound on one blob (a layer). Bigger descriptors are refused before any byte is read.
DEFAULT_MAX_BLOB_SIZE = 32 << 30
CHUNK = 1 << 20


class BlobCache:
    def __init__(self, root: str | os.PathLike[str], *, max_blob_size: int = DEFAULT_MAX_BLOB_SIZE) -> None:
        self.root = Path(root)
        self.max_blob_size = max_blob_size

    def path(self, digest: str) -> Path:
        validate_digest(digest)
        algorithm, hexpart = digest.split(":", 1)
        return self.root / algorithm / hexpart

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def check_size(self, desc: Descriptor, what: str = "blob") -> None:
        if desc.size > self.max_blob_size:
            raise ImageError(
                f"{what} {desc.digest}: size {desc.size} exceeds the {self.max_blob_size}-byte limit"
            )

    def open(self, digest: str, size: int | None = None, what: str = "blob") -> BinaryIO:
        """Open a cached blob; ``size`` (from a descriptor) must match the cached length."""
        path = self.path(digest)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise ImageError(f"{what} {digest}: not in the blob cache {self.root}") from None
        if size is not None:
            actual = os.fstat(handle.fileno()).st_size
            if actual != size:
                handle.close()
                raise ImageError(
                    f"{what} {digest}: size mismatch (descriptor says {size}, blob has {actual})"
                )
        return handle

    def put(self, src: BinaryIO, desc: Descriptor, what: str = "blob") -> Path:
        """Copy exactly ``desc.size`` bytes from ``src``, verify, and publish. Extra bytes are an error."""
        self.check_size(desc, what)
        final = self.path(desc.digest)
        if final.is_file() and final.stat().st_size == desc.size:
            return final
        hasher = digest_hasher(desc.digest)
        with self._temp(final) as (tmp, tmp_path):
            remaining = desc.size
            while remaining:
                chunk = src.read(min(remaining, CHUNK))
                if not chunk:
                    raise ImageError(
                        f"{what} {desc.digest}: size mismatch (descriptor says {desc.size}, "
                        f"blob has {desc.size - remaining})"
                    )
                hasher.update(chunk)
                tmp.write(chunk)
                remaining -= len(chunk)
            if src.read(1):
                raise ImageError(f"{what} {desc.digest}: size mismatch (blob longer than {desc.size} bytes)")
            actual = f"{desc.digest.split(':', 1)[0]}:{hasher.hexdigest()}"
            if actual != desc.digest:
                raise ImageError(f"{what} {desc.digest}: digest mismatch (content is {actual})")
            tmp.flush()
            os.replace(tmp_path, final)
        return final

    def ingest(self, src: BinaryIO, max_size: int | None = None, what: str = "blob") -> tuple[str, int]:
        """Store a stream of unknown digest (docker-archive layers); returns ``(sha256 digest, size)``."""
        limit = self.max_blob_size if max_size is None else max_size
        hasher = hashlib.sha256()
        size = 0
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        with self._temp(self.root / "sha256" / "ingest") as (tmp, tmp_path):
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ImageError(f"{what}: larger than the {limit}-byte limit")
                hasher.update(chunk)
                tmp.write(chunk)
            digest = "sha256:" + hasher.hexdigest()
            tmp.flush()
            os.replace(tmp_path, self.path(digest))
        return digest, size

    def put_bytes(self, data: bytes, desc: Descriptor, what: str = "blob") -> Path:
        return self.put(io.BytesIO(data), desc, what)

    @contextlib.contextmanager
    def _temp(self, final: Path) -> Iterator[tuple[BinaryIO, Path]]:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", dir=final.parent)
        tmp_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as tmp:
                yield tmp, tmp_path
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
