"""The enclave kernel mounts our squashfs through dm-verity activated with our arguments (QEMU, microvm, TCG).

The image (``build_fs_image`` + ``format_verity`` appended) is attached read-only as virtio-blk disks (NBD is
what runs in production; the block layer above it is the same). A Python /init from the enclave base loads the
modules, imports ``salmiac.rootfs.verity`` (stdlib only, as the enclave will), runs
``veritysetup open`` with ``veritysetup_open_args(VerityInfo.from_dict(...))``, mounts the squashfs and checks
every entry against the tree. A second disk has one flipped byte in a file's data: reading that file must fail
with EIO. A wrong root hash must make the mount fail. Also times reading a 16 MiB file with the generic sha256
and with ``sha256_ssse3`` loaded (run with -s to see the figures).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from salmiac.enclave import kmod
from salmiac.enclave_base.base import DEFAULT_MODULES, build_base
from salmiac.enclave_base.kernel import ensure_kernel
from salmiac.image.tree import ROOT, Entry, Kind, Tree
from salmiac.rootfs import verity
from salmiac.rootfs.cpio import CpioWriter
from salmiac.rootfs.fsimage import build_fs_image
from salmiac.rootfs.verity import format_verity

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("qemu-system-x86_64", "tar2sqfs")),
                       reason="needs qemu-system-x86_64 and tar2sqfs"),
]

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "enclave_base"
MODULES = (*DEFAULT_MODULES, "virtio_blk", "sha256_ssse3")
MARKER = "SALMIAC-VERITY-E2E"
BOOT_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 300.0
BIG = 16 << 20

INIT = r"""#!/usr/bin/python3.11
import ctypes, errno, hashlib, json, os, subprocess, sys, time
print("@MARKER@ python-started", flush=True)
os.environ["PATH"] = "/usr/sbin:/usr/bin"
os.environ["DM_DISABLE_UDEV"] = "1"
libc = ctypes.CDLL(None, use_errno=True)
def mount(src, target, fstype, flags=0):
    os.makedirs(target, exist_ok=True)
    if libc.mount(src.encode(), target.encode(), fstype.encode(), flags, None) != 0:
        return ctypes.get_errno()
    return 0
mount("proc", "/proc", "proc"); mount("sysfs", "/sys", "sysfs"); mount("devtmpfs", "/dev", "devtmpfs")
sys.path.insert(0, "/salmiac-test")
import kmod, verity
kmod.load_modules(["virtio_mmio"])
kmod.load_modules(["virtio_blk", "dm_verity", "squashfs"])
deadline = time.monotonic() + 30
while not (os.path.exists("/dev/vda") and os.path.exists("/dev/vdb")) and time.monotonic() < deadline:
    time.sleep(0.05)
cfg = json.loads(open("/salmiac-test/config.json").read())
info = verity.VerityInfo.from_dict(cfg["verity"])
result = {"errors": []}
def open_dev(dev, name, info):
    p = subprocess.run(verity.veritysetup_open_args(info, dev, name), capture_output=True, text=True)
    return [p.returncode, p.stderr.strip()[-300:]]
def close_dev(name):
    p = subprocess.run(["veritysetup", "close", name], capture_output=True, text=True)
    return p.returncode
def check_tree(mnt):
    for path, exp in sorted(cfg["entries"].items()):
        full = mnt + path
        st = os.lstat(full)
        got = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid}
        if "target" in exp: got["target"] = os.readlink(full)
        if "rdev" in exp: got["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        if "sha256" in exp:
            with open(full, "rb") as f: got["sha256"] = hashlib.sha256(f.read()).hexdigest()
            got["ino_group"] = exp["ino_group"]; got["nlink"] = st.st_nlink
        if "nlink" in exp and "nlink" not in got: got["nlink"] = exp["nlink"]
        want = {k: v for k, v in exp.items()}
        if got != want: result["errors"].append([path, got, want])
def timed_read(path):
    t0 = time.monotonic()
    with open(path, "rb") as f:
        while f.read(1 << 20): pass
    return round(time.monotonic() - t0, 3)
def drop_caches():
    libc.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f: f.write("3")

result["open_good"] = open_dev("/dev/vda", "rootfs", info)
result["mount_good"] = mount("/dev/mapper/rootfs", "/mnt/good", "squashfs", 1)
if result["mount_good"] == 0:
    check_tree("/mnt/good")
    drop_caches()
    result["read_big_generic_s"] = timed_read("/mnt/good/big")
    libc.umount(b"/mnt/good")
result["close_good"] = close_dev("rootfs")
result["ssse3_loaded"] = kmod.load_modules(["sha256_ssse3"])
drop_caches()
result["open_ssse3"] = open_dev("/dev/vda", "rootfs2", info)
if mount("/dev/mapper/rootfs2", "/mnt/good2", "squashfs", 1) == 0:
    result["read_big_ssse3_s"] = timed_read("/mnt/good2/big")
    libc.umount(b"/mnt/good2")
close_dev("rootfs2")
result["sha256_drivers"] = [
    l.split(":", 1)[1].strip() for l in open("/proc/crypto") if l.startswith("driver") and "sha256" in l
]

result["open_bad"] = open_dev("/dev/vdb", "rootbad", info)
result["mount_bad"] = mount("/dev/mapper/rootbad", "/mnt/bad", "squashfs", 1)
if result["mount_bad"] == 0:
    try:
        timed_read("/mnt/bad/big")
        result["read_bad"] = "no error"
    except OSError as exc:
        result["read_bad"] = exc.errno
    with open("/mnt/bad/etc/passwd", "rb") as f:
        result["bad_other_file_ok"] = hashlib.sha256(f.read()).hexdigest() == cfg["entries"]["/etc/passwd"]["sha256"]
    libc.umount(b"/mnt/bad")
close_dev("rootbad")

wrong = verity.VerityInfo.from_dict({**cfg["verity"], "root_hash": "00" * 32})
result["open_wrong_root"] = open_dev("/dev/vda", "rootwrong", wrong)
result["mount_wrong_root"] = mount("/dev/mapper/rootwrong", "/mnt/wrong", "squashfs", 1)
print("@MARKER@ " + json.dumps(result, sort_keys=True), flush=True)
# Console output drains slowly under TCG (microvm's UART is polled, and 6.12 defers printk flushing): powering off
# right after the print lost the line in about 1 run in 2. Give it time; the host stops reading at the marker.
time.sleep(5)
libc.sync()
libc.reboot(0x4321FEDC)
"""


def _tree() -> Tree:
    tree = Tree()
    e = tree.entries
    spool = tree.spool
    e[ROOT] = Entry(Kind.DIR, 0o755)
    for d in ("/etc", "/bin", "/dev", "/home", "/home/user", "/empty"):
        e[PurePosixPath(d)] = Entry(Kind.DIR, 0o755)
    e[PurePosixPath("/home/user")] = Entry(Kind.DIR, 0o700, uid=1000, gid=1000)
    e[PurePosixPath("/etc/passwd")] = Entry(Kind.FILE, 0o644, data=spool.append_bytes(b"root:x:0:0::/:/bin/sh\n"))
    tool = spool.append_bytes(b"\x7fELF" + os.urandom(70_000))
    e[PurePosixPath("/bin/tool")] = Entry(Kind.FILE, 0o4755, data=tool)
    e[PurePosixPath("/bin/tool-link")] = Entry(Kind.FILE, 0o4755, data=tool)
    e[PurePosixPath("/bin/sh")] = Entry(Kind.SYMLINK, 0o777, target="tool")
    e[PurePosixPath("/dev/null")] = Entry(Kind.CHAR, 0o666, rdev=(1, 3))
    e[PurePosixPath("/dev/fifo")] = Entry(Kind.FIFO, 0o600, uid=1000)
    e[PurePosixPath("/home/user/notes")] = Entry(Kind.FILE, 0o600, uid=1000, gid=1000,
                                                 data=spool.append_bytes(b"mine"))
    e[PurePosixPath("/big")] = Entry(Kind.FILE, 0o644, data=spool.append_bytes(os.urandom(BIG)))
    return tree


_FMT = {Kind.DIR: stat.S_IFDIR, Kind.FILE: stat.S_IFREG, Kind.SYMLINK: stat.S_IFLNK, Kind.CHAR: stat.S_IFCHR,
        Kind.BLOCK: stat.S_IFBLK, Kind.FIFO: stat.S_IFIFO}


def _expected(tree: Tree) -> dict[str, dict[str, Any]]:
    groups: dict[int, list[str]] = {}
    for path, entry in tree.walk():
        if entry.data is not None:
            groups.setdefault(id(entry.data), []).append(str(path))
    out: dict[str, dict[str, Any]] = {}
    for path, entry in tree.walk():
        exp: dict[str, Any] = {"mode": _FMT[entry.kind] | entry.mode, "uid": entry.uid, "gid": entry.gid}
        if entry.kind is Kind.SYMLINK:
            exp["target"] = entry.target
        if entry.kind in (Kind.CHAR, Kind.BLOCK):
            exp["rdev"] = list(entry.rdev)
        if entry.data is not None:
            exp["sha256"] = hashlib.sha256(entry.data.read()).hexdigest()
            group = groups[id(entry.data)]
            exp["ino_group"] = group[0]
            exp["nlink"] = len(group)
        out["" if path == ROOT else str(path)] = exp
    out["/"] = out.pop("")
    return out


def _initrd(base: Path, dest: Path, config: dict[str, Any]) -> Path:
    out = io.BytesIO()
    writer = CpioWriter(out)
    script = INIT.replace("@MARKER@", MARKER)
    writer.add_file("init", script.encode(), mode=0o755)
    writer.add_dir("salmiac-test", mode=0o755)  # the kernel's cpio unpacker creates no missing parents
    writer.add_file("salmiac-test/kmod.py", Path(kmod.__file__).read_bytes())
    writer.add_file("salmiac-test/verity.py", Path(verity.__file__).read_bytes())
    writer.add_file("salmiac-test/config.json", json.dumps(config).encode())
    writer.finish()
    data = base.read_bytes()
    dest.write_bytes(data + b"\0" * (-len(data) % 4) + out.getvalue())
    return dest


def _tsc_khz() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


def _boot(bzimage: Path, initrd: Path, good: Path, bad: Path) -> tuple[dict[str, Any] | None, str, float]:
    cmd = [
        "qemu-system-x86_64", "-M", "microvm,acpi=on", "-cpu", "max", "-m", "512M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(bzimage), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 quiet tsc_early_khz={_tsc_khz()}",
        "-device", "virtio-rng-device",
        "-drive", f"file={good},if=none,format=raw,readonly=on,id=good",
        "-device", "virtio-blk-device,drive=good",
        "-drive", f"file={bad},if=none,format=raw,readonly=on,id=bad",
        "-device", "virtio-blk-device,drive=bad",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines: list[str] = []
    os.set_blocking(proc.stdout.fileno(), False)
    pending = b""
    result: dict[str, Any] | None = None
    started = False
    try:
        while proc.poll() is None or pending:
            now = time.monotonic()
            if (not started and now - start > BOOT_TIMEOUT_S) or now - start > RUN_TIMEOUT_S:
                break
            chunk = proc.stdout.read(65536)
            if chunk:
                pending += chunk
            elif proc.poll() is not None:
                break
            else:
                time.sleep(0.05)  # polling a pipe, not waiting for a result
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace").rstrip("\r")
                lines.append(f"{time.monotonic() - start:8.2f} {line}")
                if f"{MARKER} python-started" in line:
                    started = True
                elif line.startswith(MARKER + " "):
                    result = json.loads(line[len(MARKER) + 1:])
            if result is not None:
                break  # the guest is only waiting for its console to drain
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return result, "\n".join(lines), time.monotonic() - start


def test_kernel_mounts_verity_protected_squashfs(tmp_path: Path) -> None:
    kernel = ensure_kernel(CACHE)
    base = build_base(CACHE, kernel, MODULES)
    tree = _tree()
    image = build_fs_image(tree, tmp_path / "rootfs.img")
    info = format_verity(image.path)
    bad = tmp_path / "rootfs-bad.img"
    shutil.copyfile(image.path, bad)
    payload = tree.entries[PurePosixPath("/big")].data
    assert payload is not None
    needle = payload.read()[BIG // 2: BIG // 2 + 64]  # random, stored uncompressed: findable in the image
    offset = bad.read_bytes().find(needle)
    assert 0 < offset < info.hash_offset
    with open(bad, "r+b") as fh:
        fh.seek(offset)
        fh.write(bytes([needle[0] ^ 0xFF]))
    initrd = _initrd(base, tmp_path / "initrd.img", {"verity": info.to_dict(), "entries": _expected(tree)})

    result, log, elapsed = None, "", 0.0
    for _attempt in range(2):  # ~1 boot in 8 stalls under TCG (DESIGN.md)
        result, log, elapsed = _boot(kernel.bzimage, initrd, image.path, bad)
        if result is not None:
            break
    assert result is not None, log
    print(f"\nverity e2e: {elapsed:.1f} s; image {image.size} B + tree {info.hash_size} B; "
          f"16 MiB read generic sha256 {result.get('read_big_generic_s')} s, "
          f"with sha256_ssse3 {result.get('read_big_ssse3_s')} s; drivers {result.get('sha256_drivers')}")
    assert result["open_good"][0] == 0, result
    assert result["mount_good"] == 0, result
    assert result["errors"] == [], result["errors"]
    assert result["close_good"] == 0
    assert result["open_bad"][0] == 0 and result["mount_bad"] == 0, result
    assert result["read_bad"] == 5, result  # EIO
    assert result["bad_other_file_ok"] is True
    assert result["mount_wrong_root"] != 0, result
    assert "verity" in log and "corrupted" in log, log
