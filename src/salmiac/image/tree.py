"""The flattened filesystem tree of an image, kept in memory, never materialised on the host.

``image.flatten`` produces a ``Tree`` from layers; ``rootfs`` writers (cpio, tar, squashfs...) consume it.
Regular file contents live in a ``Spool`` (one append-only temp file) and are referenced by
``FileData``; hardlinked paths share the same ``FileData`` object (identity = inode).
"""

from __future__ import annotations

import enum
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import BinaryIO

ROOT = PurePosixPath("/")


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


class Spool:
    """Append-only storage for file contents, in one unlinked temp file."""

    def __init__(self, directory: str | None = None) -> None:
        self._file: BinaryIO = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - lives with the spool
        self._end = 0

    def append(self, src: BinaryIO, size: int) -> FileData:
        """Copy exactly ``size`` bytes from ``src``; raises EOFError if the source is short."""
        self._file.seek(self._end)
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                raise EOFError(f"short read: {size - remaining} of {size} bytes")
            self._file.write(chunk)
            remaining -= len(chunk)
        data = FileData(self, self._end, size)
        self._end += size
        return data

    def append_bytes(self, payload: bytes) -> FileData:
        self._file.seek(self._end)
        self._file.write(payload)
        data = FileData(self, self._end, len(payload))
        self._end += len(payload)
        return data

    def read(self, offset: int, size: int) -> bytes:
        self._file.seek(offset)
        return self._file.read(size)

    def copy_to(self, offset: int, size: int, dst: BinaryIO) -> None:
        self._file.seek(offset)
        remaining = size
        while remaining:
            chunk = self._file.read(min(remaining, 1 << 20))
            if not chunk:
                raise EOFError("spool truncated")
            dst.write(chunk)
            remaining -= len(chunk)

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


@dataclass(eq=False, slots=True)
class FileData:
    """Contents of one regular file (one inode). Compared by identity: shared = hardlinked."""

    spool: Spool
    offset: int
    size: int

    def read(self) -> bytes:
        return self.spool.read(self.offset, self.size)

    def copy_to(self, dst: BinaryIO) -> None:
        self.spool.copy_to(self.offset, self.size, dst)


@dataclass(slots=True)
class Entry:
    kind: Kind
    mode: int  # permission bits only (0o7777), type is ``kind``
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    data: FileData | None = None  # FILE only
    target: str | None = None  # SYMLINK only: stored as-is, never resolved on the host
    rdev: tuple[int, int] = (0, 0)  # CHAR/BLOCK: (major, minor)
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        if self.kind is Kind.FILE and self.data is not None:
            return self.data.size
        if self.kind is Kind.SYMLINK and self.target is not None:
            return len(os.fsencode(self.target))
        return 0


class Tree:
    """Absolute, cleaned paths → entries. The root directory always exists."""

    def __init__(self, spool: Spool | None = None) -> None:
        self.spool = spool if spool is not None else Spool()
        self.entries: dict[PurePosixPath, Entry] = {ROOT: Entry(Kind.DIR, 0o755)}

    def __contains__(self, path: PurePosixPath) -> bool:
        return path in self.entries

    def __getitem__(self, path: PurePosixPath) -> Entry:
        return self.entries[path]

    def get(self, path: PurePosixPath) -> Entry | None:
        return self.entries.get(path)

    def walk(self) -> Iterator[tuple[PurePosixPath, Entry]]:
        """Entries in a deterministic order: parents before children, byte-wise sorted names."""
        for path in sorted(self.entries, key=_sort_key):
            yield path, self.entries[path]

    def children(self, path: PurePosixPath) -> list[PurePosixPath]:
        return [p for p in self.entries if p != ROOT and p.parent == path]

    def remove(self, path: PurePosixPath) -> None:
        """Remove ``path`` and everything below it (no-op when missing)."""
        if path == ROOT:
            raise ValueError("cannot remove the root")
        self.entries.pop(path, None)
        prefix = str(path) + "/"
        for p in [p for p in self.entries if str(p).startswith(prefix)]:
            del self.entries[p]

    def total_file_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for e in self.entries.values():
            if e.kind is Kind.FILE and e.data is not None and id(e.data) not in seen:
                seen.add(id(e.data))
                total += e.data.size
        return total

    def close(self) -> None:
        self.spool.close()


def _sort_key(path: PurePosixPath) -> tuple[bytes, ...]:
    return tuple(os.fsencode(part) for part in path.parts[1:])


