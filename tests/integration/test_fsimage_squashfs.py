"""rootfs.fsimage: a Tree becomes a squashfs image that independent readers see exactly as the tree.

Oracles: ``unsquashfs -pf`` (squashfs-tools, a separate code base from the squashfs-tools-ng writer) for every
path, type, mode, owner, mtime, size, content, symlink target, device number and hardlink; ``sqfs2tar`` read by
Python's tarfile for xattrs and for names ``-pf`` cannot print unambiguously (newlines).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from salmiac.errors import ImageError, RequestError
from salmiac.image.tree import ROOT, Entry, FileData, Kind, Tree
from salmiac.rootfs.fsimage import DEVICE_BLOCK_SIZE, build_fs_image
from salmiac.rootfs.verity import format_verity

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("tar2sqfs", "unsquashfs", "sqfs2tar")),
    reason="needs squashfs-tools-ng (tar2sqfs, sqfs2tar) and squashfs-tools (unsquashfs)",
)

P = PurePosixPath
LONG = "L" * 255
DEEP = "/".join(["deep-directory-name-number-" + str(i) for i in range(40)])  # > 1 KiB path


def _rich_tree(*, odd_names: bool = False) -> Tree:
    tree = Tree()
    spool = tree.spool
    e = tree.entries
    e[ROOT] = Entry(Kind.DIR, 0o755, mtime=1_600_000_000)

    def add_dir(path: str, mode: int = 0o755, **kw: Any) -> None:
        e[P(path)] = Entry(Kind.DIR, mode, **kw)

    def add_file(path: str, payload: bytes | FileData, mode: int = 0o644, **kw: Any) -> FileData:
        data = payload if isinstance(payload, FileData) else spool.append_bytes(payload)
        e[P(path)] = Entry(Kind.FILE, mode, data=data, **kw)
        return data

    for d in ("/bin", "/dev", "/etc", "/home", "/run", "/tmp", "/usr", "/usr/bin", "/var", "/var/empty"):
        add_dir(d, mtime=1_500_000_000)
    e[P("/tmp")].mode = 0o1777
    busybox = add_file("/bin/busybox", b"\x7fELF" + os.urandom(3000) + bytes(5000), 0o755, mtime=1_234_567_890)
    add_file("/bin/sh", busybox, 0o755, mtime=1_234_567_890)  # hardlinks share FileData (and metadata)
    add_file("/usr/bin/env", busybox, 0o755, mtime=1_234_567_890)
    e[P("/bin/ls")] = Entry(Kind.SYMLINK, 0o777, target="busybox")
    e[P("/etc/abs-link")] = Entry(Kind.SYMLINK, 0o777, target="/etc/passwd")
    e[P("/etc/dangling")] = Entry(Kind.SYMLINK, 0o777, target="../../nowhere/at all")
    add_file("/etc/passwd", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    add_file("/etc/empty", b"")
    add_file("/etc/multi-block", os.urandom(3 * 128 * 1024 + 17))  # several squashfs blocks + tail
    add_file("/etc/zeros", bytes(600_000))  # sparse in squashfs
    e[P("/dev/null")] = Entry(Kind.CHAR, 0o666, rdev=(1, 3))
    e[P("/dev/sda")] = Entry(Kind.BLOCK, 0o660, gid=6, rdev=(8, 0))
    e[P("/dev/nvme0n1p300")] = Entry(Kind.BLOCK, 0o660, rdev=(259, 70000))
    e[P("/run/initctl")] = Entry(Kind.FIFO, 0o600)
    add_dir("/home/user", 0o700, uid=1000, gid=1000, mtime=1_700_000_000)
    add_file("/home/user/.profile", b"export PS1='$ '\n", 0o640, uid=1000, gid=1000)
    add_file("/usr/bin/passwd", b"setuid", 0o4755, xattrs={"security.capability": b"\x01\x00\x00\x02" + bytes(16)})
    add_file("/usr/bin/wall", b"setgid", 0o2755, gid=5)
    add_file("/usr/bin/xattrs", b"x", xattrs={"user.mime": b"text/plain", "trusted.overlay.opaque": b"y",
                                              "user.binary": bytes(range(256))})
    add_dir("/var/xattr-dir", xattrs={"user.dir": b"1"})
    add_file("/" + LONG, b"long name")
    deep = ""
    for part in DEEP.split("/"):
        deep += "/" + part
        add_dir(deep)
    add_file(deep + "/f", b"deep")
    for name in ("with space", "back\\slash", 'quo"te', "caf\udce9", "uni\u00e9\u2603", "#hash", "-dash"):
        add_file("/var/" + name, name.encode("utf-8", "surrogateescape"), uid=1000, gid=1000)
    add_file("/var/big-ids", b"", uid=4_000_000_000, gid=3_000_000_000)
    if odd_names:
        add_file("/var/new\nline", b"nl")
        e[P("/var/odd-target")] = Entry(Kind.SYMLINK, 0o777, target="a b/\n c")
    return tree


# --- unsquashfs -pf parsing ----------------------------------------------------------------------------------

def _unescape_token(line: bytes) -> tuple[bytes, bytes]:
    """A pseudo-file name: backslash escapes, ends at the first unescaped space."""
    out = bytearray()
    i = 0
    while i < len(line) and line[i] != ord(" "):
        if line[i] == ord("\\"):
            i += 1
        out.append(line[i])
        i += 1
    return bytes(out), line[i + 1:]


def _pseudo(image: Path) -> tuple[dict[PurePosixPath, list[bytes]], bytes]:
    out = image.with_suffix(".pf")
    subprocess.run(["unsquashfs", "-no-progress", "-pf", str(out), str(image)], check=True,
                   stdout=subprocess.DEVNULL)
    raw = out.read_bytes()
    head, _, data = raw.partition(b"#\n# START OF DATA - DO NOT MODIFY\n#\n")
    records: dict[PurePosixPath, list[bytes]] = {}
    for line in head.splitlines():
        name, rest = _unescape_token(line)
        path = ROOT if name == b"/" else P("/" + os.fsdecode(name))
        fields = rest.split(b" ", 5 if rest[:1] == b"S" else -1)
        records[path] = fields
    return records, data


def _assert_matches_tree(tree: Tree, image: Path, *, mtime: int | None = None) -> None:
    records, data = _pseudo(image)
    assert set(records) == set(tree.entries)
    regular: dict[int, PurePosixPath] = {}  # id(FileData) -> the path stored as 'R'
    for path, entry in tree.walk():
        fields = records[path]
        kind = fields[0]
        if kind == b"L":  # hardlink to an earlier path of the same inode
            target = P("/" + os.fsdecode(_unescape_token(fields[1] + b" ")[0]))
            assert entry.kind is Kind.FILE and entry.data is not None
            assert regular[id(entry.data)] == target, path
            continue
        expected_mtime = min(max(entry.mtime if mtime is None else mtime, 0), 2**32 - 1)
        # unsquashfs prints ids as signed 32-bit numbers
        t, m, mode = kind.decode(), int(fields[1]), int(fields[2], 8)
        uid, gid = int(fields[3]) % 2**32, int(fields[4]) % 2**32
        assert (m, mode, uid, gid) == (expected_mtime, entry.mode, entry.uid, entry.gid), path
        if entry.kind is Kind.DIR:
            assert t == "D"
        elif entry.kind is Kind.FILE:
            assert t == "R" and entry.data is not None
            assert id(entry.data) not in regular, f"{path}: second copy instead of a hardlink"
            regular[id(entry.data)] = path
            size, offset = int(fields[5]), int(fields[6])
            assert size == entry.data.size
            assert data[offset:offset + size] == entry.data.read(), path
        elif entry.kind is Kind.SYMLINK:
            assert t == "S" and fields[5] == os.fsencode(entry.target or ""), path
        elif entry.kind in (Kind.CHAR, Kind.BLOCK):
            assert t == ("C" if entry.kind is Kind.CHAR else "B")
            # unsquashfs 4.5 prints the stored 32-bit value as (raw >> 8, raw & 0xff); the kernel decodes it
            # with new_decode_dev(), which is what the tree's numbers must survive.
            raw = int(fields[5]) << 8 | int(fields[6])
            assert ((raw & 0xFFF00) >> 8, (raw & 0xFF) | ((raw >> 12) & 0xFFF00)) == entry.rdev, path
        else:
            assert entry.kind is Kind.FIFO and t == "I" and fields[5] == b"f"


def _sqfs2tar(image: Path) -> dict[str, tarfile.TarInfo]:
    blob = subprocess.run(["sqfs2tar", str(image)], check=True, stdout=subprocess.PIPE).stdout
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:", encoding="utf-8", errors="surrogateescape") as tf:
        return {m.name: m for m in tf.getmembers()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- tests ---------------------------------------------------------------------------------------------------

def test_every_entry_matches_the_tree(tmp_path: Path) -> None:
    tree = _rich_tree()
    image = build_fs_image(tree, tmp_path / "out" / "rootfs.sqfs")
    assert [p.name for p in image.path.parent.iterdir()] == ["rootfs.sqfs"]  # no temp file left behind
    assert image.fs == "squashfs" and image.block_size == DEVICE_BLOCK_SIZE
    assert image.size == image.path.stat().st_size and image.size % DEVICE_BLOCK_SIZE == 0
    assert image.path.read_bytes()[:4] == b"hsqs"
    _assert_matches_tree(tree, image.path)


def test_xattrs_and_names_pf_cannot_show(tmp_path: Path) -> None:
    tree = _rich_tree(odd_names=True)
    members = _sqfs2tar(build_fs_image(tree, tmp_path / "rootfs.sqfs").path)
    expected_names = {str(p)[1:] for p in tree.entries if p != ROOT}
    assert expected_names <= set(members)
    for path, entry in tree.walk():
        if path == ROOT:
            continue
        info = members[str(path)[1:]]
        got = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
               for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        assert got == entry.xattrs, path
        if entry.kind is Kind.SYMLINK:
            assert info.linkname == entry.target
        if entry.kind in (Kind.CHAR, Kind.BLOCK):
            assert (info.devmajor, info.devminor) == entry.rdev
    assert members["var/new\nline"].size == 2


def test_same_tree_same_bytes_whatever_the_threads_order_and_environment(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    tree = _rich_tree()
    one = build_fs_image(tree, tmp_path / "a.sqfs", jobs=1)
    backward = Tree(tree.spool)
    backward.entries = dict(reversed(list(tree.entries.items())))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567")
    two = build_fs_image(backward, tmp_path / "b.sqfs", jobs=2)
    assert _sha256(one.path) == _sha256(two.path)
    # A different tree gives a different image (the hash above is not constant).
    tree.entries[P("/etc/passwd")].mode = 0o600
    assert _sha256(build_fs_image(tree, tmp_path / "c.sqfs").path) != _sha256(one.path)


def test_fixed_mtime_replaces_every_timestamp(tmp_path: Path) -> None:
    tree = _rich_tree()
    image = build_fs_image(tree, tmp_path / "rootfs.sqfs", mtime=1_111_111_111)
    _assert_matches_tree(tree, image.path, mtime=1_111_111_111)
    out = subprocess.run(["unsquashfs", "-mkfs-time", str(image.path)], check=True, stdout=subprocess.PIPE)
    assert out.stdout.split()[-1] == b"1111111111"


def test_replaces_destination_atomically(tmp_path: Path) -> None:
    dst = tmp_path / "rootfs.sqfs"
    dst.write_bytes(b"old")
    inode = dst.stat().st_ino
    tree = _rich_tree()
    build_fs_image(tree, dst)
    assert dst.stat().st_ino != inode  # renamed over, not rewritten in place
    _assert_matches_tree(tree, dst)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda t: t.entries[P("/etc/passwd")].xattrs.update({"system.posix_acl_access": b"\x02"}),
     "system.posix_acl_access"),
    (lambda t: t.entries.update({P("/" + "n" * 257): Entry(Kind.FIFO, 0o600)}), "longer than 256"),
    (lambda t: setattr(t.entries[P("/dev/sda")], "rdev", (4096, 0)), "4096:0"),
])
def test_what_squashfs_cannot_store_is_refused(tmp_path: Path, mutate: Any, message: str) -> None:
    tree = _rich_tree()
    mutate(tree)
    with pytest.raises(ImageError, match=message):
        build_fs_image(tree, tmp_path / "rootfs.sqfs")
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_request_errors(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="filesystem 'ext4'"):
        build_fs_image(Tree(), tmp_path / "x", fs="ext4")
    with pytest.raises(RequestError, match="compression 'lzma'"):
        build_fs_image(Tree(), tmp_path / "x", compression="lzma")


def test_image_with_appended_verity_tree_still_reads(tmp_path: Path) -> None:
    tree = _rich_tree()
    image = build_fs_image(tree, tmp_path / "rootfs.img")
    info = format_verity(image.path)
    assert info.hash_offset == image.size and info.data_blocks * DEVICE_BLOCK_SIZE == image.size
    assert image.path.stat().st_size == image.size + info.hash_size
    _assert_matches_tree(tree, image.path)  # squashfs ignores what follows bytes_used
    if shutil.which("veritysetup"):
        subprocess.run(["veritysetup", "verify", "--no-superblock", f"--salt={info.salt}",
                        f"--data-blocks={info.data_blocks}", f"--hash-offset={info.hash_offset}",
                        str(image.path), str(image.path), info.root_hash], check=True)
