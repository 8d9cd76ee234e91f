"""Layer semantics of image.flatten, table-driven with tiny tars built here (umoci's TestUnpackEntry* style)."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath as P
from typing import Any

import pytest
import zstandard

from salmiac.errors import ImageError
from salmiac.image.flatten import Compression, Flattener, Limits, clean_name, flatten, tree_stats
from salmiac.image.tree import Kind, Tree

# --- building tars --------------------------------------------------------------------------------------


@dataclass
class E:
    """One tar member. ``kind``: f(ile) d(ir) l(symlink) h(ardlink) c(har) b(lock) p(fifo) or a raw type."""

    name: str
    kind: str = "f"
    data: bytes = b""
    link: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1_700_000_000
    dev: tuple[int, int] = (0, 0)
    pax: dict[str, str] = field(default_factory=dict)


_TYPES = {
    "f": tarfile.REGTYPE,
    "d": tarfile.DIRTYPE,
    "l": tarfile.SYMTYPE,
    "h": tarfile.LNKTYPE,
    "c": tarfile.CHRTYPE,
    "b": tarfile.BLKTYPE,
    "p": tarfile.FIFOTYPE,
}


def make_tar(entries: Sequence[E], *, end: bool = True) -> bytes:
    out = io.BytesIO()
    for e in entries:
        info = tarfile.TarInfo(e.name)
        info.type = _TYPES.get(e.kind, e.kind.encode())
        info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, e.mtime
        info.linkname = e.link
        info.devmajor, info.devminor = e.dev
        info.pax_headers = dict(e.pax)
        if info.type in (tarfile.REGTYPE, tarfile.CONTTYPE):
            info.size = len(e.data)
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if info.size:
            out.write(e.data + b"\0" * (-len(e.data) % 512))
    if end:
        out.write(b"\0" * 1024)
    return out.getvalue()


def diff_id(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


DEFAULT = Limits()


def run(*layers: Sequence[E] | bytes, limits: Limits = DEFAULT) -> Tree:
    blobs = [x if isinstance(x, bytes) else make_tar(x) for x in layers]
    return flatten([(io.BytesIO(b), None) for b in blobs], limits=limits)


def snapshot(tree: Tree) -> dict[str, tuple[Any, ...]]:
    """Everything observable per path; hardlinked files share a link-group number."""
    groups: dict[int, int] = {}
    snap = {}
    for path, e in tree.walk():
        data = e.data.read() if e.data is not None else None
        group = groups.setdefault(id(e.data), len(groups)) if e.data is not None else None
        snap[str(path)] = (e.kind, e.mode, e.uid, e.gid, e.mtime, e.target, e.rdev, e.xattrs, data, group)
    return snap


def paths(tree: Tree) -> set[str]:
    return {str(p) for p in tree.entries}


def content(tree: Tree, path: str) -> bytes:
    data = tree[P(path)].data
    assert data is not None
    return data.read()


# --- names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unsafe", "clean"),
    [
        ("../x", "/x"),
        ("/abs", "/abs"),
        ("a/../../b", "/b"),
        ("./a/./b/", "/a/b"),
        ("a//b", "/a/b"),
        ("", "/"),
        (".", "/"),
        ("..", "/"),
        ("../../../etc/passwd", "/etc/passwd"),
        ("a/b/../../../..", "/"),
        ("/./..//x/.", "/x"),
    ],
)
def test_clean_name_is_anchored_at_root(unsafe: str, clean: str) -> None:
    assert clean_name(unsafe) == P(clean)


@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("../x", "/x"),
        ("/abs/y", "/abs/y"),
        ("../../../../etc/shadow", "/etc/shadow"),
        ("a/../../b", "/b"),
        ("./c", "/c"),
    ],
)
def test_traversal_names_stay_inside(name: str, where: str) -> None:
    tree = run([E(name, data=b"payload")])
    assert content(tree, where) == b"payload"
    assert all(str(p).startswith("/") and ".." not in p.parts for p in tree.entries)


def test_missing_parents_are_created_as_root_owned_0755() -> None:
    tree = run([E("a/b/c", data=b"x", uid=5, gid=6)])
    for d in ("/a", "/a/b"):
        assert (tree[P(d)].kind, tree[P(d)].mode, tree[P(d)].uid, tree[P(d)].gid) == (Kind.DIR, 0o755, 0, 0)
    assert (tree[P("/a/b/c")].uid, tree[P("/a/b/c")].gid) == (5, 6)


def test_metadata_is_kept() -> None:
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    tree = run(
        [
            E("bin/ping", data=b"ELF", mode=0o4755, uid=1, gid=2, mtime=123,
              pax={"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
                   "SCHILY.xattr.user.note": "h\u00e9"}),
            E("dev/null", kind="c", mode=0o666, dev=(1, 3)),
            E("dev/sda", kind="b", mode=0o660, dev=(8, 0), gid=6),
            E("run/fifo", kind="p", mode=0o600),
            E("tmp", kind="d", mode=0o1777),
            E("lnk", kind="l", link="../../target/never/followed", mode=0o777),
        ]
    )
    ping = tree[P("/bin/ping")]
    assert (ping.mode, ping.uid, ping.gid, ping.mtime) == (0o4755, 1, 2, 123)
    assert ping.xattrs == {"security.capability": cap, "user.note": "h\u00e9".encode()}
    assert (tree[P("/dev/null")].kind, tree[P("/dev/null")].rdev) == (Kind.CHAR, (1, 3))
    assert (tree[P("/dev/sda")].kind, tree[P("/dev/sda")].rdev, tree[P("/dev/sda")].gid) == (Kind.BLOCK, (8, 0), 6)
    assert tree[P("/run/fifo")].kind is Kind.FIFO
    assert tree[P("/tmp")].mode == 0o1777
    assert tree[P("/lnk")].target == "../../target/never/followed"


def test_non_utf8_names_survive() -> None:
    name = b"caf\xe9".decode("utf-8", "surrogateescape")
    tree = run([E(name, data=b"latin1")])
    assert [p for p in tree.entries if p.name == name]


# --- whiteouts ------------------------------------------------------------------------------------------

BASE = [E("etc", "d", mode=0o755), E("etc/passwd", data=b"root"), E("etc/group", data=b"g"),
        E("d", "d", mode=0o750, uid=7), E("d/a", data=b"a"), E("d/sub", "d"), E("d/sub/deep", data=b"deep")]


@pytest.mark.parametrize(
    ("upper", "present", "absent"),
    [
        # whiteout, then re-added by a later layer
        ([E("etc/.wh.passwd")], {"/etc/group"}, {"/etc/passwd"}),
        # whiteout of a directory removes its subtree
        ([E("d/.wh.sub")], {"/d/a"}, {"/d/sub", "/d/sub/deep"}),
        # whiteout of a missing path, also below a missing or non-directory parent: nothing happens
        ([E(".wh.nothing"), E("nowhere/.wh.x"), E("etc/passwd/.wh.x")], {"/etc/passwd", "/d/a"}, {"/nowhere"}),
        # same layer: whiteout then re-add, and re-add then whiteout: the layer's own file stays
        ([E("etc/.wh.passwd"), E("etc/passwd", data=b"new")], {"/etc/passwd"}, set()),
        ([E("etc/passwd", data=b"new"), E("etc/.wh.passwd")], {"/etc/passwd"}, set()),
        # whiteout of a dir the layer also writes into: lower children go, the layer's child stays
        ([E("d/sub/mine", data=b"m"), E("d/.wh.sub")], {"/d/sub", "/d/sub/mine"}, {"/d/sub/deep"}),
        # AUFS bookkeeping names are ignored
        ([E(".wh..wh.plnk", "d"), E(".wh..wh.aufs")], {"/etc/passwd"}, {"/.wh..wh.plnk", "/.wh..wh.aufs"}),
    ],
)
def test_whiteouts(upper: list[E], present: set[str], absent: set[str]) -> None:
    tree = run(BASE, upper)
    assert present <= paths(tree)
    assert not absent & paths(tree)
    assert not [p for p in tree.entries if p.name.startswith(".wh.")]


def test_whiteout_then_readd_in_later_layer() -> None:
    tree = run(BASE, [E("etc/.wh.passwd")], [E("etc/passwd", data=b"again", mode=0o600)])
    assert content(tree, "/etc/passwd") == b"again"
    assert tree[P("/etc/passwd")].mode == 0o600


def test_same_layer_readd_keeps_new_content() -> None:
    for upper in ([E("etc/.wh.passwd"), E("etc/passwd", data=b"new")],
                  [E("etc/passwd", data=b"new"), E("etc/.wh.passwd")]):
        assert content(run(BASE, upper), "/etc/passwd") == b"new"


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_then_readd(marker_first: bool) -> None:
    marker, added = E("d/.wh..wh..opq"), E("d/c", data=b"c")
    tree = run(BASE, [marker, added] if marker_first else [added, marker])
    assert {p for p in paths(tree) if p.startswith("/d/")} == {"/d/c"}
    # the directory itself is kept, with its metadata
    assert (tree[P("/d")].mode, tree[P("/d")].uid) == (0o750, 7)


def test_opaque_keeps_what_the_layer_wrote_below_but_not_lower_siblings() -> None:
    tree = run(BASE, [E("d/sub/new", data=b"n"), E("d/.wh..wh..opq")])
    assert {p for p in paths(tree) if p.startswith("/d/")} == {"/d/sub", "/d/sub/new"}


def test_opaque_on_missing_or_file_is_a_no_op() -> None:
    tree = run(BASE, [E("nowhere/.wh..wh..opq"), E("etc/passwd/.wh..wh..opq")])
    assert "/nowhere" not in paths(tree)
    assert content(tree, "/etc/passwd") == b"root"


def test_opaque_root_clears_lower_layers() -> None:
    tree = run(BASE, [E(".wh..wh..opq"), E("only", data=b"1")])
    assert paths(tree) == {"/", "/only"}


@pytest.mark.parametrize("name", [".wh.", "d/.wh.", "d/.wh..", "d/.wh..."])
def test_whiteout_naming_nothing_is_refused(name: str) -> None:
    with pytest.raises(ImageError, match="whiteout names no file"):
        run(BASE, [E(name)])


# --- hardlinks ------------------------------------------------------------------------------------------


def test_hardlink_into_earlier_layer_shares_data() -> None:
    tree = run([E("bin/busybox", data=b"BB", mode=0o755, uid=3)], [E("usr/bin/sh", "h", link="bin/busybox")])
    sh, bb = tree[P("/usr/bin/sh")], tree[P("/bin/busybox")]
    assert sh.data is bb.data
    assert (sh.kind, sh.mode, sh.uid) == (Kind.FILE, 0o755, 3)
    assert tree_stats(tree).file_bytes == 2


def test_hardlink_target_name_is_cleaned_and_resolved() -> None:
    tree = run([E("usr/lib/x", data=b"X"), E("lib", "l", link="usr/lib")],
               [E("y", "h", link="../../lib/x")])
    assert tree[P("/y")].data is tree[P("/usr/lib/x")].data


def test_hardlink_survives_later_rewrite_of_target_with_old_content() -> None:
    tree = run([E("a", data=b"old"), E("b", "h", link="a")], [E("a", data=b"new")])
    assert (content(tree, "/a"), content(tree, "/b")) == (b"new", b"old")


@pytest.mark.parametrize("layers", [[[E("a", data=b"A"), E("a", "h", link="a")]],
                                    [[E("d/f", data=b"F")], [E("d", "h", link="d/f")]]])
def test_hardlink_to_what_replacing_the_link_removes_is_refused_like_umoci(layers: list[list[E]]) -> None:
    with pytest.raises(ImageError, match="is removed by replacing the link itself"):
        run(*layers)


def test_hardlink_to_symlink_copies_it() -> None:
    tree = run([E("s", "l", link="/etc"), E("t", "h", link="s")])
    assert (tree[P("/t")].kind, tree[P("/t")].target) == (Kind.SYMLINK, "/etc")


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([[E("h", "h", link="missing")]], "hardlink target 'missing' does not exist"),
        ([[E("d", "d"), E("h", "h", link="d")]], "is a directory"),
        ([[E("h", "h", link="/")]], "is a directory"),
        ([[E("a", data=b"x")], [E(".wh.a"), E("h", "h", link="a")]], "does not exist"),
    ],
)
def test_bad_hardlinks(layers: list[list[E]], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        run(*layers)


# --- type changes and symlinks ------------------------------------------------------------------------


def test_dir_replaced_by_file_drops_children() -> None:
    tree = run(BASE, [E("d", data=b"now a file")])
    assert tree[P("/d")].kind is Kind.FILE
    assert not [p for p in paths(tree) if p.startswith("/d/")]


def test_file_replaced_by_dir_and_dir_over_dir_keeps_children() -> None:
    tree = run(BASE, [E("etc/passwd", "d", mode=0o700), E("d", "d", mode=0o711, uid=9)])
    assert tree[P("/etc/passwd")].kind is Kind.DIR
    assert (tree[P("/d")].mode, tree[P("/d")].uid) == (0o711, 9)
    assert {"/d/a", "/d/sub/deep"} <= paths(tree)


def test_entry_replaces_symlink_at_its_own_path() -> None:
    tree = run([E("usr/lib", "d"), E("usr/lib/keep", data=b"k"), E("lib", "l", link="usr/lib")],
               [E("lib", "d", mode=0o700)])
    assert tree[P("/lib")].kind is Kind.DIR
    assert "/usr/lib/keep" in paths(tree)


@pytest.mark.parametrize("link", ["usr/lib", "/usr/lib", "../../../usr/lib", "./usr/../usr/lib/"])
def test_symlinked_parent_is_resolved_inside_the_tree(link: str) -> None:
    tree = run([E("usr/lib", "d"), E("lib", "l", link=link)], [E("lib/libc.so", data=b"c")])
    assert content(tree, "/usr/lib/libc.so") == b"c"
    assert tree[P("/lib")].kind is Kind.SYMLINK


def test_symlink_chain_and_whiteout_through_symlink() -> None:
    tree = run([E("real/f", data=b"f"), E("l1", "l", link="l2"), E("l2", "l", link="/real")],
               [E("l1/.wh.f"), E("l1/g", data=b"g")])
    assert "/real/f" not in paths(tree)
    assert content(tree, "/real/g") == b"g"


def test_symlink_pointing_above_root_stays_inside() -> None:
    tree = run([E("up", "l", link="../../../..")], [E("up/etc/x", data=b"x")])
    assert content(tree, "/etc/x") == b"x"


def test_dangling_symlink_parent_creates_target_dirs() -> None:
    tree = run([E("l", "l", link="/nonexistent/dir")], [E("l/f", data=b"f")])
    assert content(tree, "/nonexistent/dir/f") == b"f"


def test_symlink_loop_is_refused() -> None:
    with pytest.raises(ImageError, match="too many levels of symbolic links"):
        run([E("a", "l", link="b"), E("b", "l", link="a")], [E("a/x", data=b"x")])


def test_parent_that_is_a_file_is_refused() -> None:
    with pytest.raises(ImageError, match="parent '/f' is not a directory"):
        run([E("f", data=b"x")], [E("f/g", data=b"y")])


@pytest.mark.parametrize("kind", ["f", "l", "c", "p"])
def test_root_type_cannot_change(kind: str) -> None:
    with pytest.raises(ImageError, match="refusing to change the type of the root directory"):
        run([E("./", kind, link="/etc")])


def test_root_metadata_can_change() -> None:
    tree = run([E("./", "d", mode=0o700, uid=1)], [E("x", data=b"x")])
    assert (tree[P("/")].kind, tree[P("/")].mode, tree[P("/")].uid) == (Kind.DIR, 0o700, 1)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (E("x", kind="7", data=b"c"), "unsupported tar entry type"),
        (E("l", "l", link=""), "empty symlink target"),
        (E("l", "l", link="x" * 5000), "symlink target longer"),
        (E("x", uid=-1), "uid/gid out of range"),
        (E("x", pax={"mtime": "inf"}), "mtime out of range"),
        (E("x", pax={"SCHILY.xattr.user.big": "v" * 70000}), "larger than 65536"),
        (E("n" * 300), "name component longer than 255"),
        (E("n" * 300 + "/f"), "name component longer than 255"),
        (E(".wh.a/b"), "whiteout name used as a directory"),
        (E("x", pax={"path": "a\0b"}), "NUL byte in name"),
        (E("x", "h", pax={"linkpath": "a\0b"}), "NUL byte in name"),
        (E("x", pax={"SCHILY.xattr.user.a\0b": "v"}), "bad xattr name"),
    ],
)
def test_bad_entries(entry: E, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        run([entry])


# --- streams: compression, digests, archive framing ------------------------------------------------------

LAYER = make_tar([E("etc/os-release", data=b"ID=test\n" * 100), E("bin", "d"), E("bin/sh", "l", link="busybox")])


def _zstd_multi(data: bytes) -> bytes:
    half = len(data) // 2
    c = zstandard.ZstdCompressor()
    return c.compress(data[:half]) + c.compress(data[half:])


@pytest.mark.parametrize(
    ("encode", "compression"),
    [
        (lambda b: b, Compression.NONE),
        (gzip.compress, Compression.GZIP),
        (lambda b: gzip.compress(b[:1000]) + gzip.compress(b[1000:]), Compression.GZIP),
        (zstandard.ZstdCompressor().compress, Compression.ZSTD),
        (_zstd_multi, Compression.ZSTD),
        (zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compress, Compression.ZSTD),
    ],
)
def test_compression_detected_by_magic(encode: Any, compression: Compression) -> None:
    flattener = Flattener()
    info = flattener.apply_layer(io.BytesIO(encode(LAYER)), diff_id(LAYER))
    assert (info.compression, info.diff_id, info.uncompressed_bytes, info.entries) == (
        compression, diff_id(LAYER), len(LAYER), 3)
    assert snapshot(flattener.tree) == snapshot(run(LAYER))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (gzip.compress(LAYER)[:-9], "truncated gzip stream"),
        (gzip.compress(LAYER) + b"junk", "corrupt gzip stream"),
        (gzip.compress(LAYER)[:-4] + b"\0\0\0\0", "corrupt gzip stream"),  # ISIZE
        (zstandard.ZstdCompressor().compress(LAYER)[:-3], "truncated zstd stream"),
        (zstandard.ZstdCompressor().compress(LAYER) + b"junk", "corrupt zstd stream"),
        (lzma.compress(LAYER), "unsupported layer compression"),
        (b"not a tar at all" * 40, "corrupt tar stream"),
        (LAYER[:700], "corrupt tar stream"),
    ],
)
def test_corrupt_streams(blob: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        run(blob)


def test_bad_diff_id_names_the_layer() -> None:
    wrong = "sha256:" + "0" * 64
    with pytest.raises(ImageError, match=rf"^layer 2 \({wrong}\): diff_id mismatch: uncompressed layer is "
                       + diff_id(LAYER)):
        flatten([(io.BytesIO(LAYER), diff_id(LAYER)), (io.BytesIO(gzip.compress(LAYER)), wrong)])


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 32, "SHA256:" + "0" * 64, "sha256:" + "G" * 64])
def test_malformed_diff_id(bad: str) -> None:
    with pytest.raises(ImageError, match=r"^layer 1: invalid diff_id"):
        flatten([(io.BytesIO(LAYER), bad)])


def test_diff_id_covers_trailing_bytes() -> None:
    padded = LAYER + b"\0" * 10240 + b"trailing junk after the end of the archive"
    Flattener().apply_layer(io.BytesIO(padded), diff_id(padded))
    with pytest.raises(ImageError, match="diff_id mismatch"):
        Flattener().apply_layer(io.BytesIO(padded), diff_id(LAYER))


def test_sha512_diff_id() -> None:
    info = Flattener().apply_layer(io.BytesIO(LAYER), "sha512:" + hashlib.sha512(LAYER).hexdigest())
    assert info.diff_id.startswith("sha512:")


def test_empty_blob_and_end_without_zero_blocks_are_empty_or_short_archives() -> None:
    assert paths(run(b"")) == {"/"}
    assert "/a" in paths(run(make_tar([E("a", data=b"1")], end=False)))
    assert "/a" in paths(run(make_tar([E("a", data=b"1")], end=False) + b"\0" * 512))


def test_corrupt_header_after_entries_is_refused_like_go() -> None:
    good = make_tar([E("a", data=b"1")], end=False)
    garbage = bytearray(make_tar([E("b", data=b"2")], end=False))
    garbage[148:156] = b"0000000\0"  # break the checksum of the second header
    with pytest.raises(ImageError, match="invalid tar header at offset 1024"):
        run(good + bytes(garbage))
    with pytest.raises(ImageError, match="invalid tar header at offset 1536"):
        run(good + b"\0" * 512 + b"x" * 512)
    with pytest.raises(ImageError, match="truncated tar header at offset 1024"):
        run(good + b"\0" * 100)


def test_layer_errors_carry_layer_number_and_entry() -> None:
    bad = make_tar([E("h", "h", link="nope")])
    with pytest.raises(ImageError, match=rf"^layer 2 \({diff_id(bad)}\): entry 'h': hardlink target"):
        flatten([(io.BytesIO(LAYER), None), (io.BytesIO(bad), diff_id(bad))])


# --- bombs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "limits", "message"),
    [
        ([[E("a", data=b"x" * 5000)]], Limits(max_total_bytes=4096), "exceeds 4096 uncompressed bytes"),
        ([[E("a", data=b"x" * 5000)]], Limits(max_file_bytes=4999), "file of 5000 bytes exceeds 4999"),
        ([[E(f"f{i}") for i in range(10)]], Limits(max_entries=9), "more than 9 entries"),
        ([[E("a/b/c/d/e/f")]], Limits(max_entries=5), "more than 5 entries"),  # implicit parents count
        ([[E("a" * 50 + "/" + "b" * 60)]], Limits(max_path_bytes=100), "path longer than 100 bytes"),
        ([[E("/".join("d" * 20))]], Limits(max_depth=10), "deeper than 10 components"),
        ([[E("a")]] * 3, Limits(max_layers=2), r"^layer 3: more than 2 layers"),
        ([[E("l", "l", link="/".join(["x"] * 8)), E("l/f")]], Limits(max_depth=5), "deeper than 5"),
    ],
)
def test_bomb_limits(layers: list[list[E]], limits: Limits, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        run(*layers, limits=limits)


def test_compression_ratio_cap_names_the_layer() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(make_tar([E("zeros", data=b"\0" * (8 << 20))]))
    limits = Limits(max_ratio=100, ratio_grace_bytes=1 << 20)
    with pytest.raises(ImageError, match=rf"^layer 1 \({diff_id(make_tar([E('zeros', data=bytes(8 << 20))]))}\)"
                       r": .*compression ratio above 100:1"):
        flatten([(io.BytesIO(bomb), diff_id(make_tar([E("zeros", data=bytes(8 << 20))])))], limits=limits)
    gz = gzip.compress(make_tar([E("zeros", data=b"\0" * (8 << 20))]))
    with pytest.raises(ImageError, match="compression ratio above 100:1"):
        run(gz, limits=limits)
    run(gz, limits=Limits(max_ratio=2000, ratio_grace_bytes=1 << 20))


def test_huge_pax_header_is_refused_before_it_is_buffered() -> None:
    info = tarfile.TarInfo("x")
    info.pax_headers = {"comment": "c" * (8 << 20)}
    blob = info.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024
    with pytest.raises(ImageError, match=r"tar headers at offset .* exceed"):
        run(blob)


def test_whiteout_data_counts_as_data_not_header() -> None:
    tree = run(BASE, [E("etc/.wh.passwd", data=b"w" * (5 << 20))])
    assert "/etc/passwd" not in paths(tree)


def test_flatten_into_existing_tree_and_close_on_error() -> None:
    base = run(BASE)
    tree = flatten([(io.BytesIO(make_tar([E("etc/.wh.group"), E("new", data=b"n")])), None)], tree=base)
    assert tree is base
    assert {"/new", "/etc/passwd"} <= paths(tree) and "/etc/group" not in paths(tree)


def test_tree_stats() -> None:
    tree = run([E("a", data=b"12345"), E("b", "h", link="a"), E("d", "d"), E("s", "l", link="abc"),
                E("n", "c", dev=(1, 3))])
    st = tree_stats(tree)
    assert (st.entries, st.files, st.dirs, st.symlinks, st.others, st.file_bytes, st.symlink_bytes) == (
        6, 2, 2, 1, 1, 5, 3)
    assert st.estimate_fs_bytes() > st.file_bytes


class Trickle(io.RawIOBase):
    """A blob that returns at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data, self._pos, self._step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


@pytest.mark.parametrize("step", [1, 3, 511, 4097])
@pytest.mark.parametrize("encode", [lambda b: b, gzip.compress, zstandard.ZstdCompressor().compress, _zstd_multi])
def test_short_reads_from_the_blob(step: int, encode: Any) -> None:
    flattener = Flattener()
    info = flattener.apply_layer(Trickle(encode(LAYER), step), diff_id(LAYER))  # type: ignore[arg-type]
    assert info.diff_id == diff_id(LAYER)
    assert snapshot(flattener.tree) == snapshot(run(LAYER))
