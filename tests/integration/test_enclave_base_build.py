"""Build the enclave base from the real Debian packages and kernel; check it with GNU cpio and chroot.

The first run downloads ~60 MB of .debs into .cache/enclave_base; later runs use the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from salmiac.enclave_base import base as base_mod
from salmiac.enclave_base.base import DEFAULT_MODULES, build_base, build_base_report, compress
from salmiac.enclave_base.kernel import KernelBundle, ensure_kernel
from salmiac.enclave_base.modules import ModuleTree
from salmiac.errors import RequestError

pytestmark = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("cpio") is None, reason="needs apt-get and GNU cpio"
)

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "enclave_base"
SMALL_MODULES = ("virtio_mmio", "dm_verity", "ext4")


@pytest.fixture(scope="module")
def kernel() -> KernelBundle:
    return ensure_kernel(CACHE)


def _fresh_cache(tmp: Path) -> Path:
    """A new cache that shares only the downloaded .debs (and their lock) with the shared one."""
    tmp.mkdir()
    (tmp / "debs").symlink_to(CACHE / "debs")
    return tmp


def test_same_inputs_same_bytes(kernel: KernelBundle, tmp_path: Path) -> None:
    first = build_base_report(_fresh_cache(tmp_path / "a"), kernel, SMALL_MODULES, compression="none")
    second = build_base_report(_fresh_cache(tmp_path / "b"), kernel, SMALL_MODULES, compression="none")
    assert first.path != second.path
    assert _sha256(first.path) == _sha256(second.path)
    assert first.modules == ("dm_mod", "dm_bufio", "reed_solomon", "dm_verity", "virtio_mmio")
    assert first.builtin_modules == ("ext4",)
    print(f"\nbase (none, 5 modules): {first.uncompressed_bytes} bytes, {first.entries} entries, "
          f"built in {first.build_seconds} s and {second.build_seconds} s")  # fmt: skip

    # Cached: the same call again returns the same file without rebuilding it.
    mtime = first.path.stat().st_mtime_ns
    again = build_base(tmp_path / "a", kernel, list(reversed(SMALL_MODULES)), compression="none")
    assert again == first.path and again.stat().st_mtime_ns == mtime


def test_compression_is_deterministic_and_kernel_readable() -> None:
    payload = (b"0123456789abcdef" * 4096) + os.urandom(0) + bytes(range(256)) * 64
    for name in ("gzip", "zstd"):
        a, b = io.BytesIO(), io.BytesIO()
        compress(payload, name, a)
        compress(payload, name, b)
        assert a.getvalue() == b.getvalue()
    z = io.BytesIO()
    compress(payload, "zstd", z)
    assert subprocess.run(["zstd", "-dc"], input=z.getvalue(), capture_output=True, check=True).stdout == payload
    g = io.BytesIO()
    compress(payload, "gzip", g)
    assert subprocess.run(["gzip", "-dc"], input=g.getvalue(), capture_output=True, check=True).stdout == payload


def test_default_base_contents_and_tools_run_in_a_chroot(kernel: KernelBundle, tmp_path: Path) -> None:
    report = build_base_report(CACHE, kernel, DEFAULT_MODULES)
    print(
        f"\nbase (zstd, default modules): {report.compressed_bytes} bytes compressed, "
        f"{report.uncompressed_bytes} uncompressed, {report.entries} entries, built in {report.build_seconds} s"
    )
    raw = subprocess.run(["zstd", "-dc", str(report.path)], capture_output=True, check=True).stdout
    names = subprocess.run(["cpio", "-t", "--quiet"], input=raw, capture_output=True, check=True).stdout.decode()
    listing = names.splitlines()
    assert listing[0] == "."
    assert listing[1:] == sorted(listing[1:], key=lambda n: [part.encode() for part in n.split("/")])
    py = [n for n in listing if n.startswith("usr/lib/python3.11/")]
    assert "usr/lib/python3.11/os.pyc" in py and "usr/lib/python3.11/asyncio/__init__.pyc" in py
    assert not [n for n in py if n.endswith(".py") or "__pycache__" in n]
    for dropped in ("test", "idlelib", "tkinter", "ensurepip", "lib2to3", "distutils", "unittest"):
        assert not [n for n in py if n.split("/")[3:4] == [dropped]], dropped
    for required in ("usr/bin/busybox", "usr/bin/sh", "usr/bin/mount", "usr/bin/ip", "usr/sbin/cryptsetup",
                     "usr/sbin/veritysetup", "usr/sbin/mkfs.ext4", "usr/sbin/e2fsck", "dev/console",
                     f"usr/lib/modules/{kernel.version}/salmiac-modules.json",
                     f"usr/lib/modules/{kernel.version}/kernel/fs/overlayfs/overlay.ko"):  # fmt: skip
        assert required in listing, required
    assert not [n for n in listing if n.endswith(".ko.xz")]

    # Extract (device nodes excluded: nothing is created on the host) and run the tools with the base's own
    # dynamic loader and libraries: proof that the library closure is complete.
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-i", "-d", "--quiet", "-f", "dev/*"], cwd=root, input=raw, check=True)
    checks = [
        ["/usr/bin/python3", "-c", "import asyncio, ctypes, json, hashlib, ssl, socket, subprocess, signal, "
         "lzma, bz2, decimal, zoneinfo, uuid, mmap; print(hashlib.sha256(b'x').hexdigest()[:8], "
         "ssl.OPENSSL_VERSION.split()[0], __import__('sys').flags.no_site)"],
        ["/usr/sbin/cryptsetup", "--version"],
        ["/usr/sbin/veritysetup", "--version"],
        ["/usr/sbin/integritysetup", "--version"],
        ["/usr/sbin/mkfs.ext4", "-V"],
        ["/usr/sbin/e2fsck", "-V"],
        ["/usr/sbin/resize2fs", "-h"],
        ["/bin/sh", "-c", "ls /usr/lib/python3.11/json && echo ok"],
    ]  # fmt: skip
    env = {"PATH": "/usr/sbin:/usr/bin", "LC_ALL": "C"}
    for cmd in checks:
        proc = subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True, env=env)
        assert "error while loading shared libraries" not in proc.stderr, (cmd, proc.stderr)
        assert proc.returncode in (0, 1) if cmd[0].endswith("resize2fs") else proc.returncode == 0, (cmd, proc)
    out = subprocess.run(["chroot", str(root), *checks[0]], capture_output=True, text=True, env=env).stdout
    assert out.split()[:2] == ["2d711642", "OpenSSL"]


def test_module_resolution_against_the_real_kernel(kernel: KernelBundle) -> None:
    tree = ModuleTree(kernel.modules_dir, kernel.version)
    resolved = tree.resolve(["dm-crypt", "erofs", "virtio_console", "ext4"])
    order = [m.name for m in resolved.modules]
    assert order.index("dm_mod") < order.index("dm_crypt")
    assert order.index("libcrc32c") < order.index("erofs")
    assert set(resolved.builtin) == {"virtio_console", "ext4"}
    for mod in resolved.modules:
        assert mod.data[:4] == b"\x7fELF" and mod.path.endswith(".ko")
    with pytest.raises(RequestError, match="neither a module nor built into"):
        tree.resolve(["no_such_module"])
    with pytest.raises(RequestError, match="invalid kernel module name"):
        build_base(CACHE, kernel, ["../evil"])
    with pytest.raises(RequestError, match="compression"):
        build_base(CACHE, kernel, ["nbd"], compression="xz")
    assert base_mod.DEFAULT_COMPRESSION == "zstd"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
