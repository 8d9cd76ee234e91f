"""Enclave side of NBD: handshake in Python, then the kernel's NBD client does the transmission.

Stdlib only (it runs from the initramfs, with no nbd-client binary). Two parts, split on purpose:

* ``handshake(sock, export_name)``: fixed newstyle negotiation with NBD_OPT_GO through the sans-IO
  ``salmiac.protocol.nbd.NbdClient``, over any connected stream socket (AF_VSOCK in the enclave,
  AF_UNIX in tests). Everything the parent says is checked there: the parent is not trusted, and the
  data itself is checked later by dm-verity (read-only rootfs) or LUKS2 (read-write disk).
* ``KernelNbd.attach(device, sock, export)``: the ioctls from linux/nbd.h that hand the socket to the
  kernel (NBD_SET_BLKSIZE, NBD_SET_SIZE_BLOCKS, NBD_SET_FLAGS, NBD_SET_SOCK) and a thread blocked in
  NBD_DO_IT for as long as the device lives; ``disconnect()`` sends NBD_DISCONNECT and NBD_CLEAR_SOCK.
  ``attach`` returns only once the device shows the export's size: the kernel keeps the capacity at 0 until
  NBD_DO_IT has started in that thread, and a reader in between would see an empty disk (``cryptsetup isLuks``
  then says "not LUKS" and a formatted disk looks blank).
  This part needs the nbd kernel module, so it is exercised inside the QEMU guest, not on the host.

NBD_SET_SIZE_BLOCKS is used instead of NBD_SET_SIZE because ``fcntl.ioctl`` passes an integer argument
as a C int, which would truncate byte sizes of 2 GiB and more; block counts fit for exports up to
2^31 blocks (8 TiB at 4 KiB).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from salmiac.errors import RuntimeFailure
from salmiac.protocol import nbd

# linux/nbd.h: _IO(0xab, n) == 0xab00 | n
NBD_SET_SOCK = 0xAB00
NBD_SET_BLKSIZE = 0xAB01
NBD_SET_SIZE = 0xAB02
NBD_DO_IT = 0xAB03
NBD_CLEAR_SOCK = 0xAB04
NBD_CLEAR_QUE = 0xAB05
NBD_SET_SIZE_BLOCKS = 0xAB07
NBD_DISCONNECT = 0xAB08
NBD_SET_TIMEOUT = 0xAB09
NBD_SET_FLAGS = 0xAB0A
BLKGETSIZE64 = 0x80081272  # linux/fs.h: _IOR(0x12, 114, size_t)

HANDSHAKE_TIMEOUT_S = 30.0
RECV_CHUNK = 64 * 1024
KERNEL_BLOCK_SIZE = 4096  # what dm-verity and ext4 use; the kernel accepts 512..PAGE_SIZE
START_TIMEOUT_S = 30.0  # NBD_DO_IT up and the capacity set; a thread start, even under TCG well below a second
_C_INT_MAX = (1 << 31) - 1


class NbdClientError(RuntimeFailure):
    """The NBD server refused us, broke the protocol, or the kernel refused the device."""


@dataclass(frozen=True)
class NbdExport:
    """What the server granted with NBD_OPT_GO."""

    name: str
    size: int
    flags: int
    min_block: int
    preferred_block: int
    max_block: int

    @property
    def read_only(self) -> bool:
        return bool(self.flags & nbd.FLAG_READ_ONLY)


def connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise NbdClientError(f"cannot connect to NBD server at {path}: {exc.strerror}") from exc
    return sock


def connect_vsock(cid: int, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        sock.connect((cid, port))
    except OSError as exc:
        sock.close()
        raise NbdClientError(f"cannot connect to NBD server at vsock {cid}:{port}: {exc.strerror}") from exc
    return sock


def handshake(sock: socket.socket, export_name: str, *, timeout: float | None = HANDSHAKE_TIMEOUT_S) -> NbdExport:
    """Negotiate ``export_name`` with NBD_OPT_GO. On return the socket is at the start of transmission,
    in blocking mode, with nothing of the server's read ahead (the kernel takes over from there)."""
    client = nbd.NbdClient(export_name)
    sock.settimeout(timeout)
    try:
        while True:
            event = client.next_event()
            if event is nbd.NEED_DATA:
                # The server sends nothing unasked after the GO reply, so reading ahead cannot steal
                # transmission bytes from the kernel; checked below all the same.
                client.receive_data(sock.recv(RECV_CHUNK))
                continue
            match event:
                case nbd.Greeting():
                    for out in client.handshake_events():
                        sock.sendall(client.send(out))
                case nbd.ExportDetails(option=nbd.Opt.GO):
                    break
                case nbd.OptionError(reply=reply, message=message):
                    raise NbdClientError(f"NBD server refused export {export_name!r}: "
                                         f"{_reply_name(reply)} {message}".rstrip())
                case nbd.ConnectionClosed():
                    raise NbdClientError("NBD server closed the connection during the handshake")
                case _:
                    raise NbdClientError(f"unexpected {type(event).__name__} during the NBD handshake")
        leftover, _ = client.trailing_data
        if leftover:
            raise NbdClientError(f"NBD server sent {len(leftover)} unexpected bytes after the handshake")
    except nbd.ProtocolError as exc:
        raise NbdClientError(f"NBD handshake for export {export_name!r} failed: {exc}") from exc
    except TimeoutError as exc:
        raise NbdClientError(f"NBD handshake for export {export_name!r} timed out") from exc
    except OSError as exc:
        raise NbdClientError(f"NBD handshake for export {export_name!r} failed: {exc}") from exc
    sock.settimeout(None)
    details = client.export
    assert details is not None  # set with the ExportDetails event
    return NbdExport(export_name, details.size, details.flags, details.min_block, details.preferred_block,
                     details.max_block)


def _reply_name(reply: int) -> str:
    try:
        return f"NBD_REP_{nbd.Rep(reply).name}"
    except ValueError:
        return f"reply {reply:#x}"


class KernelNbd:
    """A /dev/nbdN bound to a negotiated socket. Use ``attach``; ``disconnect()`` when done."""

    def __init__(self, device: str, fd: int, sock: socket.socket) -> None:
        self.device = device
        self._fd = fd
        self._sock = sock
        self._thread = threading.Thread(target=self._do_it, name=f"nbd-do-it {device}", daemon=True)
        self.error: OSError | None = None  # why NBD_DO_IT returned, if it failed

    @classmethod
    def attach(cls, device: str, sock: socket.socket, export: NbdExport, *,
               block_size: int = KERNEL_BLOCK_SIZE, timeout_s: int | None = None) -> KernelNbd:
        """Configure ``device`` (e.g. /dev/nbd0) for ``export`` and start NBD_DO_IT in a thread."""
        if export.min_block > block_size:
            raise NbdClientError(f"NBD export {export.name!r} needs blocks of {export.min_block} bytes, "
                                 f"more than the device's {block_size}")
        if export.size % block_size:
            raise NbdClientError(f"NBD export {export.name!r} size {export.size} is not a multiple of "
                                 f"{block_size} bytes")
        blocks = export.size // block_size
        if blocks > _C_INT_MAX:
            raise NbdClientError(f"NBD export {export.name!r} is too large ({export.size} bytes)")
        try:
            fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise NbdClientError(f"cannot open {device}: {exc.strerror}") from exc
        try:
            fcntl.ioctl(fd, NBD_SET_BLKSIZE, block_size)
            fcntl.ioctl(fd, NBD_SET_SIZE_BLOCKS, blocks)
            fcntl.ioctl(fd, NBD_SET_FLAGS, export.flags)
            if timeout_s is not None:
                fcntl.ioctl(fd, NBD_SET_TIMEOUT, timeout_s)
            fcntl.ioctl(fd, NBD_SET_SOCK, sock.fileno())
        except OSError as exc:
            os.close(fd)
            raise NbdClientError(f"{device}: NBD setup ioctl failed: {exc.strerror}") from exc
        attached = cls(device, fd, sock)
        attached._thread.start()
        try:
            attached._wait_for_capacity(export.size, START_TIMEOUT_S)
        except NbdClientError:
            with contextlib.suppress(NbdClientError):  # the start failure is what the caller needs to hear
                attached.disconnect(timeout_s=5.0)
            raise
        return attached

    def _wait_for_capacity(self, size: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if struct.unpack("=Q", fcntl.ioctl(self._fd, BLKGETSIZE64, bytes(8)))[0] == size:
                    return
            except OSError as exc:
                raise NbdClientError(f"{self.device}: cannot read its size: {exc.strerror}") from exc
            if not self._thread.is_alive():
                why = self.error.strerror if self.error else "NBD_DO_IT returned"
                raise NbdClientError(f"{self.device}: the kernel did not start the device: {why}")
            if time.monotonic() > deadline:
                raise NbdClientError(f"{self.device}: the kernel did not show the export's size within "
                                     f"{timeout_s:.0f}s")
            time.sleep(0.005)

    def _do_it(self) -> None:
        # Blocks (GIL released) until the device is disconnected or the socket dies.
        try:
            fcntl.ioctl(self._fd, NBD_DO_IT)
        except OSError as exc:
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def disconnect(self, timeout_s: float = 30.0) -> None:
        """Flush and disconnect (the kernel sends NBD_CMD_DISC), then release the socket and device."""
        try:
            if self._thread.is_alive():
                fcntl.ioctl(self._fd, NBD_DISCONNECT)
                # The server closes after NBD_CMD_DISC, but over the emulator's serial bridge that close never
                # reaches this socket (a virtio-serial port has no EOF): end our read side so NBD_DO_IT returns.
                # Every request was answered before DISC (the kernel drains them), so nothing is cut short.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RD)
            self._thread.join(timeout_s)
            fcntl.ioctl(self._fd, NBD_CLEAR_SOCK)
        except OSError as exc:
            raise NbdClientError(f"{self.device}: NBD disconnect failed: {exc.strerror}") from exc
        finally:
            if not self._thread.is_alive():
                os.close(self._fd)
                self._sock.close()
        if self._thread.is_alive():
            raise NbdClientError(f"{self.device}: NBD_DO_IT did not return within {timeout_s}s")
