"""Property tests: whatever the layer bytes, flatten raises ImageError or returns a well-formed tree."""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salmiac.errors import ImageError
from salmiac.image.flatten import Limits, flatten
from salmiac.image.tarout import write_tar
from salmiac.image.tree import ROOT, Kind, Tree

#: Raise for a long local run: SALMIAC_FUZZ_EXAMPLES=5000 pytest tests/unit/test_flatten_fuzz.py
EXAMPLES = int(os.environ.get("SALMIAC_FUZZ_EXAMPLES", "150"))
SMALL = Limits(max_total_bytes=1 << 20, max_file_bytes=1 << 18, max_entries=500, max_depth=16,
               max_path_bytes=256, max_ratio=50, ratio_grace_bytes=1 << 16)

_NAMES = st.sampled_from(["a", "b", "c", "..", ".", "", ".wh.a", ".wh.b", ".wh..wh..opq", ".wh.", ".wh..wh.x"])
_PATHS = st.lists(_NAMES, min_size=1, max_size=4).map("/".join) | st.sampled_from(["/", "./", "/a", "../../a/b"])
_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                          tarfile.FIFOTYPE, tarfile.CONTTYPE, b"Z"])


@st.composite
def members(draw: st.DrawFn) -> bytes:
    info = tarfile.TarInfo(draw(_PATHS))
    info.type = draw(_TYPES)
    info.linkname = draw(_PATHS)
    info.mode = draw(st.integers(0, 0o7777))
    info.uid = draw(st.integers(0, 70000))
    if info.type in (tarfile.REGTYPE, tarfile.CONTTYPE):
        data = draw(st.binary(max_size=600))
        info.size = len(data)
        return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)
    return info.tobuf(tarfile.PAX_FORMAT)


layers = st.lists(st.lists(members(), max_size=12).map(lambda ms: b"".join(ms) + b"\0" * 1024),
                  min_size=1, max_size=3)


def check_well_formed(tree: Tree) -> None:
    assert tree[ROOT].kind is Kind.DIR
    for path, entry in tree.entries.items():
        assert path.is_absolute() and ".." not in path.parts and "." not in path.parts
        assert not path.name.startswith(".wh.")
        if path != ROOT:
            assert tree[path.parent].kind is Kind.DIR, path
        assert (entry.data is not None) == (entry.kind is Kind.FILE)


def try_flatten(blobs: list[bytes]) -> Tree | None:
    try:
        tree = flatten([(io.BytesIO(b), None) for b in blobs], limits=SMALL)
    except ImageError:
        return None
    check_well_formed(tree)
    return tree


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers)
def test_random_entries_give_error_or_well_formed_tree(blobs: list[bytes]) -> None:
    tree = try_flatten(blobs)
    if tree is not None:  # and what we write reads back the same
        out = io.BytesIO()
        write_tar(tree, out)
        again = try_flatten([out.getvalue()])
        assert again is not None
        assert {p: (e.kind, e.mode, e.target) for p, e in again.entries.items()} == {
            p: (e.kind, e.mode, e.target) for p, e in tree.entries.items()}


@settings(max_examples=EXAMPLES, deadline=None)
@given(layers, st.data())
def test_mutated_streams_only_raise_image_error(blobs: list[bytes], data: st.DataObject) -> None:
    mutated = []
    for blob in blobs:
        raw = bytearray(blob)
        for _ in range(data.draw(st.integers(0, 8))):
            if raw:
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(raw)))
        wrap = data.draw(st.sampled_from(["plain", "gzip", "zstd"]))
        payload = bytes(raw[:cut] if data.draw(st.booleans()) else raw)
        if wrap == "gzip":
            payload = gzip.compress(payload)
        elif wrap == "zstd":
            payload = zstandard.ZstdCompressor().compress(payload)
        mutated.append(payload)
    try_flatten(mutated)


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from([b"", b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\x1f\x8b\x08\x00"]))
def test_random_bytes_only_raise_image_error(blob: bytes, prefix: bytes) -> None:
    try_flatten([prefix + blob])
