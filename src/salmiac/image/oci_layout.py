"""OCI image layout (``oci:DIR[:TAG]``) and its tar form (``oci-archive:FILE[:TAG]``): read and write.

Reading goes through a small file-access interface (a directory or an ``ArchiveFiles``) so both transports
share one reader. Blob paths are built from validated digests only, never from names found in the layout.
Writing: every blob and ``index.json`` goes to a temp name in the same directory and is renamed into place,
so a crash never leaves a half-written file under a final name. Archives are written deterministically
(sorted members, mtime 0, uid/gid 0) to ``FILE.tmp`` and renamed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from salmiac.errors import ImageError, RequestError
from salmiac.image.archive import ArchiveFiles
from salmiac.image.models import (
    ANNOTATION_REF_NAME,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    LayerBlob,
    digest_hasher,
    load_json,
    parse_index,
    verify_bytes,
)

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
LAYOUT_BYTES = b'{"imageLayoutVersion":"1.0.0"}'
IO_BLOCK = 1 << 20


class LayoutFiles(Protocol):
    def exists(self, unsafe_name: str) -> bool: ...
    def size(self, unsafe_name: str) -> int: ...
    def open(self, unsafe_name: str) -> BinaryIO: ...
    def read(self, unsafe_name: str, limit: int) -> bytes: ...
    def close(self) -> None: ...


class DirFiles:
    """Regular files under a directory, by relative name (names come from our own code, not the layout)."""

    def __init__(self, root: str | os.PathLike[str], what: str) -> None:
        self.root = Path(root)
        self.what = what
        if not self.root.is_dir():
            raise ImageError(f"{what}: not a directory")

    def _path(self, name: str) -> Path:
        return self.root / name

    def exists(self, unsafe_name: str) -> bool:
        return self._path(unsafe_name).exists()

    def size(self, unsafe_name: str) -> int:
        with self.open(unsafe_name) as handle:
            return os.fstat(handle.fileno()).st_size

    def open(self, unsafe_name: str) -> BinaryIO:
        path = self._path(unsafe_name)
        try:
            # O_NONBLOCK: a FIFO planted in the layout must not hang us before the S_ISREG check.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(f"{self.what}: missing {unsafe_name}") from None
        except OSError as exc:
            raise ImageError(f"{self.what}: cannot open {unsafe_name}: {exc.strerror}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ImageError(f"{self.what}: {unsafe_name} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def read(self, unsafe_name: str, limit: int) -> bytes:
        with self.open(unsafe_name) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise ImageError(f"{self.what}: {unsafe_name} exceeds the {limit}-byte limit")
        return data

    def close(self) -> None:
        pass


def blob_name(digest: str) -> str:
    algorithm, hexpart = digest.split(":", 1)
    return f"blobs/{algorithm}/{hexpart}"


class OciLayout:
    """Read side of a layout: ``index.json`` → descriptors → blobs."""

    def __init__(self, files: LayoutFiles, what: str) -> None:
        self.files = files
        self.what = what
        if not files.exists(LAYOUT_FILE):
            raise ImageError(f"{what}: not an OCI image layout (no {LAYOUT_FILE} file)")
        layout = load_json(files.read(LAYOUT_FILE, 4096), f"{what}: {LAYOUT_FILE}", 4096)
        version = layout.get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise ImageError(f"{what}: unsupported imageLayoutVersion {version!r}")
        self.index: Index = parse_index(files.read(INDEX_FILE, MAX_MANIFEST_SIZE), OCI_INDEX, f"{what}: index.json")

    def resolve(self, tag: str | None) -> Descriptor:
        entries = self.index.manifests
        tags = sorted({e.annotations[ANNOTATION_REF_NAME] for e in entries if ANNOTATION_REF_NAME in e.annotations})
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            if not entries:
                raise ImageError(f"{self.what}: the layout holds no images")
            raise ImageError(
                f"{self.what}: holds {len(entries)} images; name one with :TAG (tags: {', '.join(tags) or 'none'})"
            )
        for entry in entries:
            if entry.annotations.get(ANNOTATION_REF_NAME) == tag:
                return entry
        raise ImageError(f"{self.what}: no image tagged {tag!r} (tags: {', '.join(tags) or 'none'})")

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """The raw blob; the caller verifies it (``BlobCache.put``)."""
        return self.files.open(blob_name(desc.digest))

    def read_blob(self, desc: Descriptor, limit: int, what: str) -> bytes:
        if desc.size > limit:
            raise ImageError(f"{what} {desc.digest}: size {desc.size} exceeds the {limit}-byte limit")
        data = self.files.read(blob_name(desc.digest), limit)
        if len(data) != desc.size:
            raise ImageError(
                f"{what} {desc.digest}: size mismatch (descriptor says {desc.size}, blob has {len(data)})"
            )
        verify_bytes(data, desc.digest, what)
        return data

    def close(self) -> None:
        self.files.close()


def open_layout(path: str, archive: bool, *, temp_dir: str | None = None) -> OciLayout:
    if archive:
        what = f"oci-archive:{path}"
        return OciLayout(ArchiveFiles(path, what=what, temp_dir=temp_dir), what)
    what = f"oci:{path}"
    if not os.path.exists(path):
        raise ImageError(f"{what}: no such directory")
    return OciLayout(DirFiles(path, what), what)


# Writing -------------------------------------------------------------------------------------------------


def _compact(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@contextlib.contextmanager
def _atomic(final: Path) -> Iterator[BinaryIO]:
    """A temp file next to ``final``, renamed onto it when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(name, 0o644)
        os.replace(name, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def copy_verified(src: BinaryIO, dst: BinaryIO, digest: str, size: int, what: str) -> None:
    """Copy ``size`` bytes, checking they hash to ``digest`` and that nothing follows."""
    hasher = digest_hasher(digest)
    remaining = size
    while remaining:
        chunk = src.read(min(remaining, IO_BLOCK))
        if not chunk:
            raise ImageError(f"{what} {digest}: size mismatch (expected {size}, got {size - remaining})")
        hasher.update(chunk)
        dst.write(chunk)
        remaining -= len(chunk)
    if src.read(1):
        raise ImageError(f"{what} {digest}: size mismatch (longer than {size} bytes)")
    actual = f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
    if actual != digest:
        raise ImageError(f"{what} {digest}: digest mismatch (content is {actual})")


def _existing_ok(path: Path, digest: str, size: int) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    hasher = digest_hasher(digest)
    with path.open("rb") as handle:
        while chunk := handle.read(IO_BLOCK):
            hasher.update(chunk)
    return f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}" == digest


def _write_blob_file(
    root: Path, digest: str, size: int, src_path: str | os.PathLike[str] | None, data: bytes | None
) -> None:
    final = root / blob_name(digest)
    if _existing_ok(final, digest, size):
        return
    with _atomic(final) as out:
        if data is not None:
            verify_bytes(data, digest, "blob")
            out.write(data)
        else:
            assert src_path is not None  # one of the two is always given by our callers
            with open(src_path, "rb") as src:
                copy_verified(src, out, digest, size, "layer")


def _index_entries_without(existing: bytes | None, tag: str | None, digest: str, what: str) -> list[Any]:
    """Existing index.json entries (validated, kept verbatim) minus the one our new entry replaces."""
    if existing is None:
        return []
    parse_index(existing, OCI_INDEX, f"{what}: index.json")
    doc = load_json(existing, f"{what}: index.json", MAX_MANIFEST_SIZE)
    kept = []
    for entry in doc.get("manifests", []):
        ref = (entry.get("annotations") or {}).get(ANNOTATION_REF_NAME)
        if tag is not None and ref == tag:
            continue
        if tag is None and ref is None and entry.get("digest") == digest:
            continue
        kept.append(entry)
    return kept


def manifest_descriptor(manifest: bytes, digest: str, tag: str | None) -> Descriptor:
    annotations = {ANNOTATION_REF_NAME: tag} if tag else {}
    return Descriptor(OCI_MANIFEST, digest, len(manifest), annotations)


def write_layout(
    directory: str,
    tag: str | None,
    *,
    manifest: bytes,
    manifest_digest: str,
    config: bytes,
    config_digest: str,
    layers: Sequence[LayerBlob],
) -> None:
    """Add an image to (or create) the layout at ``directory``; ``tag`` replaces an image of that name."""
    root = Path(directory)
    what = f"oci:{directory}"
    if root.exists() and not root.is_dir():
        raise RequestError(f"{what}: exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    layout_file = root / LAYOUT_FILE
    if layout_file.exists():
        OciLayout(DirFiles(root, what), what)  # validates the layout we are about to extend
    else:
        with _atomic(layout_file) as out:
            out.write(LAYOUT_BYTES)
    for layer in layers:
        _write_blob_file(root, layer.digest, layer.size, layer.path, None)
    _write_blob_file(root, config_digest, len(config), None, config)
    _write_blob_file(root, manifest_digest, len(manifest), None, manifest)
    index_path = root / INDEX_FILE
    existing = DirFiles(root, what).read(INDEX_FILE, MAX_MANIFEST_SIZE) if index_path.exists() else None
    entries = _index_entries_without(existing, tag, manifest_digest, what)
    entries.append(manifest_descriptor(manifest, manifest_digest, tag).to_json())
    with _atomic(index_path) as out:
        out.write(_compact({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))


def _tar_info(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 0 if directory else size
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class DeterministicTar:
    """A tar written member by member with fixed metadata; the caller orders the members."""

    def __init__(self, handle: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=handle, mode="w:", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add_dir(self, name: str) -> None:
        self._tar.addfile(_tar_info(name, 0, directory=True))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))

    def add_stream(self, name: str, src: BinaryIO, size: int) -> None:
        self._tar.addfile(_tar_info(name, size), src)

    def add_file(self, name: str, path: str | os.PathLike[str], size: int, digest: str | None = None) -> None:
        with open(path, "rb") as src:
            if os.fstat(src.fileno()).st_size != size:
                raise ImageError(f"layer {path}: size changed (expected {size})")
            if digest is None:
                self._tar.addfile(_tar_info(name, size), src)
            else:
                self._tar.addfile(_tar_info(name, size), _VerifyingReader(src, digest, size))

    def close(self) -> None:
        self._tar.close()


class _VerifyingReader:
    """File-like for tarfile.addfile: passes bytes through and checks the digest at the end."""

    def __init__(self, src: BinaryIO, digest: str, size: int) -> None:
        self._src = src
        self._digest = digest
        self._hasher = digest_hasher(digest)
        self._remaining = size

    def read(self, n: int = -1) -> bytes:
        chunk = self._src.read(self._remaining if n < 0 else min(n, self._remaining))
        self._hasher.update(chunk)
        self._remaining -= len(chunk)
        if self._remaining == 0:
            actual = f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"
            if actual != self._digest:
                raise ImageError(f"layer {self._digest}: digest mismatch (content is {actual})")
        return chunk


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """Write ``PATH.tmp`` then rename it to ``PATH`` (removed on failure)."""
    final = Path(path)
    if final.is_dir():
        raise RequestError(f"{path}: is a directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(final.name + ".tmp")
    try:
        with tmp.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_layout_archive(
    path: str,
    tag: str | None,
    *,
    manifest: bytes,
    manifest_digest: str,
    config: bytes,
    config_digest: str,
    layers: Sequence[LayerBlob],
) -> None:
    """A fresh oci-archive holding exactly this image (replacing ``path``), byte-for-byte reproducible."""
    index = _compact({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [manifest_descriptor(manifest, manifest_digest, tag).to_json()],
    })
    blobs: dict[str, tuple[str | os.PathLike[str] | None, bytes | None, int]] = {}
    for layer in layers:
        blobs[layer.digest] = (layer.path, None, layer.size)
    blobs[config_digest] = (None, config, len(config))
    blobs[manifest_digest] = (None, manifest, len(manifest))
    with atomic_output(path) as handle:
        tar = DeterministicTar(handle)
        tar.add_dir("blobs/")
        tar.add_dir("blobs/sha256/")
        for digest in sorted(blobs):
            src_path, data, size = blobs[digest]
            name = blob_name(digest)
            if data is not None:
                verify_bytes(data, digest, "blob")
                tar.add_bytes(name, data)
            else:
                assert src_path is not None  # layers always have a path
                tar.add_file(name, src_path, size, digest)
        tar.add_bytes(INDEX_FILE, index)
        tar.add_bytes(LAYOUT_FILE, LAYOUT_BYTES)
        tar.close()

