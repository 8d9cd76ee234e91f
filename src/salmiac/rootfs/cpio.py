"""Deterministic ``newc`` cpio writer (the format the Linux kernel unpacks as an initramfs).

Each entry is a 110-byte ASCII header (magic ``070701`` then 13 eight-digit hex fields), the NUL-terminated
name padded to 4 bytes, and the data padded to 4 bytes; ``TRAILER!!!`` ends the archive. Determinism comes from
the caller's order plus: inode numbers assigned sequentially from 0, device numbers of the archive (``devmajor``,
``devminor``) always 0, mtime and ownership exactly as given (mtime defaults to 0), directories' nlink as given
(``write_tree`` uses 2 + subdirectories, like a real filesystem). For the same tree and order the bytes equal
GNU ``cpio -o -H newc --reproducible`` except that GNU pads the archive to 512 bytes (tested).

Hardlinks are kept, not duplicated: ``add_file(..., hardlinks=[...])`` writes the extra names first with size
0, then the main name with the data, all with one inode number and ``nlink`` = number of names. That is what
GNU cpio writes, and both GNU ``cpio -i`` and the kernel's initramfs unpacker join them into one inode. Like
GNU cpio, ``write_tree`` numbers a hardlinked inode when it first meets one of its names
(``reserve_inode``).

newc has no xattrs: they are dropped (the kernel's initramfs unpacker cannot set them either). Special files
(devices, fifos) are written as headers only; nothing is ever created on the host.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from salmiac.image.tree import ROOT, Entry, FileData, Kind, Tree

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_SIZE = 110
MAX_FIELD = 0xFFFFFFFF  # every numeric field is 8 hex digits
_COPY_CHUNK = 1 << 20

Data = bytes | FileData | Path


class CpioError(ValueError):
    """An entry cannot be represented in newc (bad name, value too large...)."""


class CpioWriter:
    def __init__(self, fileobj: BinaryIO, *, mtime: int = 0) -> None:
        self._out = fileobj
        self._default_mtime = mtime
        self._next_ino = 0
        self._written = 0
        self._finished = False

    @property
    def bytes_written(self) -> int:
        return self._written

    def add_dir(
        self, name: str, *, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int | None = None, nlink: int = 2
    ) -> None:
        self._entry(name, stat.S_IFDIR | _perm(mode), uid, gid, nlink, mtime, b"")

    def add_file(
        self,
        name: str,
        data: Data,
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
        hardlinks: Sequence[str] = (),
        ino: int | None = None,
    ) -> None:
        """A regular file; ``hardlinks`` are more names for the same inode, written before ``name``.

        ``ino`` is a number from ``reserve_inode()``; by default the next one is taken.
        """
        if ino is None:
            ino = self._alloc_ino()
        elif not 0 <= ino < self._next_ino:
            raise CpioError(f"{name}: inode {ino} was not reserved")
        nlink = 1 + len(hardlinks)
        full_mode = stat.S_IFREG | _perm(mode)
        for link in hardlinks:
            self._header(link, ino, full_mode, uid, gid, nlink, mtime, 0, (0, 0))
        if isinstance(data, bytes):
            self._header(name, ino, full_mode, uid, gid, nlink, mtime, len(data), (0, 0))
            self._write(data)
            self._pad(len(data))
        elif isinstance(data, FileData):
            self._header(name, ino, full_mode, uid, gid, nlink, mtime, data.size, (0, 0))
            data.copy_to(self._out)
            self._written += data.size
            self._pad(data.size)
        else:
            self._add_host_file(name, data, ino, full_mode, uid, gid, nlink, mtime)

    def add_symlink(
        self, name: str, target: str, *, mode: int = 0o777, uid: int = 0, gid: int = 0, mtime: int | None = None
    ) -> None:
        payload = os.fsencode(target)
        if not payload or b"\0" in payload:
            raise CpioError(f"{name}: symlink target must be non-empty without NUL")
        self._entry(name, stat.S_IFLNK | _perm(mode), uid, gid, 1, mtime, payload)

    def add_device(
        self,
        name: str,
        kind: Kind,
        major: int,
        minor: int,
        *,
        mode: int = 0o600,
        uid: int = 0,
        gid: int = 0,
        mtime: int | None = None,
    ) -> None:
        if kind is Kind.CHAR:
            type_bits = stat.S_IFCHR
        elif kind is Kind.BLOCK:
            type_bits = stat.S_IFBLK
        else:
            raise CpioError(f"{name}: a device is CHAR or BLOCK, not {kind.value}")
        ino = self._alloc_ino()
        self._header(name, ino, type_bits | _perm(mode), uid, gid, 1, mtime, 0, (major, minor))

    def add_fifo(self, name: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int | None = None) -> None:
        self._entry(name, stat.S_IFIFO | _perm(mode), uid, gid, 1, mtime, b"")

    def finish(self) -> None:
        """Write the trailer. The archive is complete; further adds are refused."""
        if self._finished:
            return
        self._header(TRAILER, 0, 0, 0, 0, 1, 0, 0, (0, 0), check_name=False)
        self._finished = True

    # -- internals -------------------------------------------------------------------------------------

    def reserve_inode(self) -> int:
        """Take the next inode number now, for a file written later (``add_file(..., ino=)``)."""
        return self._alloc_ino()

    def _alloc_ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _entry(self, name: str, mode: int, uid: int, gid: int, nlink: int, mtime: int | None, data: bytes) -> None:
        self._header(name, self._alloc_ino(), mode, uid, gid, nlink, mtime, len(data), (0, 0))
        self._write(data)
        self._pad(len(data))

    def _add_host_file(
        self, name: str, path: Path, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int | None
    ) -> None:
        with path.open("rb") as src:
            size = os.fstat(src.fileno()).st_size
            self._header(name, ino, mode, uid, gid, nlink, mtime, size, (0, 0))
            remaining = size
            while remaining:
                chunk = src.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    raise CpioError(f"{path}: file shrank while being archived")
                self._write(chunk)
                remaining -= len(chunk)
        self._pad(size)

    def _header(
        self,
        name: str,
        ino: int,
        mode: int,
        uid: int,
        gid: int,
        nlink: int,
        mtime: int | None,
        size: int,
        rdev: tuple[int, int],
        *,
        check_name: bool = True,
    ) -> None:
        if self._finished:
            raise CpioError("archive already finished")
        if check_name:
            check_entry_name(name)
        encoded = os.fsencode(name) + b"\0"
        fields = (
            ino,
            mode,
            uid,
            gid,
            nlink,
            self._default_mtime if mtime is None else mtime,
            size,
            0,  # devmajor of the archived filesystem: meaningless here, fixed for determinism
            0,  # devminor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check: only used by the "crc" variant
        )
        for value in fields:
            if not 0 <= value <= MAX_FIELD:
                raise CpioError(f"{name}: value {value} does not fit a newc header field")
        header = MAGIC + b"".join(b"%08X" % v for v in fields)
        self._write(header + encoded)
        self._pad(HEADER_SIZE + len(encoded))

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._written += len(data)

    def _pad(self, length: int) -> None:
        pad = -length % 4
        if pad:
            self._write(b"\0" * pad)


def check_entry_name(name: str) -> None:
    """Archive names are relative, clean and NUL-free: "bin/sh", not "/bin/sh", "./x", "a/../b" or "a//b"."""
    if name == ".":
        return
    if not name or name.startswith("/") or "\0" in name:
        raise CpioError(f"bad cpio entry name {name!r}")
    if any(part in ("", ".", "..") for part in name.split("/")):
        raise CpioError(f"bad cpio entry name {name!r}")


def write_tree(tree: Tree, writer: CpioWriter, prefix: str = "", *, mtime: int | None = None) -> None:
    """Every entry of ``tree``, parents first in byte-sorted order, under ``prefix`` (e.g. "rootfs").

    The root directory is written as ``prefix`` (or "." without a prefix) so its mode and owner travel too.
    ``mtime`` overrides every entry's own mtime when given. Hardlinked files (entries sharing one FileData)
    are written once, at the position of their last name, with the earlier names as hardlinks: their parent
    directories precede them in the order, so every name's directory exists when the inode is created.
    """
    if prefix:
        check_entry_name(prefix)
    subdirs: dict[PurePosixPath, int] = {}
    links: dict[int, list[PurePosixPath]] = {}
    for path, entry in tree.walk():
        if entry.kind is Kind.DIR and path != ROOT:
            subdirs[path.parent] = subdirs.get(path.parent, 0) + 1
        if entry.kind is Kind.FILE and entry.data is not None:
            links.setdefault(id(entry.data), []).append(path)

    reserved: dict[int, int] = {}  # id(FileData) of a hardlink group → its inode number
    for path, entry in tree.walk():
        when = entry.mtime if mtime is None else mtime
        name = _arcname(path, prefix)
        common = {"mode": entry.mode, "uid": entry.uid, "gid": entry.gid, "mtime": when}
        match entry.kind:
            case Kind.DIR:
                writer.add_dir(name, nlink=2 + subdirs.get(path, 0), **common)
            case Kind.FILE:
                _write_tree_file(writer, path, entry, links, reserved, prefix, when)
            case Kind.SYMLINK:
                if entry.target is None:
                    raise CpioError(f"{path}: symlink without target")
                writer.add_symlink(name, entry.target, **common)
            case Kind.CHAR | Kind.BLOCK:
                writer.add_device(name, entry.kind, entry.rdev[0], entry.rdev[1], **common)
            case Kind.FIFO:
                writer.add_fifo(name, **common)


def _write_tree_file(
    writer: CpioWriter,
    path: PurePosixPath,
    entry: Entry,
    links: dict[int, list[PurePosixPath]],
    reserved: dict[int, int],
    prefix: str,
    when: int,
) -> None:
    name = _arcname(path, prefix)
    if entry.data is None:
        writer.add_file(name, b"", mode=entry.mode, uid=entry.uid, gid=entry.gid, mtime=when)
        return
    group = links[id(entry.data)]
    if len(group) == 1:
        writer.add_file(name, entry.data, mode=entry.mode, uid=entry.uid, gid=entry.gid, mtime=when)
        return
    if path == group[0]:
        reserved[id(entry.data)] = writer.reserve_inode()
    if path != group[-1]:
        return  # written with the last name of its group
    # Earlier names nearest first: the order GNU cpio writes its deferred links in, so bytes can be compared.
    others = [_arcname(p, prefix) for p in reversed(group[:-1])]
    ino = reserved[id(entry.data)]
    writer.add_file(
        name, entry.data, mode=entry.mode, uid=entry.uid, gid=entry.gid, mtime=when, hardlinks=others, ino=ino
    )


def _arcname(path: PurePosixPath, prefix: str) -> str:
    rel = str(path.relative_to(ROOT))
    if rel == ".":
        return prefix or "."
    return f"{prefix}/{rel}" if prefix else rel


def _perm(mode: int) -> int:
    if mode & ~0o7777:
        raise CpioError(f"mode {mode:#o} has bits outside 0o7777 (the type is given by the method)")
    return mode
