"""Byte streams from the enclave to the parent: AF_VSOCK on Nitro, virtio-serial ports in emulation.

The port numbers and names are shared with the parent in ``protocol.channels``. Which transport exists is a
property of the machine (the Nitro hypervisor offers vsock and no virtio-serial; our emulator the opposite), so
detecting it is safe: the parent cannot add devices to a real enclave.
"""

from __future__ import annotations

import errno
import os
import socket
import time

from salmiac.framepump import FdStream
from salmiac.protocol.channels import PARENT_CID, serial_port_name

VIRTIO_PORTS_SYSFS = "/sys/class/virtio-ports"


class ChannelError(OSError):
    pass


class Channel:
    """A connected stream with blocking ``read``/``write_all`` on one file descriptor."""

    def __init__(self, fd: int, *, sock: socket.socket | None = None, name: str = "") -> None:
        self._fd = fd
        self._sock = sock  # keeps a vsock socket object alive
        self.name = name

    def fileno(self) -> int:
        return self._fd

    def stream(self) -> socket.socket | FdStream:
        """The channel as the frame pump's stream: the vsock socket itself, or the serial port's fd."""
        return self._sock if self._sock is not None else FdStream(self._fd)

    def read(self, size: int = 65536) -> bytes:
        while True:
            try:
                return os.read(self._fd, size)
            except InterruptedError:
                continue

    def write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:
                time.sleep(0.001)  # serial ports may be non-blocking; back off briefly
                continue
            view = view[n:]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        else:
            os.close(self._fd)


def find_serial_port(port: int) -> str | None:
    """/dev path of the virtio-serial port for ``port``, or None when there is none."""
    wanted = serial_port_name(port)
    try:
        names = os.listdir(VIRTIO_PORTS_SYSFS)
    except OSError:
        return None
    for dev in sorted(names):
        try:
            with open(os.path.join(VIRTIO_PORTS_SYSFS, dev, "name")) as f:
                if f.read().strip() == wanted:
                    return "/dev/" + dev
        except OSError:
            continue
    return None


VIRTIO_DEVICES_SYSFS = "/sys/bus/virtio/devices"
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4
VIRTIO_ID_VSOCK = 19
VIRTIO_ID_NSM = 33
SERIAL = "serial"
VSOCK = "vsock"


def virtio_device_ids() -> set[int]:
    ids: set[int] = set()
    try:
        devices = os.listdir(VIRTIO_DEVICES_SYSFS)
    except OSError:
        return ids
    for dev in devices:
        try:
            with open(os.path.join(VIRTIO_DEVICES_SYSFS, dev, "device")) as f:
                ids.add(int(f.read().strip(), 16))
        except (OSError, ValueError):
            continue
    return ids


def detect_transport(ids: set[int]) -> str:
    """SERIAL in our emulator (virtio-console, no vsock device), VSOCK otherwise (Nitro)."""
    if VIRTIO_ID_VSOCK not in ids and VIRTIO_ID_CONSOLE in ids:
        return SERIAL
    return VSOCK


def connect(port: int, transport: str, *, timeout: float = 30.0) -> Channel:
    """Open the stream for ``port``; retries while the device or the parent's listener is not there yet."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        if transport == SERIAL:
            path = find_serial_port(port)
            if path is not None:
                try:
                    return Channel(os.open(path, os.O_RDWR | os.O_CLOEXEC), name=path)
                except OSError as exc:
                    last = exc
        else:
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect((PARENT_CID, port))
                return Channel(sock.fileno(), sock=sock, name=f"vsock:{PARENT_CID}:{port}")
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.ENODEV):
                    raise ChannelError(exc.errno, f"vsock port {port}: {exc.strerror}") from exc
        time.sleep(0.05)
    raise ChannelError(errno.ETIMEDOUT, f"no channel for port {port}: {last}")
