"""Boot Debian's cloud kernel with the enclave base plus a tiny Python /init in QEMU (microvm, TCG).

Checks what the runtime relies on: Python runs as PID 1 from the base, modules load through
``salmiac.enclave.kmod``, devtmpfs gives /dev/vportNpM for a named virtio-serial port whose bytes reach a Unix
socket on the host, getrandom() does not block, the base's tools find their libraries, and poweroff ends QEMU.
Prints timings (run with -s to see them).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from salmiac.enclave import kmod
from salmiac.enclave_base.base import DEFAULT_MODULES, build_base
from salmiac.enclave_base.kernel import KernelBundle, ensure_kernel
from salmiac.rootfs.cpio import CpioWriter

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64"),
]

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "enclave_base"
PORT_NAME = "salmiac.5000"
MARKER = "SALMIAC-BASE-BOOT"
BOOT_TIMEOUT_S = 60.0  # to the first Python line: 7-15 s under TCG here, more when the 2 cores are busy
RUN_TIMEOUT_S = 240.0  # whole run, including loading every default module and running the tools

INIT = r"""#!/usr/bin/python3.11
import ctypes, os, sys, time
print("@MARKER@ python-started", flush=True)
t_start = time.monotonic()
os.environ["PATH"] = "/usr/sbin:/usr/bin"  # the kernel gives PID 1 only HOME and TERM
libc = ctypes.CDLL(None, use_errno=True)
def mount(src, target, fstype):
    if libc.mount(src.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype} on {target}")
mount("proc", "/proc", "proc")
mount("sysfs", "/sys", "sysfs")
mount("devtmpfs", "/dev", "devtmpfs")
import kmod
result = {"uptime_at_python": float(open("/proc/uptime").read().split()[0])}
t0 = time.monotonic()
loaded_first = kmod.load_modules(["virtio_mmio", "virtio_rng", "virtio_console"])
result["first_modules_s"] = round(time.monotonic() - t0, 3)
t0 = time.monotonic()
rnd = os.getrandom(16)
result["getrandom_s"] = round(time.monotonic() - t0, 4)
result["getrandom_len"] = len(rnd)
port = None
deadline = time.monotonic() + 30
while port is None and time.monotonic() < deadline:
    for name_file in sorted(os.listdir("/sys/class/virtio-ports")) if os.path.isdir("/sys/class/virtio-ports") else []:
        try:  # "name" appears only once the host has told the guest the port's name
            with open(f"/sys/class/virtio-ports/{name_file}/name") as f:
                if f.read().strip() == "@PORT@" and os.path.exists(f"/dev/{name_file}"):
                    port = f"/dev/{name_file}"
        except FileNotFoundError:
            pass
    if port is None:
        time.sleep(0.05)
result["port"] = port
t0 = time.monotonic()
loaded_rest = kmod.load_modules(@ALL_MODULES@)
result["all_modules_s"] = round(time.monotonic() - t0, 3)
result["modules_inserted"] = len(loaded_first) + len(loaded_rest)
t0 = time.monotonic()
import asyncio, ctypes, hashlib, json, signal, socket, ssl, subprocess
result["imports_s"] = round(time.monotonic() - t0, 3)
result["sha256"] = hashlib.sha256(b"abc").hexdigest()
result["ssl"] = ssl.OPENSSL_VERSION
async def _hello():
    proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", "echo from-busybox-sh",
                                                stdout=subprocess.PIPE)
    out, _ = await proc.communicate()
    return out.decode().strip()
result["asyncio_subprocess"] = asyncio.run(_hello())
tools = {}
for cmd in (["cryptsetup", "--version"], ["veritysetup", "--version"], ["integritysetup", "--version"],
            ["mke2fs", "-V"], ["e2fsck", "-V"], ["ip", "link"], ["mount", "-t", "tmpfs", "tmpfs", "/mnt"]):
    p = subprocess.run(cmd, capture_output=True, text=True)
    tools[cmd[0]] = [p.returncode, (p.stdout + p.stderr).strip().splitlines()[:1]]
result["tools"] = tools
result["lsmod_has_dm_verity"] = os.path.isdir("/sys/module/dm_verity")
result["pid"] = os.getpid()
kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
stamps = {}
while True:
    try:
        rec = os.read(kmsg, 8192).decode(errors="replace")
    except BlockingIOError:
        break
    head, _, msg = rec.partition(";")
    usec = int(head.split(",")[2])
    for key, needle in (("unpack_start", "Trying to unpack rootfs"), ("unpack_end", "Freeing initrd memory"),
                        ("run_init", "Run /init")):
        if needle in msg and key not in stamps:
            stamps[key] = usec / 1e6
os.close(kmsg)
if "unpack_start" in stamps and "unpack_end" in stamps:
    result["kernel_unpack_s"] = round(stamps["unpack_end"] - stamps["unpack_start"], 3)
result["kernel_run_init_at"] = stamps.get("run_init")
result["init_total_s"] = round(time.monotonic() - t_start, 3)
line = json.dumps(result, sort_keys=True) + "\n"
print("@MARKER@ " + line, end="", flush=True)
fd = os.open(port, os.O_WRONLY)
os.write(fd, line.encode())
os.close(fd)
libc.sync()
libc.reboot(0x4321FEDC)  # RB_POWER_OFF
"""


def _init_cpio() -> bytes:
    script = (
        INIT.replace("@MARKER@", MARKER)
        .replace("@PORT@", PORT_NAME)
        .replace("@ALL_MODULES@", repr(list(DEFAULT_MODULES)))
    )
    out = io.BytesIO()
    writer = CpioWriter(out)
    writer.add_file("init", script.encode(), mode=0o755)
    writer.add_file("kmod.py", Path(kmod.__file__).read_bytes())
    writer.finish()
    return out.getvalue()


def make_initrd(base: Path, dest: Path) -> Path:
    """base (compressed) + zero padding to 4 bytes + uncompressed cpio: the kernel unpacks both in order."""
    data = base.read_bytes()
    dest.write_bytes(data + b"\0" * (-len(data) % 4) + _init_cpio())
    return dest


def qemu_command(kernel: KernelBundle, initrd: Path, sock: Path) -> list[str]:
    return [
        "qemu-system-x86_64",
        "-M", "microvm,acpi=on",
        "-cpu", "max",
        "-m", "512M",
        "-smp", "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(kernel.bzimage),
        "-initrd", str(initrd),
        "-append", f"console=ttyS0 earlyprintk=ttyS0 panic=-1 quiet tsc_early_khz={host_tsc_khz()}",
        "-device", "virtio-rng-device",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=c0,path={sock}",
        "-device", f"virtserialport,chardev=c0,name={PORT_NAME}",
    ]  # fmt: skip


def host_tsc_khz() -> int:
    """Under TCG the guest reads the host's TSC; telling the kernel its rate skips PIT calibration.

    Measured here: with the host loaded (load average 7-10 on 2 cores), 6 of 10 boots without it hung right
    after "tsc: Marking TSC unstable due to could not calculate TSC khz" (no timer tick ever again); with it,
    none did. ``-icount shift=auto`` also fixes it without touching the command line, but boots ~3x slower.
    """
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":", 1)[1]) * 1000)
    return 2_000_000


@dataclass
class Boot:
    started: float
    console: list[tuple[float, str]] = field(default_factory=list)
    port_data: bytearray = field(default_factory=bytearray)
    port_first_at: float | None = None
    returncode: int | None = None

    def first(self, needle: str) -> float | None:
        return next((t for t, line in self.console if needle in line), None)

    def log(self) -> str:
        return "\n".join(f"{t - self.started:8.3f} {line}" for t, line in self.console)


def _read_console(proc: subprocess.Popen[bytes], boot: Boot) -> None:
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        boot.console.append((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))


def _serve_port(listener: socket.socket, boot: Boot, stop: threading.Event) -> None:
    listener.settimeout(0.2)
    conn: socket.socket | None = None
    while not stop.is_set() and conn is None:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
    if conn is None:
        return
    conn.settimeout(0.2)
    with conn:
        while not stop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            if boot.port_first_at is None:
                boot.port_first_at = time.monotonic()
            boot.port_data.extend(chunk)


def boot_once(kernel: KernelBundle, initrd: Path, workdir: Path) -> Boot:
    sock = workdir / "port.sock"
    sock.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen(1)
    stop = threading.Event()
    boot = Boot(started=time.monotonic())
    proc = subprocess.Popen(
        qemu_command(kernel, initrd, sock), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    readers = [
        threading.Thread(target=_read_console, args=(proc, boot), daemon=True),
        threading.Thread(target=_serve_port, args=(listener, boot, stop), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        boot_deadline = boot.started + BOOT_TIMEOUT_S
        run_deadline = boot.started + RUN_TIMEOUT_S
        while proc.poll() is None:
            now = time.monotonic()
            if boot.first(f"{MARKER} python-started") is None and now > boot_deadline:
                break  # stalled boot (DESIGN: ~1 in 8 under TCG): caller retries
            if now > run_deadline:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        boot.returncode = proc.wait(timeout=30)
        readers[0].join(timeout=10)
        stop.set()
        readers[1].join(timeout=10)
        listener.close()
    return boot


@pytest.fixture(scope="module")
def kernel() -> KernelBundle:
    return ensure_kernel(CACHE)


@pytest.fixture(scope="module")
def initrd(kernel: KernelBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    base = build_base(CACHE, kernel, DEFAULT_MODULES)
    yield make_initrd(base, tmp_path_factory.mktemp("initrd") / "initrd.img")


def test_base_boots_python_init_and_reaches_the_host(kernel: KernelBundle, initrd: Path, tmp_path: Path) -> None:
    attempts: list[Boot] = []
    for _attempt in range(2):
        boot = boot_once(kernel, initrd, tmp_path)
        attempts.append(boot)
        if boot.first(f"{MARKER} python-started") is not None:
            break
        print(f"boot attempt stalled; console so far:\n{boot.log()}")
    boot = attempts[-1]
    python_at = boot.first(f"{MARKER} python-started")
    assert python_at is not None, f"Python never started in {len(attempts)} attempts:\n{boot.log()}"
    assert boot.port_data.endswith(b"\n"), f"nothing arrived on {PORT_NAME}:\n{boot.log()}"
    result = json.loads(bytes(boot.port_data).decode())
    assert boot.returncode == 0, f"QEMU did not power off cleanly:\n{boot.log()}"

    assert result["pid"] == 1
    assert result["port"] and result["port"].startswith("/dev/vport")
    assert result["getrandom_len"] == 16 and result["getrandom_s"] < 1.0
    assert result["sha256"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert result["ssl"].startswith("OpenSSL 3")
    assert result["asyncio_subprocess"] == "from-busybox-sh"
    assert result["lsmod_has_dm_verity"] is True
    for tool, (rc, first_line) in result["tools"].items():
        assert rc in (0, 8) if tool == "e2fsck" else rc == 0, (tool, rc, first_line)
    print(
        "\nboot timings:",
        json.dumps(
            {
                "attempts": len(attempts),
                "qemu_start_to_python_s": round(python_at - boot.started, 2),
                "qemu_start_to_port_line_s": round((boot.port_first_at or 0) - boot.started, 2),
                "initrd_bytes": initrd.stat().st_size,
                **{k: v for k, v in result.items() if k.endswith("_s") or k.startswith(("uptime", "kernel"))},
                "modules_inserted": result["modules_inserted"],
                "tools": result["tools"],
            },
            indent=1,
        ),
    )
