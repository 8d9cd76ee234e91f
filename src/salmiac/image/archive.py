"""Read-only access to the regular files of a tar archive by name, without extracting anything.

Used for docker-archive and oci-archive inputs, which may come from anywhere. Member names are only ever
dictionary keys (cleaned lexically), never host paths. Before ``tarfile`` parses the archive, a raw pass over
the 512-byte headers bounds the member count and the size of metadata records (pax, GNU long names) that
``tarfile`` would read into memory. Duplicate names are refused rather than resolved "last one wins", and
symlinks/hardlinks between members (``docker save`` uses them for repeated layers) are followed inside the
archive only, with a hop limit.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from salmiac.errors import ImageError
from salmiac.image.compression import decompressed, sniff
from salmiac.image.models import Compression

MAX_MEMBERS = 100_000
MAX_METADATA_RECORD = 1 << 20
MAX_LINK_HOPS = 16
DEFAULT_MAX_ARCHIVE_SIZE = 64 << 30
BLOCK = 512


def clean_member_name(unsafe_name: str) -> str:
    """``./a//b/../c`` → ``a/c``: a lookup key, anchored at the archive root."""
    return posixpath.normpath("/" + unsafe_name).lstrip("/")


def _parse_number(field: bytes, what: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        value = int.from_bytes(field[1:], "big")
        if field[0] & 0x40:
            raise ImageError(f"{what}: negative size in tar header")
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ImageError(f"{what}: corrupt tar header (size {text[:16]!r})") from None


def prescan(handle: BinaryIO, file_size: int, what: str, max_members: int = MAX_MEMBERS) -> int:
    """Walk the raw headers: bound member count and metadata record sizes. Returns the member count."""
    offset = 0
    members = 0
    while offset + BLOCK <= file_size:
        handle.seek(offset)
        header = handle.read(BLOCK)
        if len(header) < BLOCK or header == b"\0" * BLOCK:
            break
        size = _parse_number(header[124:136], what)
        typeflag = header[156:157]
        if typeflag in (b"x", b"g", b"L", b"K") and size > MAX_METADATA_RECORD:
            raise ImageError(f"{what}: tar metadata record of {size} bytes exceeds {MAX_METADATA_RECORD}")
        if typeflag not in (b"x", b"g", b"L", b"K"):
            members += 1
            if members > max_members:
                raise ImageError(f"{what}: more than {max_members} tar members")
        offset += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return members


class ArchiveFiles:
    """Regular files of one tar archive, looked up by cleaned name."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        what: str | None = None,
        max_size: int = DEFAULT_MAX_ARCHIVE_SIZE,
        temp_dir: str | None = None,
    ) -> None:
        self.what = what or f"archive {path}"
        self._temp: BinaryIO | None = None
        try:
            raw = open(path, "rb")  # noqa: SIM115 - owned by this object
        except OSError as exc:
            raise ImageError(f"{self.what}: cannot open: {exc.strerror}") from exc
        try:
            if not Path(path).is_file():
                raise ImageError(f"{self.what}: not a regular file")
            handle = self._maybe_decompress(raw, max_size, temp_dir)
            size = os.fstat(handle.fileno()).st_size
            if size > max_size:
                raise ImageError(f"{self.what}: {size} bytes exceeds the {max_size}-byte limit")
            prescan(handle, size, self.what)
            handle.seek(0)
            try:
                self._tar = tarfile.open(fileobj=handle, mode="r:")  # noqa: SIM115 - closed in close()
                members = self._tar.getmembers()
            except (tarfile.TarError, EOFError) as exc:
                raise ImageError(f"{self.what}: not a valid tar archive: {exc}") from exc
        except BaseException:
            raw.close()
            self._close_temp()
            raise
        self._raw = raw
        self._members: dict[str, tarfile.TarInfo] = {}
        for member in members:
            name = clean_member_name(member.name)
            if member.isdir():
                continue
            if name in self._members:
                raise ImageError(f"{self.what}: duplicate member {name!r}")
            self._members[name] = member

    def _maybe_decompress(self, raw: BinaryIO, max_size: int, temp_dir: str | None) -> BinaryIO:
        compression = sniff(raw.read(4))
        raw.seek(0)
        if compression is Compression.NONE:
            return raw
        temp = tempfile.TemporaryFile(dir=temp_dir)  # noqa: SIM115 - closed in close()
        self._temp = temp
        stream = decompressed(raw, compression)
        copied = 0
        try:
            while chunk := stream.read(1 << 20):
                copied += len(chunk)
                if copied > max_size:
                    raise ImageError(f"{self.what}: decompresses to more than {max_size} bytes")
                temp.write(chunk)
        except (OSError, EOFError, zstandard.ZstdError) as exc:
            raise ImageError(f"{self.what}: corrupt {compression.value} compression: {exc}") from exc
        temp.flush()
        temp.seek(0)
        return temp

    def _resolve(self, unsafe_name: str) -> tarfile.TarInfo:
        name = clean_member_name(unsafe_name)
        for _hop in range(MAX_LINK_HOPS):
            member = self._members.get(name)
            if member is None:
                raise ImageError(f"{self.what}: no member {name!r}")
            if member.isfile():
                return member
            if member.issym():
                name = clean_member_name(posixpath.join(posixpath.dirname(name), member.linkname))
            elif member.islnk():
                name = clean_member_name(member.linkname)
            else:
                raise ImageError(f"{self.what}: member {name!r} is not a regular file")
        raise ImageError(f"{self.what}: member {unsafe_name!r}: too many links")

    def exists(self, unsafe_name: str) -> bool:
        return clean_member_name(unsafe_name) in self._members

    def size(self, unsafe_name: str) -> int:
        return self._resolve(unsafe_name).size

    def open(self, unsafe_name: str) -> BinaryIO:
        member = self._resolve(unsafe_name)
        handle = self._tar.extractfile(member)
        if handle is None:
            raise ImageError(f"{self.what}: member {unsafe_name!r} is not a regular file")
        return cast(BinaryIO, handle)

    def read(self, unsafe_name: str, limit: int) -> bytes:
        size = self.size(unsafe_name)
        if size > limit:
            raise ImageError(f"{self.what}: {clean_member_name(unsafe_name)} is {size} bytes (limit {limit})")
        with self.open(unsafe_name) as handle:
            return handle.read(limit + 1)

    def close(self) -> None:
        self._tar.close()
        self._raw.close()
        self._close_temp()

    def _close_temp(self) -> None:
        temp = self._temp
        if temp is not None:
            with contextlib.suppress(OSError):
                temp.close()


def copy_exact(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    """Copy exactly ``size`` bytes or raise ImageError."""
    remaining = size
    while remaining:
        chunk = src.read(min(remaining, 1 << 20))
        if not chunk:
            raise ImageError(f"short read: {size - remaining} of {size} bytes")
        dst.write(chunk)
        remaining -= len(chunk)

