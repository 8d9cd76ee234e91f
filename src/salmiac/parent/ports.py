"""Parent ports whose traffic is bulk data (network frames, later block I/O), served by blocking code in a thread.

The control and heartbeat ports are small and asyncio-driven (``session``). A bulk port instead hands its one
connection to a blocking pump (``framepump.FramePump`` for the network): a poll loop over raw sockets moves more
bytes per CPU second than an event loop with a callback per chunk. The enclave connects once per boot; in
emulation the listener is a Unix socket that QEMU connects to (the virtio-serial port's host end), on Nitro an
AF_VSOCK socket the enclave connects to.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable

log = logging.getLogger("salmiac.parent")

JOIN_SECONDS = 10.0


class BulkPort:
    """Accept one connection on ``listener`` and run ``serve(conn)`` in a thread; ``stop()`` ends both."""

    def __init__(self, name: str, listener: socket.socket, serve: Callable[[socket.socket], None],
                 stop: Callable[[], None]) -> None:
        self.name = name
        self._listener = listener
        self._serve = serve
        self._stop_serving = stop
        self._conn: socket.socket | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"port-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return  # stopped before the enclave connected
        finally:
            with contextlib.suppress(OSError):
                self._listener.close()
        self._conn = conn
        try:
            if not self._stopping:
                self._serve(conn)
        except Exception as exc:  # a failing relay must not take the run down: it is reported
            log.warning("%s port: %s", self.name, exc)
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping = True
        self._stop_serving()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with contextlib.suppress(OSError):
            self._listener.close()
        if self._thread.is_alive():
            self._thread.join(JOIN_SECONDS)


def unix_listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.bind(path)
    s.listen(1)
    return s


VMADDR_CID_ANY = 0xFFFFFFFF


def vsock_listener(port: int) -> socket.socket:
    """A listening AF_VSOCK socket on ``port`` for any CID (on a Nitro parent, the enclave connects to CID 3)."""
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind((VMADDR_CID_ANY, port))
        s.listen(1)
    except BaseException:
        s.close()
        raise
    return s
