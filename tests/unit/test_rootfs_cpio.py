from __future__ import annotations

import io
from pathlib import PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salmiac.image.tree import Entry, Kind, Tree
from salmiac.rootfs.cpio import CpioError, CpioWriter, write_tree


def _hdr(
    ino: int,
    mode: int,
    nlink: int,
    size: int,
    namesize: int,
    *,
    mtime: int = 0,
    rdev: tuple[int, int] = (0, 0),
    owner: tuple[int, int] = (0, 0),
) -> bytes:
    fields = [ino, mode, owner[0], owner[1], nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


# Written out by hand from the newc layout: header (110) + name + NUL padded to 4, data padded to 4.
HAND_VECTOR = (
    b"070701" b"00000000" b"000041ED" b"00000000" b"00000000" b"00000002" b"00000000" b"00000000"
    b"00000000" b"00000000" b"00000000" b"00000000" b"00000002" b"00000000" b"d\0"  # 112: no pad
    b"070701" b"00000001" b"000081A4" b"00000000" b"00000000" b"00000001" b"00000000" b"00000002"
    b"00000000" b"00000000" b"00000000" b"00000000" b"00000004" b"00000000" b"d/f\0" b"\0\0"  # 114 → 116
    b"hi\0\0"
    b"070701" b"00000002" b"0000A1FF" b"00000000" b"00000000" b"00000001" b"00000000" b"00000003"
    b"00000000" b"00000000" b"00000000" b"00000000" b"00000002" b"00000000" b"l\0"
    b"d/f\0"
    b"070701" b"00000000" b"00000000" b"00000000" b"00000000" b"00000001" b"00000000" b"00000000"
    b"00000000" b"00000000" b"00000000" b"00000000" b"0000000B" b"00000000" b"TRAILER!!!\0" b"\0\0\0"
)  # fmt: skip


def test_hand_made_vector() -> None:
    out = io.BytesIO()
    w = CpioWriter(out)
    w.add_dir("d")
    w.add_file("d/f", b"hi")
    w.add_symlink("l", "d/f")
    w.finish()
    assert out.getvalue() == HAND_VECTOR
    assert w.bytes_written == len(HAND_VECTOR)


def test_devices_fifo_hardlinks_and_mtime() -> None:
    out = io.BytesIO()
    w = CpioWriter(out, mtime=7)
    w.add_device("null", Kind.CHAR, 1, 3, mode=0o666)
    w.add_device("sda", Kind.BLOCK, 8, 0, mtime=9)
    w.add_fifo("p", mode=0o600)
    w.add_file("b", b"xyz", hardlinks=["a"], uid=1000, gid=100)
    w.finish()
    expected = (
        _hdr(0, 0o20666, 1, 0, 5, mtime=7, rdev=(1, 3)) + b"null\0" + b"\0"  # 115 → 116
        + _hdr(1, 0o60600, 1, 0, 4, mtime=9, rdev=(8, 0)) + b"sda\0" + b"\0\0"  # 114 → 116
        + _hdr(2, 0o10600, 1, 0, 2, mtime=7) + b"p\0"
        # hardlinks: same inode, nlink 2; the earlier name has no data, the last one has it
        + _hdr(3, 0o100644, 2, 0, 2, mtime=7, owner=(1000, 100)) + b"a\0"
        + _hdr(3, 0o100644, 2, 3, 2, mtime=7, owner=(1000, 100)) + b"b\0" + b"xyz\0"
        + _hdr(0, 0, 1, 0, 11) + b"TRAILER!!!\0" + b"\0\0\0"
    )  # fmt: skip
    assert out.getvalue() == expected


@pytest.mark.parametrize("name", ["/abs", "", "a/../b", "./a", "a//b", "a/", "x\0y", ".."])
def test_bad_names_are_refused(name: str) -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(CpioError):
        w.add_file(name, b"")


def test_mode_with_type_bits_and_finished_archive_are_refused() -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(CpioError, match="outside"):
        w.add_file("f", b"", mode=0o100644)
    with pytest.raises(CpioError, match="not reserved"):
        w.add_file("f", b"", ino=5)
    with pytest.raises(CpioError, match="does not fit"):
        w.add_file("f", b"", uid=1 << 32)
    w.finish()
    with pytest.raises(CpioError, match="finished"):
        w.add_dir("d")


def _parse(archive: bytes) -> list[tuple[str, int, int, int, bytes]]:
    """A minimal independent newc reader: (name, ino, mode, nlink, data)."""
    pos, out = 0, list[tuple[str, int, int, int, bytes]]()
    while True:
        assert pos % 4 == 0
        hdr = archive[pos : pos + 110]
        assert hdr[:6] == b"070701"
        f = [int(hdr[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        namesize, size = f[11], f[6]
        name = archive[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = archive[pos : pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            assert pos == len(archive)
            return out
        out.append((name, f[0], f[1], f[4], data))


def test_write_tree_prefix_parents_first_and_hardlinks() -> None:
    tree = Tree()
    try:
        data = tree.spool.append_bytes(b"shared")
        tree.entries[PurePosixPath("/z")] = Entry(Kind.DIR, 0o700)
        tree.entries[PurePosixPath("/z/x")] = Entry(Kind.FILE, 0o644, data=data)
        tree.entries[PurePosixPath("/a")] = Entry(Kind.FILE, 0o755, data=data)
        tree.entries[PurePosixPath("/a-b")] = Entry(Kind.SYMLINK, 0o777, target="/z/x")
        tree.entries[PurePosixPath("/dev")] = Entry(Kind.DIR, 0o755)
        tree.entries[PurePosixPath("/dev/console")] = Entry(Kind.CHAR, 0o600, rdev=(5, 1))
        tree.entries[PurePosixPath("/e")] = Entry(Kind.FILE, 0o600, mtime=123)
        out = io.BytesIO()
        w = CpioWriter(out)
        write_tree(tree, w, "rootfs")
        w.finish()
    finally:
        tree.close()
    entries = _parse(out.getvalue())
    names = [e[0] for e in entries]
    assert names == ["rootfs", "rootfs/a-b", "rootfs/dev", "rootfs/dev/console", "rootfs/e", "rootfs/z",
                     "rootfs/a", "rootfs/z/x"]  # fmt: skip
    by_name = {e[0]: e for e in entries}
    assert by_name["rootfs/a"][1] == by_name["rootfs/z/x"][1]
    assert by_name["rootfs/a"][3] == 2 and by_name["rootfs/a"][4] == b""
    assert by_name["rootfs/z/x"][4] == b"shared"
    assert by_name["rootfs"][3] == 4  # 2 + two subdirectories
    assert by_name["rootfs/a-b"][4] == b"/z/x"
    e_at = out.getvalue().index(b"rootfs/e\0") - 110
    assert out.getvalue()[e_at + 46 : e_at + 54] == b"0000007B"  # the entry's own mtime, 123


@given(
    st.lists(
        st.tuples(st.text("abc-_.", min_size=1, max_size=8).filter(lambda s: s not in (".", "..")),
                  st.binary(max_size=9)),
        max_size=12,
        unique_by=lambda t: t[0],
    )
)  # fmt: skip
def test_any_files_round_trip_through_an_independent_reader(files: list[tuple[str, bytes]]) -> None:
    out = io.BytesIO()
    w = CpioWriter(out)
    for name, payload in files:
        w.add_file(name, payload)
    w.finish()
    parsed = _parse(out.getvalue())
    assert [(e[0], e[4]) for e in parsed] == files
    assert [e[1] for e in parsed] == list(range(len(files)))
