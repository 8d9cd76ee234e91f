"""Flatten image layers into an in-memory ``Tree``: the one careful place for layer semantics.

Modelled on umoci's ``oci/layer`` (STYLE.md section 2), but nothing is ever extracted to the host: every
layer is streamed through ``tarfile`` in ``r|`` mode (no seeking) and applied to a ``Tree``.

Per layer
- Compression is detected by magic bytes (gzip, zstd, or none), never by media type. bzip2/xz are refused.
- The uncompressed stream is hashed; after the tar ends the remaining bytes are drained and hashed too,
  then the digest is compared with the expected diff_id (as umoci's unpack does).
- Whatever follows the last entry must be a proper end of archive (EOF, or zero blocks, as Go's
  archive/tar requires); Python's tarfile would silently stop at a corrupt header instead, which would
  let an image show us fewer entries than a container engine sees.

Per entry (OCI image-spec "Applying changesets"; umoci ``tar_extract.go`` / containerd ``applyNaive``)
- ``clean_name()`` anchors the name lexically at ``/``: ``../x``, ``/x`` and ``./x`` all mean ``/x``.
- The PARENT directory is resolved inside the tree, following symlinks made by earlier entries exactly as
  the kernel would inside the rootfs (umoci and containerd do the same with securejoin /
  ``fs.RootPath``); ``..`` in link targets stops at ``/``; more than ``MAX_SYMLINK_FOLLOWS`` links is an
  error (ELOOP). The last component is never followed: an entry replaces a symlink at its own path.
- ``.wh.NAME`` removes NAME and ``.wh..wh..opq`` removes the directory's children, but only what earlier
  layers made: paths this layer wrote (and their ancestors) are kept, in whatever order the tar lists
  them (umoci's ``upperPaths``; here the per-layer ``touched`` set). Whiteouts never create parents.
  Other ``.wh..wh.`` names are AUFS bookkeeping and are ignored, as docker does. A ``.wh.`` name as a
  directory component (``.wh.x/y``) is refused: no layer can contain such a directory.
- A directory over a directory keeps the children and takes the new metadata; any other combination
  replaces the old path (a directory replaced by a file loses its children). The root stays a directory.
- Hard links share ``FileData`` with their target, also across layers; the target's parent is resolved
  like any parent, its last component is not followed. A missing target, a directory, or a target that
  replacing the link's own path removes (``a -> a``, ``d -> d/f``) is an error, as in umoci/containerd.
  Links to symlinks, devices and fifos become independent copies (the tree only models file inodes).
- Missing parents are created (0755, root:root, mtime 0); a parent that exists and is not a directory
  is an error. Devices and fifos are kept as entries only. ``SCHILY.xattr.*`` records become xattrs.

Everything an image controls is bounded by ``Limits`` before it is stored. Every error is an
``ImageError`` whose message starts with ``layer N (sha256:...)`` (N counts from 1).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import io
import math
import os
import re
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Protocol, cast

import zstandard

from salmiac.errors import ImageError
from salmiac.image.tree import ROOT, Entry, Kind, Tree

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

#: As securejoin: more links than this while resolving one path is a loop (ELOOP).
MAX_SYMLINK_FOLLOWS = 255
#: Bytes tarfile may read to parse the headers of one entry (pax records, GNU long names, sparse maps).
#: Go's archive/tar caps each such record at 1 MiB; tarfile would otherwise allocate whatever a header asks.
MAX_HEADER_BYTES = 4 << 20
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_VALUE_MAX = 65536
ID_MAX = 2**32 - 1
DEV_MAX = 2**32 - 1
MTIME_MAX = 2**63 - 1

_TAR_BLOCK = 512
_CHUNK = 1 << 20
#: zstd can turn 4 input bytes into a 128 KiB block; feeding 1 KiB at a time bounds one step to 32 MiB.
_ZSTD_FEED = 1024
#: gzip output per step (zlib honours a maximum, so the input step can be larger).
_GZIP_MAX_OUT = 256 << 10
_ZSTD_MAX_WINDOW = 1 << 27
#: The end-of-archive check looks back at most this far; tarfile reads ahead less than one record.
_WINDOW_BYTES = 1 << 20
_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_XATTR_PREFIX = "SCHILY.xattr."
_SHOW_MAX = 160

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.GNUTYPE_SPARSE)
_DEVICE_KINDS = {tarfile.CHRTYPE: Kind.CHAR, tarfile.BLKTYPE: Kind.BLOCK, tarfile.FIFOTYPE: Kind.FIFO}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what an image may make us store or compute (zip bombs, path bombs, entry floods)."""

    max_layers: int = 128
    #: Uncompressed tar bytes over all layers, and separately file bytes stored (sparse files expand).
    max_total_bytes: int = 32 << 30
    max_file_bytes: int = 8 << 30
    #: Tar entries plus directories created implicitly, over all layers.
    max_entries: int = 2_000_000
    #: Of a cleaned, resolved path and of a symlink target (PATH_MAX).
    max_path_bytes: int = 4096
    max_depth: int = 256
    #: Uncompressed / compressed bytes of one layer, checked once the layer is past ``ratio_grace_bytes``:
    #: gzip cannot exceed ~1032, so this mostly catches zstd bombs; raise it for images full of zeros.
    max_ratio: int = 500
    ratio_grace_bytes: int = 64 << 20


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


@dataclass(frozen=True, slots=True)
class LayerInfo:
    index: int  # 1-based, as in error messages
    diff_id: str  # computed digest of the uncompressed tar
    compression: Compression
    compressed_bytes: int
    uncompressed_bytes: int
    entries: int


@dataclass(frozen=True, slots=True)
class TreeStats:
    entries: int
    files: int
    dirs: int
    symlinks: int
    others: int
    file_bytes: int  # each hardlinked inode once
    symlink_bytes: int

    def estimate_fs_bytes(self, block_size: int = 4096, inode_size: int = 256) -> int:
        """A rough filesystem size for the tree: data in whole blocks, one inode per entry, dir blocks."""
        return self.file_bytes + (self.files + self.dirs) * block_size + self.entries * inode_size


def tree_stats(tree: Tree) -> TreeStats:
    counts = collections.Counter(e.kind for e in tree.entries.values())
    symlink_bytes = sum(e.size for e in tree.entries.values() if e.kind is Kind.SYMLINK)
    return TreeStats(
        entries=len(tree.entries),
        files=counts[Kind.FILE],
        dirs=counts[Kind.DIR],
        symlinks=counts[Kind.SYMLINK],
        others=counts[Kind.CHAR] + counts[Kind.BLOCK] + counts[Kind.FIFO],
        file_bytes=tree.total_file_bytes(),
        symlink_bytes=symlink_bytes,
    )


def clean_name(unsafe_name: str) -> PurePosixPath:
    """Lexically clean a tar name and anchor it at ``/``: ``..`` never climbs above the root."""
    parts: list[str] = []
    for part in unsafe_name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return PurePosixPath("/", *parts)


def flatten(
    layers: Iterable[tuple[BinaryIO, str | None]],
    *,
    tree: Tree | None = None,
    limits: Limits = Limits(),
) -> Tree:
    """Apply each ``(blob stream, expected diff_id or None)`` in order and return the tree.

    A tree passed in is modified in place and must be discarded if an error is raised; a tree created
    here is closed on error.
    """
    flattener = Flattener(tree, limits)
    try:
        for blob, diff_id in layers:
            flattener.apply_layer(blob, diff_id)
    except BaseException:
        if tree is None:
            flattener.tree.close()
        raise
    return flattener.tree


class Flattener:
    """Applies layers one at a time (for callers that fetch them one at a time)."""

    def __init__(self, tree: Tree | None = None, limits: Limits = Limits()) -> None:
        self.tree = tree if tree is not None else Tree()
        self.limits = limits
        self.layers: list[LayerInfo] = []
        self._index = _TreeIndex(self.tree)
        self._budget = _Budget(limits)

    def apply_layer(self, blob: BinaryIO, diff_id: str | None) -> LayerInfo:
        index = len(self.layers) + 1
        if diff_id is not None and not _DIGEST_RE.fullmatch(diff_id):
            raise ImageError(f"layer {index}: invalid diff_id {_show(diff_id)}: expected sha256:<64 hex digits>")
        label = f"layer {index}" + (f" ({diff_id})" if diff_id else "")
        if index > self.limits.max_layers:
            raise ImageError(f"{label}: more than {self.limits.max_layers} layers")
        algorithm = diff_id.split(":", 1)[0] if diff_id else "sha256"
        try:
            info = self._apply(index, blob, diff_id, algorithm)
        except ImageError as exc:
            raise ImageError(f"{label}: {exc}") from exc
        except (tarfile.TarError, EOFError) as exc:
            raise ImageError(f"{label}: corrupt tar stream: {exc}") from exc
        except zlib.error as exc:
            raise ImageError(f"{label}: corrupt gzip stream: {exc}") from exc
        except zstandard.ZstdError as exc:
            raise ImageError(f"{label}: corrupt zstd stream: {exc}") from exc
        self.layers.append(info)
        return info

    def _apply(self, index: int, blob: BinaryIO, diff_id: str | None, algorithm: str) -> LayerInfo:
        decoder = _open_decoder(blob)
        stream = _LayerStream(decoder, hashlib.new(algorithm), self._budget, self.limits)
        applier = _LayerApplier(self.tree, self._index, self._budget, self.limits)
        entries = 0
        if stream.peek_empty():
            end_offset = 0  # Go's archive/tar reads an empty stream as an empty archive; so do we.
        else:
            stream.begin_header()  # tarfile.open() already reads the first header
            with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tf:
                while True:
                    member = tf.next()
                    stream.begin_data()
                    # tarfile keeps every member in a list otherwise (unbounded memory); we never look back.
                    tf.members.clear()  # type: ignore[attr-defined]
                    if member is None:
                        break
                    entries += 1
                    applier.apply(tf, member)
                    stream.begin_header()
                end_offset = tf.offset
        stream.check_end_of_archive(end_offset)
        stream.drain()
        actual = f"{algorithm}:{stream.hasher.hexdigest()}"
        if diff_id is not None and actual != diff_id:
            raise ImageError(f"diff_id mismatch: uncompressed layer is {actual}")
        return LayerInfo(index, actual, decoder.compression, decoder.compressed_bytes, stream.pos, entries)


# --- decoding -----------------------------------------------------------------------------------------


class _Decoder(Protocol):
    compression: Compression
    compressed_bytes: int

    def read(self, size: int) -> bytes:
        """Up to ``size`` uncompressed bytes; b"" only at a proper end. Raises on truncation."""
        ...


def _open_decoder(blob: BinaryIO) -> _Decoder:
    head = b""
    while len(head) < 6:
        chunk = blob.read(6 - len(head))
        if not chunk:
            break
        head += chunk
    if head.startswith(GZIP_MAGIC):
        return _GzipDecoder(blob, head)
    if head.startswith(ZSTD_MAGIC):
        return _ZstdDecoder(blob, head)
    if head.startswith(XZ_MAGIC) or head.startswith(BZIP2_MAGIC):
        raise ImageError("unsupported layer compression (xz or bzip2); OCI layers are tar, gzip or zstd")
    return _PlainDecoder(blob, head)


class _PlainDecoder:
    compression = Compression.NONE

    def __init__(self, blob: BinaryIO, head: bytes) -> None:
        self._blob = blob
        self._head = head
        self.compressed_bytes = len(head)

    def read(self, size: int) -> bytes:
        if self._head:
            out, self._head = self._head[:size], self._head[size:]
            return out
        out = self._blob.read(size)
        self.compressed_bytes += len(out)
        return out


class _StreamDecoder:
    """Shared plumbing: input consumed by offset and output served by offset, so nothing is copied twice.

    A subclass decodes one member/frame per ``_new()`` object; bytes after a member must start another one
    (multi-member gzip and multi-frame zstd, as Go's readers and containerd accept), and input that ends
    inside a member is truncated.
    """

    compression: Compression
    #: Compressed bytes offered per step; small enough that one step's output stays bounded.
    _feed: int

    def __init__(self, blob: BinaryIO, head: bytes) -> None:
        self._blob = blob
        self._input = head
        self._off = 0
        self.compressed_bytes = len(head)
        self._source_done = False
        self._pending = b""
        self._pending_off = 0
        self._member_started = False

    def read(self, size: int) -> bytes:
        while self._pending_off >= len(self._pending):
            if not self._step():
                return b""
        out = self._pending[self._pending_off : self._pending_off + size]
        self._pending_off += len(out)
        return out

    def _step(self) -> bool:
        """Decode one bounded step into ``_pending``; False at a proper end of the stream."""
        if self._off >= len(self._input) and not self._fill():
            if self._member_started:
                raise ImageError(f"truncated {self.compression.value} stream")
            return False
        self._member_started = True
        feed = memoryview(self._input)[self._off : self._off + self._feed]
        self._pending, leftover, ended = self._decode(feed)
        self._pending_off = 0
        self._off += len(feed) - leftover
        if ended:
            self._member_started = False
        return True

    def _fill(self) -> bool:
        if self._source_done:
            return False
        chunk = self._blob.read(_CHUNK)
        if not chunk:
            self._source_done = True
            return False
        self.compressed_bytes += len(chunk)
        self._input = self._input[self._off :] + chunk
        self._off = 0
        return True

    def _decode(self, feed: memoryview) -> tuple[bytes, int, bool]:
        """(output, input bytes not consumed, member ended)."""
        raise NotImplementedError


class _GzipDecoder(_StreamDecoder):
    compression = Compression.GZIP
    _feed = 64 << 10

    def __init__(self, blob: BinaryIO, head: bytes) -> None:
        super().__init__(blob, head)
        self._zd = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def _decode(self, feed: memoryview) -> tuple[bytes, int, bool]:
        out = self._zd.decompress(feed, _GZIP_MAX_OUT)
        if self._zd.eof:
            leftover = len(self._zd.unused_data)  # unconsumed_tail may repeat it: ignore that one
            self._zd = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return out, leftover, True
        return out, len(self._zd.unconsumed_tail), False


class _ZstdDecoder(_StreamDecoder):
    compression = Compression.ZSTD
    _feed = _ZSTD_FEED

    def __init__(self, blob: BinaryIO, head: bytes) -> None:
        super().__init__(blob, head)
        self._dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        self._zd = self._dctx.decompressobj()

    def _decode(self, feed: memoryview) -> tuple[bytes, int, bool]:
        out = self._zd.decompress(feed)
        if self._zd.eof:
            leftover = len(self._zd.unused_data)
            self._zd = self._dctx.decompressobj()
            return out, leftover, True
        return out, 0, False  # zstd keeps what it cannot decode yet inside the context


class _Budget:
    """What all layers of one flatten may consume."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.stream_bytes = 0
        self.stored_bytes = 0
        self.entries = 0

    def add_stream(self, n: int) -> None:
        self.stream_bytes += n
        if self.stream_bytes > self.limits.max_total_bytes:
            raise ImageError(f"image exceeds {self.limits.max_total_bytes} uncompressed bytes")

    def add_stored(self, n: int) -> None:
        self.stored_bytes += n
        if self.stored_bytes > self.limits.max_total_bytes:
            raise ImageError(f"image files exceed {self.limits.max_total_bytes} bytes")

    def add_entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ImageError(f"image has more than {self.limits.max_entries} entries")


class _LayerStream(io.RawIOBase):
    """The uncompressed tar of one layer as tarfile reads it: every byte is hashed, counted and bounded."""

    def __init__(self, decoder: _Decoder, hasher: hashlib._Hash, budget: _Budget, limits: Limits) -> None:
        super().__init__()
        self._decoder = decoder
        self.hasher = hasher
        self._budget = budget
        self._limits = limits
        self.pos = 0
        self._header_mode = False
        self._header_bytes = 0
        self._window: collections.deque[tuple[int, bytes]] = collections.deque()
        self._window_bytes = 0
        self._peeked = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        if self._peeked:
            out, self._peeked = self._peeked[:size], self._peeked[size:]
            return out
        return self._pull(size)

    def peek_empty(self) -> bool:
        self._peeked = self._pull(_TAR_BLOCK)
        return not self._peeked

    def _pull(self, size: int) -> bytes:
        data = self._decoder.read(size)
        if not data:
            return data
        self.hasher.update(data)
        self._window.append((self.pos, data))
        self._window_bytes += len(data)
        while self._window_bytes - len(self._window[0][1]) >= _WINDOW_BYTES:
            self._window_bytes -= len(self._window.popleft()[1])
        self.pos += len(data)
        self._budget.add_stream(len(data))
        if (
            self._decoder.compression is not Compression.NONE
            and self.pos > self._limits.ratio_grace_bytes
            and self.pos > self._limits.max_ratio * self._decoder.compressed_bytes
        ):
            raise ImageError(
                f"compression ratio above {self._limits.max_ratio}:1 "
                f"({self._decoder.compressed_bytes} bytes expand past {self.pos}): refusing a likely bomb"
            )
        if self._header_mode:
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                raise ImageError(f"tar headers at offset {self.pos} exceed {MAX_HEADER_BYTES} bytes")
        return data

    def begin_header(self) -> None:
        self._header_mode = True
        self._header_bytes = 0

    def begin_data(self) -> None:
        self._header_mode = False

    def check_end_of_archive(self, offset: int) -> None:
        """What follows the last entry must be EOF, or a zero block then EOF or a zero block (Go's rules)."""
        if offset > self.pos:
            raise ImageError(f"truncated tar stream at offset {self.pos}")
        while self.pos < offset + 2 * _TAR_BLOCK and self._pull(2 * _TAR_BLOCK):
            pass
        if self._window and self._window[0][0] > offset:
            raise RuntimeError("internal: end-of-archive window lost")  # tarfile reads ahead < 1 record
        tail = b"".join(chunk for _, chunk in self._window)
        start = self._window[0][0] if self._window else self.pos
        blocks = tail[offset - start : offset - start + 2 * _TAR_BLOCK]
        for i in range(2):
            block = blocks[i * _TAR_BLOCK : (i + 1) * _TAR_BLOCK]
            if not block:
                return
            if len(block) < _TAR_BLOCK:
                raise ImageError(f"truncated tar header at offset {offset + i * _TAR_BLOCK}")
            if block.count(0) != _TAR_BLOCK:
                raise ImageError(f"invalid tar header at offset {offset + i * _TAR_BLOCK}")

    def drain(self) -> None:
        self._window.clear()
        self._window_bytes = 0
        while self._pull(_CHUNK):
            self._window.clear()
            self._window_bytes = 0


# --- applying entries ---------------------------------------------------------------------------------


class _TreeIndex:
    """Children of each directory, so whiteouts and replacements cost the size of the subtree only."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        self.children: dict[PurePosixPath, set[PurePosixPath]] = collections.defaultdict(set)
        for path in tree.entries:
            if path != ROOT:
                self.children[path.parent].add(path)
        #: lexical directory -> resolved directory. Resolution depends only on which paths are symlinks
        #: (missing components resolve lexically), so the cache is dropped whenever a symlink comes or goes.
        self.resolved: dict[PurePosixPath, PurePosixPath] = {}

    def put(self, path: PurePosixPath, entry: Entry) -> None:
        self.tree.entries[path] = entry
        self.children[path.parent].add(path)
        if entry.kind is Kind.SYMLINK:
            self.resolved.clear()

    def remove(self, path: PurePosixPath) -> None:
        """Remove ``path`` and everything below it."""
        self.children[path.parent].discard(path)
        stack = [path]
        while stack:
            p = stack.pop()
            entry = self.tree.entries.pop(p, None)
            if entry is not None and entry.kind is Kind.SYMLINK:
                self.resolved.clear()
            stack.extend(self.children.pop(p, ()))

    def list_children(self, path: PurePosixPath) -> list[PurePosixPath]:
        return list(self.children.get(path, ()))


class _LayerApplier:
    """Applies the entries of one layer; ``touched`` is this layer's upper paths (with ancestors)."""

    def __init__(self, tree: Tree, index: _TreeIndex, budget: _Budget, limits: Limits) -> None:
        self.tree = tree
        self.index = index
        self.budget = budget
        self.limits = limits
        self.touched: set[PurePosixPath] = set()

    def apply(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.budget.add_entry()
        try:
            self._apply(tf, member)
        except ImageError as exc:
            raise ImageError(f"entry {_show(member.name)}: {exc}") from exc

    def _apply(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        if "\0" in member.name or "\0" in member.linkname:
            raise ImageError("NUL byte in name")  # PAX records can carry one; Go's archive/tar refuses them too
        lexical = clean_name(member.name)
        if lexical == ROOT:
            if member.type != tarfile.DIRTYPE:
                raise ImageError("refusing to change the type of the root directory")
            self._put(ROOT, self._entry(member, Kind.DIR))
            return
        name = lexical.name
        if any(part.startswith(WHITEOUT_PREFIX) for part in lexical.parts[1:-1]):
            # No layer can hold such a directory (its own entry would be a whiteout): refuse, not invent it.
            raise ImageError("whiteout name used as a directory")
        path = self.resolve_dir(lexical.parent) / name
        self._check_path(path)

        if name.startswith(WHITEOUT_PREFIX):
            self._skip_data(tf, member)
            if name == WHITEOUT_OPAQUE:
                self.apply_opaque(path.parent)
            elif not name.startswith(WHITEOUT_META_PREFIX):  # other .wh..wh.* are AUFS bookkeeping
                hidden = name[len(WHITEOUT_PREFIX) :]
                if hidden in ("", ".", ".."):
                    raise ImageError("whiteout names no file")
                self.apply_whiteout(path.parent / hidden)
            return

        if member.type in _FILE_TYPES:
            self._put(path, self._file_entry(tf, member))
        elif member.type == tarfile.DIRTYPE:
            self._put(path, self._entry(member, Kind.DIR))
        elif member.type == tarfile.SYMTYPE:
            entry = self._entry(member, Kind.SYMLINK)
            entry.target = self._check_target(member.linkname)
            self._put(path, entry)
        elif member.type == tarfile.LNKTYPE:
            self.link_to(path, member.linkname)
        elif member.type in _DEVICE_KINDS:
            entry = self._entry(member, _DEVICE_KINDS[member.type])
            if entry.kind is not Kind.FIFO:
                if not (0 <= member.devmajor <= DEV_MAX and 0 <= member.devminor <= DEV_MAX):
                    raise ImageError("device number out of range")
                entry.rdev = (member.devmajor, member.devminor)
            self._put(path, entry)
        else:
            raise ImageError(f"unsupported tar entry type {member.type!r}")

    # -- one function per concern --

    def resolve_dir(self, lexical: PurePosixPath) -> PurePosixPath:
        """Resolve a directory path inside the tree as the kernel would in the rootfs, never above ``/``."""
        resolved = self.index.resolved.get(lexical)
        if resolved is None:
            resolved = self.index.resolved[lexical] = self._resolve_dir(lexical)
        return resolved

    def _resolve_dir(self, lexical: PurePosixPath) -> PurePosixPath:
        pending = collections.deque(lexical.parts[1:])
        current = ROOT
        follows = 0
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                current = current.parent
                continue
            candidate = current / part
            entry = self.tree.get(candidate)
            if entry is None or entry.kind is not Kind.SYMLINK or entry.target is None:
                current = candidate
                if len(current.parts) > self.limits.max_depth + 1:
                    raise ImageError(f"path deeper than {self.limits.max_depth} components")
                continue
            follows += 1
            if follows > MAX_SYMLINK_FOLLOWS:
                raise ImageError(f"too many levels of symbolic links in {_show(str(lexical))}")
            if entry.target.startswith("/"):
                current = ROOT
            pending.extendleft(reversed(entry.target.split("/")))
        return current

    def apply_whiteout(self, path: PurePosixPath) -> None:
        if path in self.tree:
            self._prune(path, keep_top=False)

    def apply_opaque(self, directory: PurePosixPath) -> None:
        entry = self.tree.get(directory)
        if entry is not None and entry.kind is Kind.DIR:
            self._prune(directory, keep_top=True)

    def link_to(self, path: PurePosixPath, unsafe_target: str) -> None:
        lexical = clean_name(unsafe_target)
        if lexical == ROOT:
            raise ImageError("hardlink target is a directory: /")
        target_path = self.resolve_dir(lexical.parent) / lexical.name
        target = self.tree.get(target_path)
        if target is None:
            raise ImageError(f"hardlink target {_show(unsafe_target)} does not exist")
        if target.kind is Kind.DIR:
            raise ImageError(f"hardlink target {_show(unsafe_target)} is a directory")
        if target_path == path or path in target_path.parents:
            # Extractors (umoci, containerd) remove the old path before link(2): the target is gone by then.
            raise ImageError(f"hardlink target {_show(unsafe_target)} is removed by replacing the link itself")
        # Same FileData object = same inode; the header's own metadata is ignored, as link(2) would.
        self._put(path, dataclasses.replace(target, xattrs=dict(target.xattrs)))

    # -- helpers --

    def _prune(self, top: PurePosixPath, *, keep_top: bool) -> None:
        """Remove what earlier layers made under ``top``; keep what this layer touched (umoci's walk)."""
        stack = [top]
        while stack:
            path = stack.pop()
            if path in self.touched or (keep_top and path == top):
                stack.extend(self.index.list_children(path))
            else:
                self.index.remove(path)

    def _put(self, path: PurePosixPath, entry: Entry) -> None:
        if path == ROOT:
            self.tree.entries[ROOT] = entry
            return
        self._make_parents(path.parent)
        existing = self.tree.get(path)
        if existing is not None and not (existing.kind is Kind.DIR and entry.kind is Kind.DIR):
            self.index.remove(path)
        self.index.put(path, entry)
        self._touch(path)

    def _make_parents(self, directory: PurePosixPath) -> None:
        existing = self.tree.get(directory)
        if existing is not None and existing.kind is Kind.DIR:
            return  # the tree keeps every entry's ancestors as directories
        current = ROOT
        for part in directory.parts[1:]:
            current = current / part
            entry = self.tree.get(current)
            if entry is None:
                self.budget.add_entry()
                self.index.put(current, Entry(Kind.DIR, 0o755))
                self._touch(current)
            elif entry.kind is not Kind.DIR:
                raise ImageError(f"parent {_show(str(current))} is not a directory")

    def _touch(self, path: PurePosixPath) -> None:
        while path not in self.touched:
            self.touched.add(path)
            if path == ROOT:
                break
            path = path.parent

    def _check_path(self, path: PurePosixPath) -> None:
        if len(path.parts) - 1 > self.limits.max_depth:
            raise ImageError(f"path deeper than {self.limits.max_depth} components")
        if len(os.fsencode(str(path))) > self.limits.max_path_bytes:
            raise ImageError(f"path longer than {self.limits.max_path_bytes} bytes")
        if any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):
            raise ImageError(f"name component longer than {NAME_MAX} bytes")

    def _check_target(self, unsafe_target: str) -> str:
        raw = os.fsencode(unsafe_target)
        if not raw:
            raise ImageError("empty symlink target")
        if b"\0" in raw:
            raise ImageError("NUL byte in symlink target")
        if len(raw) >= self.limits.max_path_bytes:
            raise ImageError(f"symlink target longer than {self.limits.max_path_bytes - 1} bytes")
        return unsafe_target

    def _entry(self, member: tarfile.TarInfo, kind: Kind) -> Entry:
        if not (0 <= member.uid <= ID_MAX and 0 <= member.gid <= ID_MAX):
            raise ImageError(f"uid/gid out of range: {member.uid}:{member.gid}")
        if not (math.isfinite(member.mtime) and -MTIME_MAX <= member.mtime <= MTIME_MAX):
            raise ImageError("mtime out of range")
        mtime = int(member.mtime)
        return Entry(
            kind=kind,
            mode=member.mode & 0o7777,
            uid=member.uid,
            gid=member.gid,
            mtime=mtime,
            xattrs=_xattrs(member),
        )

    def _file_entry(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> Entry:
        entry = self._entry(member, Kind.FILE)
        if member.size > self.limits.max_file_bytes:
            raise ImageError(f"file of {member.size} bytes exceeds {self.limits.max_file_bytes}")
        self.budget.add_stored(member.size)
        src = tf.extractfile(member)
        if src is None:  # only for non-regular members, which never get here
            raise ImageError("no data for regular file")
        entry.data = self.tree.spool.append(cast(BinaryIO, src), member.size)
        return entry

    def _skip_data(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        """Consume an ignored entry's data now, so it counts as data and not as the next header."""
        if not member.isreg() or member.size == 0:
            return
        src = tf.extractfile(member)
        while src is not None and src.read(_CHUNK):
            pass


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    xattrs: dict[str, bytes] = {}
    for key in sorted(member.pax_headers):
        if not key.startswith(_XATTR_PREFIX):
            continue
        name = key[len(_XATTR_PREFIX) :]
        value = member.pax_headers[key].encode("utf-8", "surrogateescape")
        if not name or "\0" in name or len(name.encode("utf-8", "surrogateescape")) > XATTR_NAME_MAX:
            raise ImageError(f"bad xattr name {_show(name)}")
        if len(value) > XATTR_VALUE_MAX:
            raise ImageError(f"xattr {_show(name)} larger than {XATTR_VALUE_MAX} bytes")
        xattrs[name] = value
    return xattrs


def _show(unsafe: str) -> str:
    """Quote an untrusted string for a one-line message."""
    if len(unsafe) > _SHOW_MAX:
        return repr(unsafe[:_SHOW_MAX]) + "..."
    return repr(unsafe)
