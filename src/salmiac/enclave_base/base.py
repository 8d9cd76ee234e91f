"""The enclave base: a deterministic, compressed newc cpio that the runtime puts first in the initramfs.

Contents (usr-merged: ``/bin``, ``/sbin``, ``/lib``, ``/lib64`` are symlinks into ``/usr``):

- Python 3.11 from Debian (``python3.11-minimal`` + ``libpython3.11-stdlib``) at ``/usr/bin/python3.11``
  (and ``python3``): the stdlib as sourceless ``.pyc`` compiled by that same interpreter with
  ``unchecked-hash`` invalidation (no mtimes inside, nothing to stat at import), minus test suites, IDLE,
  tkinter, ensurepip, lib2to3, distutils, venv, sqlite3, dbm, curses, unittest, pydoc; only the extension
  modules in ``_DYNLOAD_KEEP``.
- ``/usr/bin/busybox`` (static) with applet symlinks in ``/usr/bin`` (all but ``_APPLET_SKIP``).
- ``cryptsetup``, ``veritysetup``, ``integritysetup`` (cryptsetup-bin) and ``mke2fs``/``mkfs.ext4``,
  ``e2fsck``/``fsck.ext4``, ``resize2fs``, ``tune2fs`` (e2fsprogs) in ``/usr/sbin``, with ``/etc/mke2fs.conf``.
- Exactly the shared libraries these ELF files need: DT_NEEDED followed through the unpacked packages (never
  the host's), plus the dynamic loader.
- The requested kernel modules and their dependencies, decompressed, under ``/usr/lib/modules/<release>/``,
  with ``salmiac-modules.json`` (see ``modules.py``) that ``salmiac.enclave.kmod`` reads.
- A skeleton: ``/dev/console`` (5,1) and ``/dev/null`` (1,3) as cpio entries (the kernel opens the console for
  PID 1 before anything mounts devtmpfs), ``/proc``, ``/sys``, ``/run``, ``/tmp``, ``/root``, ``/etc/passwd``.

There is no ``/init``: the runtime adds it (and its own package) in a second cpio after this one.

Determinism: inputs pinned by the deb lock and the kernel's sha256; entries sorted, mtime 0, uid/gid 0,
inodes numbered in order; compressed with fixed parameters. The cache key covers every input, including this
package's own source, so changing the recipe rebuilds.

Compression: zstd level 19. The kernel accepts gzip, bzip2, lzma, xz, lzo, lz4 and zstd initrds (RD_* =y).
Measured here (default modules; 36.3 MB uncompressed; QEMU 10 TCG on 2 cores shared with a load average of
7-9, so times are noisy; "unpack" is the guest's dmesg from "Trying to unpack rootfs" to "Freeing initrd
memory", 3 boots each)::

    none        36.3 MB   unpack 0.47-0.89 s   compress 0 s
    gzip -9     14.1 MB   unpack 1.53-2.51 s   compress 11-23 s
    zstd -9     12.7 MB   (not booted)         compress ~2 s
    zstd -19    11.3 MB   unpack 1.49-1.83 s   compress 20-67 s

zstd -19 makes the smallest EIF (-20% vs gzip) and unpacks no slower than gzip; the uncompressed base saves
~1 s of unpacking but triples the EIF and the memory it occupies until unpacked. The compression cost is paid
once per set of inputs (the result is cached).

QEMU command line that boots kernel + this base (+ an /init cpio) under TCG, as used by
``tests/e2e/test_base_boot.py``::

    qemu-system-x86_64 -M microvm,acpi=on -cpu max -m 512M -smp 1 -nodefaults -no-user-config
      -nographic -no-reboot
      -kernel BZIMAGE -initrd INITRD
      -append "console=ttyS0 earlyprintk=ttyS0 panic=-1 quiet tsc_early_khz=<host TSC kHz>"
      -serial stdio   (or -serial file:LOG / chardev)
      -device virtio-rng-device
      -device virtio-serial-device
      -chardev socket,id=c0,path=SOCK  -device virtserialport,chardev=c0,name=salmiac.5000

``-M microvm,acpi=on`` is required: Debian's kernel has no VIRTIO_MMIO_CMDLINE_DEVICES, so virtio-mmio
devices are found through ACPI, and only once the ``virtio_mmio`` module is loaded (it is =m in this kernel;
virtio_console is built in). ``-device virtio-*-device`` (not ``-pci``) because microvm has no PCI by default.
``-no-reboot`` + ``panic=-1`` make a panic or poweroff end QEMU. ``earlyprintk=ttyS0`` costs nothing and gives
a log line from the very first moment (DESIGN: a boot that stalls at "Booting from ROM..." was never seen with
it). The port appears as ``/dev/vportNpM`` with its name in ``/sys/class/virtio-ports/vportNpM/name``; that
``name`` file appears a moment after the directory (poll, tolerate ENOENT).

``tsc_early_khz``: under TCG the guest reads the host's TSC. With the host busy, the kernel's PIT calibration
fails ("tsc: Marking TSC unstable due to could not calculate TSC khz") and the boot then hangs for good (no
timer tick; 6 of 10 boots hung at a load average of 8). Giving the rate (``cpu MHz`` of the host's
/proc/cpuinfo x 1000) skips that calibration: 0 hangs in 20+ boots since. ``-icount shift=auto`` also avoids
the hang without changing the command line (which is measured in the EIF), but boots ~3x slower (~24 s).

Initrd layout: the compressed base, zero bytes up to a multiple of 4, then further cpio archives (compressed
or not): the kernel skips zero padding between archives but wants each uncompressed header 4-byte aligned.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from salmiac.enclave_base import debs, elf
from salmiac.enclave_base.kernel import KernelBundle
from salmiac.enclave_base.modules import MODULES_INDEX, ModuleTree, check_names, normalize
from salmiac.errors import RequestError, RuntimeFailure
from salmiac.image.tree import ROOT, Entry, Kind, Tree
from salmiac.rootfs.cpio import CpioWriter, write_tree

RECIPE_VERSION = 1
PYTHON = "/usr/bin/python3.11"
PY_LIB = PurePosixPath("/usr/lib/python3.11")
BASE_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "busybox-static", "cryptsetup-bin", "e2fsprogs")

# Modules the runtime needs (virtio transport, vsock, NSM, block stack, network, filesystems, crypto used by
# dm-crypt/cryptsetup that the kernel would otherwise request through modprobe). In 6.12.118+deb12-cloud-amd64:
#   =m  virtio_mmio (load it first: no virtio-mmio device shows up before it), virtio_rng, vsock,
#       vmw_vsock_virtio_transport(_common), nsm, nbd, dm_mod, dm_verity, dm_crypt, dm_integrity, tun, overlay,
#       squashfs, erofs, xts, aesni_intel, algif_skcipher, algif_hash (also virtio_net, virtio_blk if wanted)
#   =y  virtio_console, virtio_pci, ext4 (+jbd2, mbcache, crc16), af_packet, unix, devtmpfs (not auto-mounted)
# Asking for a built-in is allowed: it is recorded in the index as "builtin" and skipped at load time.
DEFAULT_MODULES = (
    "virtio_mmio",
    "virtio_rng",
    "vsock",
    "vmw_vsock_virtio_transport",
    "nsm",
    "nbd",
    "dm_mod",
    "dm_verity",
    "dm_crypt",
    "dm_integrity",
    "tun",
    "overlay",
    "squashfs",
    "erofs",
    "xts",
    "aesni_intel",
    "algif_skcipher",
    "algif_hash",
    "virtio_console",
    "ext4",
    "af_packet",
)

COMPRESSIONS = ("zstd", "gzip", "none")
DEFAULT_COMPRESSION = "zstd"
_ZSTD_LEVEL = 19
_GZIP_LEVEL = 9

_DYNLOAD_KEEP = frozenset(
    {
        "_asyncio", "_bz2", "_contextvars", "_ctypes", "_decimal", "_hashlib", "_json", "_lzma",
        "_multiprocessing", "_posixshmem", "_queue", "_ssl", "_typing", "_uuid", "_zoneinfo", "mmap",
        "resource", "termios",
    }
)  # fmt: skip
_PY_DROP_DIRS = frozenset(
    {
        "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "distutils",
        "pydoc_data", "unittest", "venv", "sqlite3", "dbm", "curses", "__phello__", "site-packages",
        "dist-packages", "__pycache__",
    }
)  # fmt: skip
_PY_DROP_FILES = frozenset(
    {
        "turtle.py",
        "pydoc.py",
        "sitecustomize.py",
        "EXTERNALLY-MANAGED",
        "LICENSE.txt",
        "_sysconfigdata__linux_x86_64-linux-gnu.py",
    }
)
_PY_DROP_SUFFIXES = frozenset({".pyc", ".rst", ".txt", ".ps1", ".fish", ".csh", ".css", ".exe"})
_SBIN = ("cryptsetup", "veritysetup", "integritysetup", "mke2fs", "mkfs.ext4", "e2fsck", "fsck.ext4", "resize2fs",
         "tune2fs")  # fmt: skip
_APPLET_SKIP = frozenset(
    {
        "busybox", "mke2fs", "dpkg", "dpkg-deb", "rpm", "rpm2cpio", "init", "linuxrc", "modprobe", "depmod",
        "modinfo", "rmmod", "login", "su", "passwd", "getty", "sulogin", "mdev", "httpd", "telnetd", "udhcpd",
        "crond", "crontab", "syslogd", "klogd", "start-stop-daemon", "run-init",
    }
)  # fmt: skip
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib")
_USRMERGE = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
_MAX_SYMLINK_HOPS = 40


@dataclass(frozen=True, slots=True)
class BaseReport:
    path: Path
    compression: str
    compressed_bytes: int
    uncompressed_bytes: int
    entries: int
    build_seconds: float
    modules: tuple[str, ...]  # load order
    builtin_modules: tuple[str, ...]


def build_base(
    cache_dir: Path,
    kernel: KernelBundle,
    modules: Sequence[str] = DEFAULT_MODULES,
    *,
    compression: str = DEFAULT_COMPRESSION,
    lock: Path | None = None,
) -> Path:
    """The compressed base cpio for ``kernel`` with ``modules`` (and their dependencies); cached by inputs.

    ``lock``: a deb lock file (see ``debs``) pinning the exact package versions; written on first use.
    """
    return build_base_report(cache_dir, kernel, modules, compression=compression, lock=lock).path


def build_base_report(
    cache_dir: Path,
    kernel: KernelBundle,
    modules: Sequence[str] = DEFAULT_MODULES,
    *,
    compression: str = DEFAULT_COMPRESSION,
    lock: Path | None = None,
) -> BaseReport:
    if compression not in COMPRESSIONS:
        raise RequestError(f"base compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    check_names(modules)
    wanted = sorted({normalize(m) for m in modules})
    deb_dir = cache_dir / "debs"
    deb_paths = debs.download_closure(BASE_PACKAGES, deb_dir, lock=lock)
    key = _cache_key(deb_paths, kernel, wanted, compression)
    out_dir = cache_dir / "base" / key
    suffix = {"zstd": ".zst", "gzip": ".gz", "none": ""}[compression]
    out = out_dir / f"base.cpio{suffix}"
    manifest = out_dir / "manifest.json"
    if out.exists() and manifest.exists():
        return _report_from_manifest(out, manifest)

    started = time.monotonic()
    tree = Tree()
    try:
        with tempfile.TemporaryDirectory(prefix="salmiac-base-") as tmp:
            root = Path(tmp) / "root"
            debs.extract_debs(deb_paths, root)
            view = _usrmerged_view(root)
            _add_skeleton(tree)
            elves = _add_python(tree, view, root, Path(tmp) / "pyc")
            elves += _add_tools(tree, view)
            _add_busybox_applets(tree, view)
            _add_shared_libraries(tree, view, elves)
        module_set = ModuleTree(kernel.modules_dir, kernel.version).resolve(wanted)
        mod_root = PurePosixPath("/usr/lib/modules") / kernel.version
        for mod in module_set.modules:
            _add_bytes(tree, mod_root / mod.path, mod.data, 0o644)
        _add_bytes(tree, mod_root / MODULES_INDEX, module_set.index_json(), 0o644)

        raw = io.BytesIO()
        writer = CpioWriter(raw)
        write_tree(tree, writer, mtime=0)
        writer.finish()
        entries = len(tree.entries)
    finally:
        tree.close()
    payload = raw.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".tmp")
    with tmp_out.open("wb") as f:
        compress(payload, compression, f)
    os.replace(tmp_out, out)
    report = BaseReport(
        path=out,
        compression=compression,
        compressed_bytes=out.stat().st_size,
        uncompressed_bytes=len(payload),
        entries=entries,
        build_seconds=round(time.monotonic() - started, 2),
        modules=tuple(m.name for m in module_set.modules),
        builtin_modules=module_set.builtin,
    )
    doc = {
        "compression": compression,
        "compressed_bytes": report.compressed_bytes,
        "uncompressed_bytes": report.uncompressed_bytes,
        "entries": entries,
        "build_seconds": report.build_seconds,
        "modules": list(report.modules),
        "builtin_modules": list(report.builtin_modules),
        "kernel": kernel.version,
        "sha256": debs.sha256_file(out),
        "python": PYTHON,
    }
    manifest.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return report


def compress(payload: bytes, compression: str, out: BinaryIO) -> None:
    """Deterministic compression of a cpio in a format the kernel unpacks."""
    if compression == "none":
        out.write(payload)
    elif compression == "gzip":
        with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=_GZIP_LEVEL, mtime=0) as gz:
            gz.write(payload)
    elif compression == "zstd":
        import zstandard

        params = zstandard.ZstdCompressionParameters.from_level(
            _ZSTD_LEVEL, write_content_size=True, write_checksum=True, threads=0
        )
        out.write(zstandard.ZstdCompressor(compression_params=params).compress(payload))
    else:
        raise RequestError(f"unknown compression {compression!r}")


def _cache_key(deb_paths: Sequence[Path], kernel: KernelBundle, modules: Sequence[str], compression: str) -> str:
    h = hashlib.sha256()
    h.update(f"recipe {RECIPE_VERSION}\n".encode())
    for path in deb_paths:
        h.update(f"deb {path.name}\n".encode())  # names carry versions; the lock checked their sha256
    h.update(f"kernel {kernel.version} {kernel.deb_sha256}\n".encode())
    h.update(f"modules {' '.join(modules)}\ncompression {compression}\n".encode())
    here = Path(__file__).resolve().parent
    for src in sorted([*here.glob("*.py"), here.parent / "rootfs" / "cpio.py"]):
        h.update(src.name.encode() + b"\0" + hashlib.sha256(src.read_bytes()).digest())
    return h.hexdigest()[:24]


def _report_from_manifest(out: Path, manifest: Path) -> BaseReport:
    doc = json.loads(manifest.read_text())
    return BaseReport(
        path=out,
        compression=doc["compression"],
        compressed_bytes=doc["compressed_bytes"],
        uncompressed_bytes=doc["uncompressed_bytes"],
        entries=doc["entries"],
        build_seconds=doc["build_seconds"],
        modules=tuple(doc["modules"]),
        builtin_modules=tuple(doc["builtin_modules"]),
    )


# -- the unpacked packages, seen as a usr-merged tree ------------------------------------------------------


def _usrmerged_view(root: Path) -> dict[PurePosixPath, Path]:
    """Enclave path → host path for every file/symlink unpacked, with /bin, /sbin, /lib, /lib64 moved to /usr."""
    view: dict[PurePosixPath, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames) + [d for d in dirnames if (here / d).is_symlink()]:
            host = here / name
            rel = host.relative_to(root).as_posix()
            top, _, rest = rel.partition("/")
            if top in _USRMERGE and rest:
                rel = f"{_USRMERGE[top]}/{rest}"
            path = PurePosixPath("/") / rel
            if path in view and not _same_file(view[path], host):
                raise RuntimeFailure(f"two packages ship different {path} (usr-merge collision)")
            view[path] = host
    return view


def _same_file(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    return a.read_bytes() == b.read_bytes()


def _merged(path: PurePosixPath) -> PurePosixPath:
    """/lib64/x → /usr/lib64/x: the usr-merge move of the top directory only (no symlink resolution)."""
    parts = path.parts
    if len(parts) > 2 and parts[1] in _USRMERGE:
        return PurePosixPath("/", _USRMERGE[parts[1]], *parts[2:])
    return path


def _canonical(view: dict[PurePosixPath, Path], path: PurePosixPath) -> PurePosixPath:
    """Resolve symlinks inside the view (never on the host), including the usr-merge root links."""
    parts = list(path.parts[1:])
    current = ROOT
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent
            continue
        if part in (".", ""):
            continue
        candidate = current / part
        if current == ROOT and part in _USRMERGE:
            parts = [*PurePosixPath(_USRMERGE[part]).parts, *parts]
            continue
        host = view.get(candidate)
        if host is not None and host.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise RuntimeFailure(f"symlink loop at {path}")
            target = PurePosixPath(os.readlink(host))
            if target.is_absolute():
                current = ROOT
            parts = [*target.parts[1:], *parts] if target.is_absolute() else [*target.parts, *parts]
            continue
        current = candidate
    return current


# -- adding things to the tree -----------------------------------------------------------------------------


def _ensure_dirs(tree: Tree, path: PurePosixPath) -> None:
    for parent in reversed(path.parents):
        if parent not in tree:
            tree.entries[parent] = Entry(Kind.DIR, 0o755)


def _add_bytes(tree: Tree, path: PurePosixPath, payload: bytes, mode: int) -> None:
    _ensure_dirs(tree, path)
    tree.entries[path] = Entry(Kind.FILE, mode, data=tree.spool.append_bytes(payload))


def _add_symlink(tree: Tree, path: PurePosixPath, target: str) -> None:
    _ensure_dirs(tree, path)
    tree.entries[path] = Entry(Kind.SYMLINK, 0o777, target=target)


def _add_from_view(tree: Tree, view: dict[PurePosixPath, Path], path: PurePosixPath) -> None:
    """Copy ``path`` (a file, or a symlink plus what it points to) from the unpacked packages."""
    path = _merged(path)
    seen: set[PurePosixPath] = set()
    while path not in seen:
        seen.add(path)
        host = view.get(path)
        if host is None:
            raise RuntimeFailure(f"{path} is not in the unpacked base packages")
        if host.is_symlink():
            target = os.readlink(host)
            _add_symlink(tree, path, target)
            path = _canonical(view, path.parent / target)
            continue
        st = host.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise RuntimeFailure(f"{path}: not a regular file")
        _add_bytes(tree, path, host.read_bytes(), stat.S_IMODE(st.st_mode) & 0o755)
        return


def _add_skeleton(tree: Tree) -> None:
    for name, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777),
                       ("mnt", 0o755), ("root", 0o700), ("etc", 0o755), ("var", 0o755)):  # fmt: skip
        tree.entries[ROOT / name] = Entry(Kind.DIR, mode)
    tree.entries[ROOT / "dev" / "console"] = Entry(Kind.CHAR, 0o600, rdev=(5, 1))
    tree.entries[ROOT / "dev" / "null"] = Entry(Kind.CHAR, 0o666, rdev=(1, 3))
    for top, target in _USRMERGE.items():
        _add_symlink(tree, ROOT / top, target)
    _add_bytes(tree, ROOT / "etc" / "passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    _add_bytes(tree, ROOT / "etc" / "group", b"root:x:0:\n", 0o644)


def _add_tools(tree: Tree, view: dict[PurePosixPath, Path]) -> list[PurePosixPath]:
    elves: list[PurePosixPath] = []
    _add_from_view(tree, view, PurePosixPath("/usr/bin/busybox"))
    for name in _SBIN:
        path = PurePosixPath("/usr/sbin") / name
        _add_from_view(tree, view, path)
        elves.append(_canonical(view, path))
    _add_from_view(tree, view, PurePosixPath("/etc/mke2fs.conf"))
    return elves


def _add_busybox_applets(tree: Tree, view: dict[PurePosixPath, Path]) -> None:
    busybox = view[PurePosixPath("/usr/bin/busybox")]
    out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=60).stdout
    applets = sorted(set(out.split()) - _APPLET_SKIP)
    for required in ("sh", "mount", "umount", "ls", "cat", "ip", "insmod", "switch_root"):
        if required not in applets:
            raise RuntimeFailure(f"busybox has no {required} applet")
    for applet in applets:
        if "/" in applet or applet in (".", ".."):
            raise RuntimeFailure(f"odd busybox applet name {applet!r}")
        path = PurePosixPath("/usr/bin") / applet
        if path not in tree:
            _add_symlink(tree, path, "busybox")


def _add_python(tree: Tree, view: dict[PurePosixPath, Path], root: Path, pyc_dir: Path) -> list[PurePosixPath]:
    """The interpreter and a pruned, sourceless stdlib; returns the ELF files added (for library closure)."""
    elves = [PurePosixPath(PYTHON)]
    _add_from_view(tree, view, PurePosixPath(PYTHON))
    _add_symlink(tree, PurePosixPath("/usr/bin/python3"), "python3.11")
    sources: list[PurePosixPath] = []
    for path in sorted(view):
        if path.parent == PY_LIB / "lib-dynload" or not path.is_relative_to(PY_LIB):
            continue
        rel = path.relative_to(PY_LIB)
        if any(part in _PY_DROP_DIRS or part.startswith("config-3.11") for part in rel.parts[:-1]):
            continue
        if path.name in _PY_DROP_FILES or view[path].is_symlink():
            continue
        if path.suffix == ".py":
            sources.append(path)
        elif path.suffix not in _PY_DROP_SUFFIXES:
            _add_from_view(tree, view, path)
    for path in sorted(view):
        if path.parent == PY_LIB / "lib-dynload" and path.name.split(".", 1)[0] in _DYNLOAD_KEEP:
            _add_from_view(tree, view, path)
            elves.append(path)
    for path, pyc in _compile(view, root, sources, pyc_dir):
        _add_bytes(tree, path.with_suffix(".pyc"), pyc, 0o644)
    return elves


_COMPILE_SCRIPT = """
import json, py_compile, sys
jobs = json.load(sys.stdin)
for src, dst, dfile in jobs:
    py_compile.compile(src, cfile=dst, dfile=dfile, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


def _compile(
    view: dict[PurePosixPath, Path], root: Path, sources: Sequence[PurePosixPath], pyc_dir: Path
) -> list[tuple[PurePosixPath, bytes]]:
    """Compile with the base's own interpreter (bytecode and magic match what runs in the enclave).

    One process, sources in sorted order: marshal output depends on object sharing inside the process, so
    the same order gives the same bytes.
    """
    python = view[PurePosixPath(PYTHON)]
    jobs = [(str(view[p]), str(pyc_dir / f"{i}.pyc"), str(p)) for i, p in enumerate(sources)]
    pyc_dir.mkdir(parents=True, exist_ok=True)
    libs = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": libs, "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(
        [str(python), "-I", "-S", "-c", _COMPILE_SCRIPT],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeFailure(f"compiling the base's stdlib with {PYTHON} failed: {last}")
    return [(p, (pyc_dir / f"{i}.pyc").read_bytes()) for i, p in enumerate(sources)]


def _add_shared_libraries(tree: Tree, view: dict[PurePosixPath, Path], roots: Sequence[PurePosixPath]) -> None:
    """Every library the ELF files in ``roots`` need, transitively, resolved in the unpacked packages."""
    pending = list(roots)
    done: set[PurePosixPath] = set()
    while pending:
        path = _canonical(view, pending.pop())
        if path in done:
            continue
        done.add(path)
        host = view.get(path)
        if host is None:
            raise RuntimeFailure(f"{path} is not in the unpacked base packages")
        info = elf.dynamic_info(host.read_bytes())
        if info.interpreter is not None:
            _add_from_view(tree, view, PurePosixPath(info.interpreter))
            pending.append(PurePosixPath(info.interpreter))
        for needed in info.needed:
            dirs = [*(d.replace("$ORIGIN", str(path.parent)) for d in info.runpath), *_LIB_DIRS]
            found = next((PurePosixPath(d) / needed for d in dirs if PurePosixPath(d) / needed in view), None)
            if found is None:
                found = next(
                    (PurePosixPath(d) / needed for d in dirs if _canonical(view, PurePosixPath(d) / needed) in view),
                    None,
                )
            if found is None:
                raise RuntimeFailure(f"{path} needs {needed}, which no base package provides")
            _add_from_view(tree, view, found)
            pending.append(found)
