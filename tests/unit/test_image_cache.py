"""Blob cache and the safe archive reader."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import zstandard

from salmiac.errors import ImageError
from salmiac.image.archive import ArchiveFiles, clean_member_name
from salmiac.image.cache import BlobCache
from salmiac.image.models import OCI_LAYER, Descriptor


def desc_for(data: bytes) -> Descriptor:
    return Descriptor(OCI_LAYER, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def test_put_and_open(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    desc = desc_for(b"hello")
    path = cache.put(io.BytesIO(b"hello"), desc)
    assert path == tmp_path / "sha256" / desc.digest.split(":")[1]
    assert cache.has(desc.digest)
    with cache.open(desc.digest, 5) as handle:
        assert handle.read() == b"hello"
    with pytest.raises(ImageError, match="size mismatch"):
        cache.open(desc.digest, 6)
    assert [p.name for p in (tmp_path / "sha256").iterdir()] == [path.name]  # no temp files left


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"hellx", "digest mismatch"), (b"hell", "size mismatch"), (b"hello!", "size mismatch")],
)
def test_put_rejects_bad_content(tmp_path: Path, content: bytes, message: str) -> None:
    cache = BlobCache(tmp_path)
    desc = desc_for(b"hello")
    with pytest.raises(ImageError, match=f"layer {desc.digest}: {message}"):
        cache.put(io.BytesIO(content), desc, "layer")
    assert not cache.has(desc.digest)
    assert list((tmp_path / "sha256").iterdir()) == []


def test_size_cap_before_reading(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path, max_blob_size=4)

    class Exploding(io.RawIOBase):
        def read(self, n: int = -1) -> bytes:
            raise AssertionError("must not be read")

    with pytest.raises(ImageError, match="exceeds the 4-byte limit"):
        cache.put(Exploding(), desc_for(b"hello"))  # type: ignore[arg-type]
    with pytest.raises(ImageError, match="larger than"):
        cache.ingest(io.BytesIO(b"hello"))


def test_ingest_unknown_digest(tmp_path: Path) -> None:
    cache = BlobCache(tmp_path)
    digest, size = cache.ingest(io.BytesIO(b"abc"))
    assert digest == "sha256:" + hashlib.sha256(b"abc").hexdigest() and size == 3
    assert cache.path(digest).read_bytes() == b"abc"


@pytest.mark.parametrize(
    ("name", "key"), [("./a/b", "a/b"), ("/abs/x", "abs/x"), ("../../etc/passwd", "etc/passwd"), ("a//b/../c", "a/c")]
)
def test_clean_member_name(name: str, key: str) -> None:
    assert clean_member_name(name) == key


def build_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_archive_lookup_and_links(tmp_path: Path) -> None:
    path = build_tar(
        tmp_path / "a.tar",
        [reg("./manifest.json"), reg("abc/layer.tar"), link("def/layer.tar", "../abc/layer.tar"),
         link("hard.tar", "abc/layer.tar", tarfile.LNKTYPE), link("loop", "loop"), link("out", "../../../etc/passwd")],
        {"./manifest.json": b"[]", "abc/layer.tar": b"LAYER"},
    )
    files = ArchiveFiles(path)
    try:
        assert files.read("manifest.json", 10) == b"[]"
        assert files.open("def/layer.tar").read() == b"LAYER"
        assert files.open("hard.tar").read() == b"LAYER"
        assert files.size("def/layer.tar") == 5
        with pytest.raises(ImageError, match="too many links"):
            files.open("loop")
        with pytest.raises(ImageError, match="no member 'etc/passwd'"):  # resolved inside the archive only
            files.open("out")
        with pytest.raises(ImageError, match=r"manifest.json is 2 bytes \(limit 1\)"):
            files.read("manifest.json", 1)
    finally:
        files.close()


def test_archive_rejects_duplicates(tmp_path: Path) -> None:
    path = build_tar(tmp_path / "d.tar", [reg("x"), reg("./x")], {"x": b"1", "./x": b"2"})
    with pytest.raises(ImageError, match="duplicate member 'x'"):
        ArchiveFiles(path)


def test_archive_bounds_pax_records(tmp_path: Path) -> None:
    info = reg("x")
    info.pax_headers = {"comment": "y" * (2 << 20)}
    path = build_tar(tmp_path / "p.tar", [info], {"x": b"1"})
    with pytest.raises(ImageError, match="metadata record"):
        ArchiveFiles(path)


def test_archive_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\x01" * 2000)
    with pytest.raises(ImageError, match=f"archive {path}"):
        ArchiveFiles(path)


@pytest.mark.parametrize("compress", [gzip.compress, zstandard.ZstdCompressor().compress])
def test_compressed_archives(tmp_path: Path, compress: object) -> None:
    plain = build_tar(tmp_path / "c.tar", [reg("f")], {"f": b"data"})
    packed = tmp_path / "c.tar.z"
    packed.write_bytes(compress(plain.read_bytes()))  # type: ignore[operator]
    files = ArchiveFiles(packed, temp_dir=str(tmp_path))
    try:
        assert files.open("f").read() == b"data"
    finally:
        files.close()
    with pytest.raises(ImageError, match="decompresses to more than"):
        ArchiveFiles(packed, max_size=1024)
