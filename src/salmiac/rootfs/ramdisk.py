"""Compressing initramfs archives for the EIF, as a stream, deterministically.

zstd: the cloud kernel unpacks it (RD_ZSTD) and it decompresses fastest under TCG; single-threaded so that the
same input always gives the same bytes. The app ramdisk can be hundreds of MiB, so a moderate level keeps
conversion fast; the enclave base (built once, cached) uses a high level in ``enclave_base.base``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import zstandard

APP_ZSTD_LEVEL: Final = 9


def compress_file(src: Path, dst: Path, *, level: int = APP_ZSTD_LEVEL) -> int:
    """zstd-compress ``src`` into ``dst`` (replaced atomically). Returns the compressed size."""
    params = zstandard.ZstdCompressionParameters.from_level(level, write_content_size=True, write_checksum=True,
                                                            threads=0)
    tmp = dst.with_name(dst.name + ".tmp")
    size = src.stat().st_size
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        zstandard.ZstdCompressor(compression_params=params).copy_stream(fin, fout, size=size)
    os.replace(tmp, dst)
    return dst.stat().st_size
