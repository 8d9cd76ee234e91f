"""Layer compression: detect by magic bytes, decompress as a stream (gzip, zstd, none)."""

from __future__ import annotations

import gzip
from typing import BinaryIO, cast

import zstandard

from salmiac.image.models import Compression

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def sniff(head: bytes) -> Compression:
    """Compression from the first bytes of a blob (at least 4 for zstd)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


def decompressed(src: BinaryIO, compression: Compression) -> BinaryIO:
    """A read-only stream of the uncompressed bytes; callers bound how much they read."""
    if compression is Compression.GZIP:
        return cast(BinaryIO, gzip.GzipFile(fileobj=src, mode="rb"))
    if compression is Compression.ZSTD:
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True, closefd=False)
        return cast(BinaryIO, reader)
    return src
