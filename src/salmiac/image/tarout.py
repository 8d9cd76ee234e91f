"""Write a ``Tree`` as one deterministic tar stream (a single-layer image, an export, a test oracle).

Same tree → same bytes: entries in ``Tree.walk()`` order (parents first, byte-wise sorted names), PAX
format (long names, non-ASCII names, big ids and xattrs go into PAX records, xattrs sorted), empty user
and group names, and optionally one fixed mtime for every entry (SOURCE_DATE_EPOCH). The root is
written as ``./`` so its metadata survives a round trip through ``flatten``. The second and later paths
of a hardlinked file (shared ``FileData``) are tar hardlinks to the first path in walk order.
"""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath
from typing import BinaryIO

from salmiac.image.tree import ROOT, Entry, Kind, Tree

_BLOCK = 512
_TAR_TYPES = {
    Kind.FILE: tarfile.REGTYPE,
    Kind.DIR: tarfile.DIRTYPE,
    Kind.SYMLINK: tarfile.SYMTYPE,
    Kind.CHAR: tarfile.CHRTYPE,
    Kind.BLOCK: tarfile.BLKTYPE,
    Kind.FIFO: tarfile.FIFOTYPE,
}
_XATTR_PREFIX = "SCHILY.xattr."


def tar_name(path: PurePosixPath) -> str:
    """The member name of a tree path: relative, ``./`` for the root."""
    return "./" if path == ROOT else str(path)[1:]


def write_tar(tree: Tree, fileobj: BinaryIO, *, mtime: int | None = None) -> int:
    """Write ``tree`` to ``fileobj`` as a tar stream; returns the number of bytes written."""
    written = 0
    first_paths: dict[int, PurePosixPath] = {}  # id(FileData) -> first path written with it
    for path, entry in tree.walk():
        info = _tarinfo(path, entry, mtime)
        data = entry.data if entry.kind is Kind.FILE else None
        if data is not None:
            first = first_paths.get(id(data))
            if first is None:
                first_paths[id(data)] = path
                info.size = data.size
            else:
                info.type = tarfile.LNKTYPE
                info.linkname = tar_name(first)
                data = None
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        fileobj.write(header)
        written += len(header)
        if data is not None:
            data.copy_to(fileobj)
            padding = -data.size % _BLOCK
            fileobj.write(b"\0" * padding)
            written += data.size + padding
    fileobj.write(b"\0" * (2 * _BLOCK))
    return written + 2 * _BLOCK


def _tarinfo(path: PurePosixPath, entry: Entry, mtime: int | None) -> tarfile.TarInfo:
    info = tarfile.TarInfo(tar_name(path))
    info.type = _TAR_TYPES[entry.kind]
    info.mode = entry.mode & 0o7777
    info.uid = entry.uid
    info.gid = entry.gid
    info.uname = ""
    info.gname = ""
    info.mtime = entry.mtime if mtime is None else mtime
    if entry.kind is Kind.SYMLINK:
        info.linkname = entry.target or ""
    if entry.kind in (Kind.CHAR, Kind.BLOCK):
        info.devmajor, info.devminor = entry.rdev
    if entry.xattrs:
        info.pax_headers = {
            _XATTR_PREFIX + name: entry.xattrs[name].decode("utf-8", "surrogateescape")
            for name in sorted(entry.xattrs)
        }
    return info
