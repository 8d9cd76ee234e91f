"""tarout.write_tar: deterministic bytes, and flatten(write_tar(tree)) is the same tree."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import PurePosixPath as P

import pytest
from test_flatten import E, make_tar, run, snapshot

from salmiac.image.tarout import write_tar
from salmiac.image.tree import Entry, Kind, Tree

RICH = [
    E("./", "d", mode=0o755, mtime=5),
    E("bin", "d", mode=0o755),
    E("bin/busybox", data=b"\x7fELF" + bytes(700), mode=0o755, uid=0),
    E("bin/sh", "h", link="bin/busybox"),
    E("usr/bin/env", "h", link="bin/busybox"),
    E("bin/ls", "l", link="busybox", mode=0o777),
    E("dev/null", "c", mode=0o666, dev=(1, 3)),
    E("dev/loop0", "b", mode=0o660, dev=(7, 0), gid=6),
    E("run/initctl", "p", mode=0o600),
    E("home/user", "d", mode=0o700, uid=1000, gid=1000, mtime=-1),
    E("home/user/" + "long-directory-name/" * 12 + "f", data=b"long", uid=1000, gid=1000),
    E("bin/ping", data=b"p", mode=0o4755, pax={"SCHILY.xattr.security.capability": "\x01\x02",
                                              "SCHILY.xattr.user.a": "b"}),
    E(b"caf\xe9".decode("utf-8", "surrogateescape"), data=b"latin-1 name"),
    E("big-ids", data=b"", uid=4_000_000_000, gid=3_000_000_000, mtime=2**40),
]


def tar_bytes(tree: Tree, **kw: int) -> bytes:
    out = io.BytesIO()
    n = write_tar(tree, out, **kw)
    assert n == len(out.getvalue())
    return out.getvalue()


def read_members(blob: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
        return tf.getmembers()


def test_round_trip_keeps_everything() -> None:
    tree = run(RICH)
    again = run(tar_bytes(tree))
    assert snapshot(again) == snapshot(tree)


def test_bytes_are_deterministic_and_independent_of_insertion_order() -> None:
    forward = run(RICH)
    backward = Tree()
    for path, entry in reversed(list(forward.walk())):
        backward.entries[path] = entry
    assert tar_bytes(forward) == tar_bytes(backward) == tar_bytes(run(tar_bytes(forward)))


def test_fixed_mtime_and_hardlinks_to_first_path() -> None:
    members = read_members(tar_bytes(run(RICH), mtime=1234))
    assert {m.mtime for m in members} == {1234}
    by_name = {m.name: m for m in members}
    assert by_name["bin/busybox"].isreg()
    for link in ("bin/sh", "usr/bin/env"):
        assert by_name[link].islnk() and by_name[link].linkname == "bin/busybox"
    assert [m.name for m in members][:4] == [".", "big-ids", "bin", "bin/busybox"]  # tarfile reads "./" as "."
    assert {m.uname for m in members} == {""}


def test_same_data_in_two_trees_is_not_confused() -> None:
    tree = Tree()
    payload = tree.spool.append_bytes(b"same")
    tree.entries[P("/a")] = Entry(Kind.FILE, 0o644, data=payload)
    tree.entries[P("/b")] = Entry(Kind.FILE, 0o644, data=tree.spool.append_bytes(b"same"))
    members = read_members(tar_bytes(tree))
    assert [m.type for m in members] == [tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.REGTYPE]


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_gnu_tar_reads_it(tmp_path: pytest.TempPathFactory) -> None:
    blob = tar_bytes(run([e for e in RICH if e.kind not in "cbp"]))
    listing = subprocess.run(["tar", "-tvf", "-"], input=blob, capture_output=True, check=True).stdout.decode()
    assert "bin/sh link to bin/busybox" in listing
    assert "bin/ls -> busybox" in listing
    assert ("long-directory-name/" * 12) in listing
    data = subprocess.run(["tar", "-xOf", "-", "bin/busybox"], input=blob, capture_output=True, check=True).stdout
    assert hashlib.sha256(data).digest() == hashlib.sha256(b"\x7fELF" + bytes(700)).digest()
    assert make_tar([])  # helper sanity: an empty archive is two zero blocks
