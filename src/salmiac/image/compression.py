"""Layer compression: detect by magic bytes, decompress as a stream (gzip, zstd, none)."""

from __future__ import annotations

import gzip
import io
from typing import BinaryIO, cast

import zstandard

from salmiac.image.models import Compression

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_BUFFER = 1 << 20


def sniff(head: bytes) -> Compression:
    """Compression from the first bytes of a blob (at least 4 for zstd)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


class _Owning(io.RawIOBase):
    """Reads from a decompressor; closing it closes the decompressor and the source it reads from."""

    def __init__(self, stream: BinaryIO, source: BinaryIO) -> None:
        self._stream = stream
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._stream.close()
            finally:
                self._source.close()
        super().close()


def decompressed(src: BinaryIO, compression: Compression, *, owns_source: bool = False) -> BinaryIO:
    """A read-only stream of the uncompressed bytes; callers bound how much they read.

    With ``owns_source`` closing the result also closes ``src`` (so ``with decompressed(open(...))`` leaks
    nothing). Otherwise ``src`` stays open and the caller closes it.
    """
    if compression is Compression.NONE:
        return src
    if compression is Compression.GZIP:
        stream = cast(BinaryIO, gzip.GzipFile(fileobj=src, mode="rb"))
    else:
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True, closefd=False)
        stream = cast(BinaryIO, reader)
    if not owns_source:
        return stream
    return cast(BinaryIO, io.BufferedReader(_Owning(stream, src), buffer_size=READ_BUFFER))
