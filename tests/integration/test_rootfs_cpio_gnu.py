"""GNU cpio as the oracle for rootfs.cpio: byte equality with --reproducible, extraction, listing."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from salmiac.image.tree import ROOT, Entry, FileData, Kind, Tree
from salmiac.rootfs.cpio import CpioWriter, write_tree

pytestmark = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")


def _make_host_tree(root: Path) -> None:
    (root / "d" / "sub").mkdir(parents=True)
    (root / "d" / "empty").mkdir()
    (root / "d" / "f").write_bytes(b"hello\n")
    (root / "odd size").write_bytes(b"x" * 4097)
    (root / "exe").write_bytes(b"#!/bin/sh\n")
    (root / "exe").chmod(0o755)
    (root / "setuid").write_bytes(b"")
    (root / "setuid").chmod(0o4711)
    os.link(root / "d" / "f", root / "d" / "sub" / "g")
    os.link(root / "d" / "f", root / "z-last")
    (root / "l").symlink_to("d/f")
    (root / "dangling").symlink_to("/nowhere/at/all")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.utime(Path(dirpath) / name, (0, 1_700_000_000), follow_symlinks=False)
    os.utime(root, (0, 1_700_000_000))


def _tree_from_host(root: Path) -> Tree:
    """Independent of salmiac's flattener: a plain walk with hardlinks joined by st_ino."""
    tree = Tree()
    by_ino: dict[int, FileData] = {}
    st_root = root.lstat()
    tree.entries[ROOT] = Entry(Kind.DIR, stat.S_IMODE(st_root.st_mode), mtime=int(st_root.st_mtime))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            host = Path(dirpath) / name
            st = host.lstat()
            path = PurePosixPath("/") / host.relative_to(root).as_posix()
            perm, mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                tree.entries[path] = Entry(Kind.DIR, perm, mtime=mtime)
            elif stat.S_ISLNK(st.st_mode):
                tree.entries[path] = Entry(Kind.SYMLINK, perm, mtime=mtime, target=os.readlink(host))
            else:
                if st.st_ino not in by_ino:
                    by_ino[st.st_ino] = tree.spool.append_bytes(host.read_bytes())
                tree.entries[path] = Entry(Kind.FILE, perm, mtime=mtime, data=by_ino[st.st_ino])
    return tree


def _archive(tree: Tree, prefix: str = "") -> bytes:
    out = io.BytesIO()
    writer = CpioWriter(out)
    write_tree(tree, writer, prefix)
    writer.finish()
    return out.getvalue()


def test_bytes_equal_gnu_cpio_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _make_host_tree(src)
    tree = _tree_from_host(src)
    try:
        ours = _archive(tree)
        names = [str(p.relative_to(ROOT)) for p, _ in tree.walk()]  # "." first, same order as ours
    finally:
        tree.close()
    gnu = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--reproducible", "--quiet"],
        cwd=src,
        input=("\n".join(names) + "\n").encode(),
        capture_output=True,
        check=True,
    ).stdout
    # GNU pads the archive to its 512-byte block size; the kernel needs no such padding.
    assert gnu == ours + b"\0" * (-len(ours) % 512)


def test_gnu_cpio_extracts_what_we_wrote(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _make_host_tree(src)
    tree = _tree_from_host(src)
    try:
        archive = _archive(tree, prefix="rootfs")
    finally:
        tree.close()
    dst = tmp_path / "dst"
    dst.mkdir()
    subprocess.run(["cpio", "-i", "-d", "-m", "--no-absolute-filenames", "--quiet"], cwd=dst, input=archive, check=True)
    out = dst / "rootfs"
    for dirpath, dirnames, filenames in os.walk(src):
        for name in [*dirnames, *filenames]:
            a = Path(dirpath) / name
            b = out / a.relative_to(src)
            sa, sb = a.lstat(), b.lstat()
            assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), name
            assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), name
            if stat.S_ISREG(sa.st_mode):
                assert a.read_bytes() == b.read_bytes(), name
                assert int(sb.st_mtime) == 1_700_000_000
            if stat.S_ISLNK(sa.st_mode):
                assert os.readlink(a) == os.readlink(b)
    f = (out / "d" / "f").stat()
    assert f.st_nlink == 3
    assert (out / "d" / "sub" / "g").stat().st_ino == f.st_ino == (out / "z-last").stat().st_ino


def test_gnu_cpio_lists_devices_and_fifos_without_creating_them(tmp_path: Path) -> None:
    tree = Tree()
    try:
        tree.entries[PurePosixPath("/dev")] = Entry(Kind.DIR, 0o755)
        tree.entries[PurePosixPath("/dev/console")] = Entry(Kind.CHAR, 0o600, rdev=(5, 1))
        tree.entries[PurePosixPath("/dev/vda")] = Entry(Kind.BLOCK, 0o660, gid=6, rdev=(254, 0))
        tree.entries[PurePosixPath("/run")] = Entry(Kind.DIR, 0o755)
        tree.entries[PurePosixPath("/run/fifo")] = Entry(Kind.FIFO, 0o620, uid=1000)
        archive = _archive(tree)
    finally:
        tree.close()
    listing = subprocess.run(
        ["cpio", "-t", "-v", "--numeric-uid-gid", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    rows = {line.split()[-1]: line.split() for line in listing.splitlines()}
    assert rows["dev/console"][0] == "crw-------" and rows["dev/console"][4:6] == ["5,", "1"]
    assert rows["dev/vda"][0] == "brw-rw----" and rows["dev/vda"][3] == "6" and rows["dev/vda"][4:6] == ["254,", "0"]
    assert rows["run/fifo"][0] == "prw--w----" and rows["run/fifo"][2] == "1000"
    assert list(tmp_path.iterdir()) == []
