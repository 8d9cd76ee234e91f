"""flatten() against `umoci unpack` as an oracle, on real multi-layer images built from Debian packages.

Same set of paths, kinds, modes, uid/gid, symlink targets, device numbers, file contents, hardlink groups
and user xattrs. Needs root (umoci unpack keeps ownership and makes device nodes), umoci and skopeo.
The fixture images themselves are checked by running them under chroot (busybox, python, check script).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from fixtures.images import (
    MULTILAYER_ABSENT,
    MULTILAYER_EXPECTED,
    MULTILAYER_XATTRS,
    PYTHON_ENV,
    OciImage,
    docker_archive,
    image_size,
)
from salmiac.errors import ImageError
from salmiac.image.flatten import Compression, Flattener
from salmiac.image.tarout import write_tar
from salmiac.image.tree import Kind, Tree

pytestmark = [
    pytest.mark.skipif(shutil.which("umoci") is None or shutil.which("skopeo") is None, reason="needs umoci+skopeo"),
    pytest.mark.skipif(os.geteuid() != 0, reason="umoci unpack keeps ownership and makes devices only as root"),
]

IMAGES = ["busybox_image", "python_image", "multilayer_image"]
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
_KINDS = {stat.S_IFREG: Kind.FILE, stat.S_IFDIR: Kind.DIR, stat.S_IFLNK: Kind.SYMLINK, stat.S_IFCHR: Kind.CHAR,
          stat.S_IFBLK: Kind.BLOCK, stat.S_IFIFO: Kind.FIFO}


@contextmanager
def flattened(image: OciImage) -> Iterator[tuple[Tree, Flattener]]:
    flattener = Flattener()
    with ExitStack() as stack:
        for blob, diff_id in image.layers():
            flattener.apply_layer(stack.enter_context(blob.open("rb")), diff_id)
    try:
        yield flattener.tree, flattener
    finally:
        flattener.tree.close()


def unpack(image: OciImage, dest: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{image.layout}:{image.tag}", str(dest)], check=True,
                   capture_output=True)
    return dest / "rootfs"


def user_xattrs(host: Path) -> dict[str, bytes]:
    names = sorted(x for x in os.listxattr(host, follow_symlinks=False) if x.startswith("user."))
    return {x: os.getxattr(host, x, follow_symlinks=False) for x in names}


def host_snapshot(rootfs: Path) -> dict[str, tuple[Any, ...]]:
    snap: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in [".", *dirnames, *filenames] if dirpath == str(rootfs) else [*dirnames, *filenames]:
            host = Path(dirpath) / name if name != "." else rootfs
            st = host.lstat()
            rel = "/" + str(host.relative_to(rootfs)) if host != rootfs else "/"
            kind = _KINDS[stat.S_IFMT(st.st_mode)]
            link = None
            if kind is Kind.FILE:
                link = inodes.setdefault(st.st_ino, [])
                link.append(rel)
            snap[rel] = (
                kind,
                None if kind is Kind.SYMLINK else stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                os.readlink(host) if kind is Kind.SYMLINK else None,
                (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in (Kind.CHAR, Kind.BLOCK) else None,
                hashlib.sha256(host.read_bytes()).hexdigest() if kind is Kind.FILE else None,
                link,
                user_xattrs(host) if kind is not Kind.SYMLINK else {},
            )
    return _name_link_groups(snap)


def _name_link_groups(snap: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """Replace each file's link-group list by its smallest path, whatever order it was walked in."""
    return {p: (*v[:7], min(v[7]) if v[7] is not None else None, v[8]) for p, v in snap.items()}


def tree_snapshot(tree: Tree) -> dict[str, tuple[Any, ...]]:
    groups: dict[int, list[str]] = {}
    snap: dict[str, tuple[Any, ...]] = {}
    for path, e in tree.walk():
        link = groups.setdefault(id(e.data), []) if e.data is not None else None
        if link is not None:
            link.append(str(path))
        snap[str(path)] = (
            e.kind,
            None if e.kind is Kind.SYMLINK else e.mode,
            e.uid,
            e.gid,
            e.target,
            e.rdev if e.kind in (Kind.CHAR, Kind.BLOCK) else None,
            hashlib.sha256(e.data.read()).hexdigest() if e.data is not None else None,
            link,
            {k: v for k, v in e.xattrs.items() if k.startswith("user.")} if e.kind is not Kind.SYMLINK else {},
        )
    return _name_link_groups(snap)


@pytest.mark.parametrize("fixture", IMAGES)
def test_flatten_equals_umoci_unpack(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    image: OciImage = request.getfixturevalue(fixture)
    rootfs = unpack(image, tmp_path / "bundle")
    with flattened(image) as (tree, flattener):
        ours, theirs = tree_snapshot(tree), host_snapshot(rootfs)
        assert all(layer.compression is Compression.GZIP for layer in flattener.layers)
    assert set(ours) == set(theirs)
    assert {p: v for p, v in ours.items() if p != "/"} == {p: v for p, v in theirs.items() if p != "/"}
    assert ours["/"][0] is theirs["/"][0] is Kind.DIR


@pytest.mark.parametrize("fixture", IMAGES)
def test_tarout_layer_unpacks_identically_with_umoci(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Our single-layer export, added with umoci to a fresh image, unpacks to the same rootfs."""
    image: OciImage = request.getfixturevalue(fixture)
    layer = tmp_path / "flat.tar"
    with flattened(image) as (tree, _), layer.open("wb") as out:
        write_tar(tree, out, mtime=0)
        expected = tree_snapshot(tree)
    layout = tmp_path / "oci"
    for cmd in (["init", "--layout", layout], ["new", "--image", f"{layout}:flat"],
                ["raw", "add-layer", "--image", f"{layout}:flat", layer]):
        subprocess.run(["umoci", *map(str, cmd)], check=True, capture_output=True)
    got = host_snapshot(unpack(OciImage(layout, "flat"), tmp_path / "bundle"))
    assert {p: v for p, v in got.items() if p != "/"} == {p: v for p, v in expected.items() if p != "/"}


def test_multilayer_semantics(multilayer_image: OciImage) -> None:
    with flattened(multilayer_image) as (tree, flattener):
        assert len(flattener.layers) == 4
        for path, (kind, value) in MULTILAYER_EXPECTED.items():
            entry = tree[PurePosixPath(path)]
            if kind.startswith("hardlink:"):
                assert entry.data is tree[PurePosixPath(kind.split(":", 1)[1])].data, path
            elif kind == "file" and value is not None:
                assert entry.data is not None and entry.data.read() == value.encode(), path
            elif kind == "symlink":
                assert entry.target == value
            elif kind.startswith("char:"):
                assert entry.kind is Kind.CHAR and entry.rdev == (1, 3)
            else:
                assert entry.kind.value == kind, path
        for path in MULTILAYER_ABSENT:
            assert PurePosixPath(path) not in tree, path
        for path, xattrs in MULTILAYER_XATTRS.items():
            assert tree[PurePosixPath(path)].xattrs == xattrs


def chroot_run(rootfs: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROOT, str(rootfs), *argv], capture_output=True, text=True, timeout=60,
                          env=env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, check=False)


def test_fixture_images_run(busybox_image: OciImage, python_image: OciImage, multilayer_image: OciImage,
                            tmp_path: Path) -> None:
    bb = chroot_run(unpack(busybox_image, tmp_path / "bb"), "/bin/sh", "-c", "echo hello from busybox; exit 3")
    assert (bb.returncode, bb.stdout) == (3, "hello from busybox\n")
    assert busybox_image.config()["config"] == {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/sh", "-c", "echo hello from busybox; exit 3"],
    }
    ml = chroot_run(unpack(multilayer_image, tmp_path / "ml"), "/bin/sh", "/check.sh")
    assert (ml.returncode, ml.stdout) == (0, "multilayer ok\n"), ml.stdout
    py_root = unpack(python_image, tmp_path / "py")
    py = chroot_run(py_root, "/usr/bin/python3", "/app/show.py", "x y", "exit=7", env={**PYTHON_ENV, "SHOW_EXIT": "5"})
    assert py.returncode == 7, py.stderr
    shown = json.loads(py.stdout)
    assert shown["argv"] == ["/app/show.py", "x y", "exit=7"]
    assert shown["env"]["APP_GREETING"] == "hello world"
    assert chroot_run(py_root, "/usr/bin/python3", "/app/show.py", env={"SHOW_EXIT": "5"}).returncode == 5
    config = python_image.config()["config"]
    assert isinstance(config, dict)
    assert (config["Entrypoint"], config["Cmd"], config["WorkingDir"], config["User"]) == (
        ["python3", "/app/show.py"], ["default-arg"], "/app", "1000:1000")
    assert "APP_MODE=test" in config["Env"]


def test_docker_archive_export(busybox_image: OciImage, tmp_path: Path) -> None:
    archive = docker_archive(busybox_image, "salmiac-test/busybox:export", tmp_path / "bb.tar")
    inspect = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"docker-archive:{archive}"],
                                        capture_output=True, text=True, check=True).stdout)
    assert inspect["config"]["Cmd"] == ["/bin/sh", "-c", "echo hello from busybox; exit 3"]
    assert image_size(busybox_image).layers == 1


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("fmt", [["--format=gnu"], ["--format=pax"], ["--format=pax", "--sparse-version=0.0"]])
def test_gnu_tar_sparse_files_expand(fmt: list[str], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    sparse = src / "sparse"
    with sparse.open("wb") as f:
        f.truncate(8 << 20)
        f.seek(3 << 20)
        f.write(b"middle")
        f.seek((8 << 20) - 4)
        f.write(b"tail")
    layer = tmp_path / "layer.tar"
    subprocess.run(["tar", "--sparse", *fmt, "-C", str(src), "-cf", str(layer), "sparse"], check=True)
    assert layer.stat().st_size < 1 << 20  # really stored sparse
    flattener = Flattener()
    with layer.open("rb") as blob:
        flattener.apply_layer(blob, "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest())
    data = flattener.tree[PurePosixPath("/sparse")].data
    assert data is not None and data.read() == sparse.read_bytes()
    flattener.tree.close()


# --- differential: seeded random layers, umoci unpack vs flatten -------------------------------------------

_NAMES = ["a", "b", "c"]
_LINK_TARGETS = ["a", "/b", "../c", "a/b", "/a/../c", "b/c"]


def _random_layer(rng: random.Random, kinds: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for _ in range(rng.randint(1, 8)):
            parts = [rng.choice(_NAMES) for _ in range(rng.randint(1, 2))]
            kind = rng.choice(kinds)
            if kind == "w":
                parts[-1] = ".wh." + parts[-1]
            if kind == "o":
                parts.append(".wh..wh..opq")
            info = tarfile.TarInfo("/".join(parts))
            info.mtime, info.mode = 1, rng.choice([0o755, 0o644, 0o700])
            if kind == "d":
                info.type = tarfile.DIRTYPE
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, rng.choice(_LINK_TARGETS)
            elif kind == "h":
                info.type = tarfile.LNKTYPE
                info.linkname = "/".join(rng.choice(_NAMES) for _ in range(rng.randint(1, 2)))
            data = f"{info.name} {rng.random()}".encode() if info.type == tarfile.REGTYPE else b""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _base_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for n in _NAMES:
            info = tarfile.TarInfo(n)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(info)
            for m in _NAMES:
                info = tarfile.TarInfo(f"{n}/{m}")
                info.size, info.mode = 2, 0o644
                tf.addfile(info, io.BytesIO(b"xx"))
    return out.getvalue()


@pytest.mark.parametrize(("kinds", "seeds"), [("fffddlhwwo", range(0, 40)), ("fdlllwwoo", range(100, 140))])
def test_random_layers_agree_with_umoci(kinds: str, seeds: range, tmp_path: Path) -> None:
    """Same tree when both succeed; both refuse when one does (hardlink to a missing path, file as parent)."""
    for seed in seeds:
        rng = random.Random(seed)
        work = tmp_path / str(seed)
        layout = work / "oci"
        subprocess.run(["umoci", "init", "--layout", str(layout)], check=True, capture_output=True)
        subprocess.run(["umoci", "new", "--image", f"{layout}:t"], check=True, capture_output=True)
        for i, blob in enumerate([_base_layer()] + [_random_layer(rng, kinds) for _ in range(rng.randint(1, 3))]):
            (work / f"{i}.tar").write_bytes(blob)
            subprocess.run(["umoci", "raw", "add-layer", "--image", f"{layout}:t", str(work / f"{i}.tar")],
                           check=True, capture_output=True)
        image = OciImage(layout, "t")
        theirs: dict[str, tuple[Any, ...]] | None = None
        ours: dict[str, tuple[Any, ...]] | None = None
        with contextlib.suppress(subprocess.CalledProcessError):
            theirs = host_snapshot(unpack(image, work / "bundle"))
        with contextlib.suppress(ImageError), flattened(image) as (tree, _):
            ours = tree_snapshot(tree)
        assert (ours is None) == (theirs is None), f"seed {seed}: only {'ours' if ours is None else 'umoci'} failed"
        if ours is not None and theirs is not None:
            assert {p: v for p, v in ours.items() if p != "/"} == {p: v for p, v in theirs.items() if p != "/"}, seed
