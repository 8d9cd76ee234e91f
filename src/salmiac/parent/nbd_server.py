"""asyncio NBD server for file-backed exports, driving the sans-IO ``salmiac.protocol.nbd.NbdServer``.

It runs over any asyncio stream pair (Unix socket, TCP, or a vsock / virtio-serial stream handed to
``serve_connection``). Requests are handled in order, one at a time per connection; each reply is queued
on the transport as soon as its request is done, so a pipelining client (the kernel, nbdcopy) keeps the
socket busy. File I/O uses os.pread/os.preadv into a per-connection buffer that is reused, os.pwrite,
fdatasync for FLUSH and FUA, and fallocate(PUNCH_HOLE / ZERO_RANGE) for TRIM and WRITE_ZEROES where
the filesystem supports them.

The enclave is not trusted: every request is bounds-checked by the protocol core before it reaches a
file, and payload sizes are capped at ``MAX_REQUEST`` before any byte is buffered.

Manual use::

    python -m salmiac.parent.nbd_server --socket /tmp/nbd.sock --export disk=/var/tmp/disk.img
    nbdinfo 'nbd+unix:///disk?socket=/tmp/nbd.sock'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import stat
import sys
import typing
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salmiac.errors import RequestError, SalmiacError
from salmiac.protocol import nbd
from salmiac.protocol.nbd import (
    NEED_DATA,
    PAUSED,
    BadRequest,
    ClientFlags,
    ConnectionClosed,
    Disconnect,
    Errno,
    ExportInfo,
    Flush,
    Greeting,
    NbdServer,
    Read,
    ReadReply,
    Reply,
    Trim,
    Write,
    WriteZeroes,
)

log = logging.getLogger(__name__)

STREAM_LIMIT = 4 * 1024 * 1024  # StreamReader buffer: lets one read() return a whole large WRITE
RECV_CHUNK = 4 * 1024 * 1024
ZERO_CHUNK = 1024 * 1024  # writing zeroes by hand when fallocate cannot
SOCKET_BUFFER = 4 * 1024 * 1024
REPLY_HEADROOM = nbd.SIMPLE_REPLY_SIZE  # so one send() takes a whole large READ reply
# Why pread/pwrite run on the event loop but fdatasync, TRIM and WRITE_ZEROES do not: page-cache copies
# of up to 32 MiB take microseconds to milliseconds, and handing them to a thread measured slower
# (bench/bench_nbd.py: the thread hand-off and GIL ping-pong cost more than the copy), whereas fdatasync
# waits for the disk and zeroing has no length cap; either would stall every other connection (and
# whatever else shares the loop) for that long.

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


@dataclass(frozen=True)
class Export:
    """A file (or block device) served under ``name``.

    ``size`` None serves the whole file. For a writable export a larger ``size`` grows the file (sparse),
    a smaller one serves only that prefix; a read-only export must already be at least ``size`` long.
    """

    name: str
    path: Path
    read_only: bool = False
    size: int | None = None


def _file_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    raise RequestError("not a regular file or block device")


def prepare_exports(exports: Sequence[Export]) -> dict[str, ExportInfo]:
    """Check every export once, create/grow writable files to their size; return what to advertise."""
    infos: dict[str, ExportInfo] = {}
    for export in exports:
        if export.name in infos:
            raise RequestError(f"NBD export {export.name!r} is defined twice")
        flags = os.O_RDONLY if export.read_only else os.O_RDWR | os.O_CREAT
        try:
            fd = os.open(export.path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise RequestError(f"NBD export {export.name!r}: cannot open {export.path}: {exc.strerror}") from exc
        try:
            size = _file_size(fd)
            if export.size is not None:
                if export.size < 0:
                    raise RequestError("negative size")
                if export.size > size:
                    if export.read_only:
                        raise RequestError(f"file is {size} bytes, smaller than the size {export.size}")
                    os.ftruncate(fd, export.size)
                size = export.size
            infos[export.name] = ExportInfo(size=size, read_only=export.read_only, multi_conn=True)
        except (OSError, RequestError, nbd.LocalProtocolError) as exc:
            raise RequestError(f"NBD export {export.name!r} ({export.path}): {exc}") from exc
        finally:
            os.close(fd)
    return infos


class _Fallocate:
    """fallocate(2) with mode flags (os.posix_fallocate has none); None when libc lacks it."""

    def __init__(self) -> None:
        self._fn: Callable[[int, int, int, int], int] | None = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            self._fn = fn

    def __call__(self, fd: int, mode: int, offset: int, length: int) -> bool:
        """True if done; False if the filesystem does not support ``mode``; OSError otherwise."""
        if self._fn is None:
            return False
        if self._fn(fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise OSError(err, os.strerror(err))


_fallocate = _Fallocate()


def _wire_errno(exc: OSError) -> int:
    """Map a host errno to one of the values the protocol allows."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return Errno.ENOSPC
    if exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
        return Errno.EPERM
    return Errno.EIO


class _OpenExport:
    """The file behind the export a connection chose, and the I/O each command needs."""

    def __init__(self, export: Export) -> None:
        flags = os.O_RDONLY if export.read_only else os.O_RDWR
        self.fd = os.open(export.path, flags | os.O_CLOEXEC)
        self._buf = bytearray()
        self._can_punch = True
        self._can_zero_range = True

    def close(self) -> None:
        os.close(self.fd)

    def read(self, offset: int, length: int) -> memoryview:
        """Read into the connection's reusable buffer, after room for the reply header (so header and
        data leave in one send); the view is valid until the next read."""
        if len(self._buf) < REPLY_HEADROOM + length:
            self._buf = bytearray(REPLY_HEADROOM + max(length, 2 * len(self._buf), 64 * 1024))
        view = memoryview(self._buf)[REPLY_HEADROOM : REPLY_HEADROOM + length]
        done = 0
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                # The file shrank under us (someone else truncated it): the export reads as zeroes there.
                view[done:] = bytes(length - done)
                break
            done += n
        return view

    def framed(self, header: bytes | bytearray | memoryview, length: int) -> memoryview | None:
        """Header + the data of the last ``read``, contiguous in the buffer; None if it does not fit."""
        if len(header) != REPLY_HEADROOM:
            return None
        self._buf[:REPLY_HEADROOM] = header
        return memoryview(self._buf)[: REPLY_HEADROOM + length]

    def release_buffer(self) -> None:
        """Stop reusing the buffer: the transport still holds part of it (since Python 3.12 it queues
        views instead of copying what it could not send at once)."""
        self._buf = bytearray()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int) -> None:
        # TRIM is a hint: when holes cannot be punched, doing nothing is correct.
        if self._can_punch and length:
            self._can_punch = _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int, no_hole: bool) -> None:
        if not length:
            return
        if not no_hole and self._can_punch:
            self._can_punch = _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if self._can_punch:
                return
        if self._can_zero_range:
            self._can_zero_range = _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                                              offset, length)
            if self._can_zero_range:
                return
        zeroes = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.write(offset, memoryview(zeroes)[:n])
            offset += n


class _Sink(typing.Protocol):
    """The part of asyncio.StreamWriter the server uses (``_ChunkProtocol`` provides it too)."""

    @property
    def transport(self) -> asyncio.WriteTransport: ...
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None: ...
    async def drain(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


async def serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           exports: Mapping[str, Export], infos: Mapping[str, ExportInfo]) -> None:
    """Serve one NBD client over any asyncio stream pair until it disconnects (protocol errors end
    the connection, logged). ``infos`` is what ``prepare_exports(exports)`` returned."""

    async def read_chunk() -> bytes:
        return await reader.read(RECV_CHUNK)

    await _serve(read_chunk, writer, exports, infos)


class _ChunkProtocol(asyncio.Protocol):
    """Socket protocol for serve_unix/serve_tcp: hands each received bytes object to the NBD core as
    is. A StreamReader would copy every byte twice (into its buffer, then out of it), which measured
    as a large part of WRITE throughput. Also acts as the writer (a ``_Sink``), with flow control."""

    def __init__(self, exports: Mapping[str, Export], infos: Mapping[str, ExportInfo]) -> None:
        self._exports, self._infos = exports, infos
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._eof = False
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._task = asyncio.get_running_loop().create_task(
            _serve(self.read_chunk, self, self._exports, self._infos))

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._queued += len(data)
        if self._queued > 2 * STREAM_LIMIT and not self._reading_paused and self._transport is not None:
            self._transport.pause_reading()
            self._reading_paused = True
        self._wake("_waiter")

    def eof_received(self) -> bool:
        self._eof = True
        self._wake("_waiter")
        return True  # keep the transport: replies to outstanding requests may still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake("_waiter")
        self._wake("_drain_waiter")
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake("_drain_waiter")

    def _wake(self, which: str) -> None:
        waiter = getattr(self, which)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        setattr(self, which, None)

    async def read_chunk(self) -> bytes:
        while not self._chunks and not self._eof:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        if self._reading_paused and self._queued <= STREAM_LIMIT and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return chunk

    # _Sink
    @property
    def transport(self) -> asyncio.WriteTransport:
        assert self._transport is not None
        return self._transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.transport.writelines(data)

    async def drain(self) -> None:
        if self._closed.done():
            raise ConnectionResetError("Connection lost")
        while self._writing_paused and not self._closed.done():
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        self.transport.close()

    async def wait_closed(self) -> None:
        await self._closed


async def _serve(read_chunk: Callable[[], Awaitable[bytes]], writer: _Sink,
                 exports: Mapping[str, Export], infos: Mapping[str, ExportInfo]) -> None:
    conn = NbdServer(infos)
    loop = asyncio.get_running_loop()
    _enlarge_socket_buffers(writer)
    opened: _OpenExport | None = None
    try:
        writer.write(conn.send(Greeting()))
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                await writer.drain()
                conn.receive_data(await read_chunk())
                continue
            if event is PAUSED:  # cannot happen: every option is answered below before asking again
                raise nbd.LocalProtocolError("NBD server paused with no answer to send")
            match event:
                case Read(handle=handle, offset=offset, length=length):
                    assert opened is not None
                    try:
                        data = opened.read(offset, length)
                    except OSError as exc:
                        writer.write(conn.send(Reply(handle, _wire_errno(exc))))
                    else:
                        header, payload = conn.send_with_data_passthrough(ReadReply(handle, data))
                        whole = opened.framed(header, length)
                        if whole is None:
                            writer.writelines([header, payload])
                        else:
                            writer.write(whole)
                        if writer.transport.get_write_buffer_size():
                            opened.release_buffer()
                case Write() | Flush() | Trim() | WriteZeroes():
                    assert opened is not None
                    if isinstance(event, Write) and not event.fua:
                        error = _do_write(opened, event)
                    else:  # may wait for the disk, or zero gigabytes (its length is not capped)
                        error = await loop.run_in_executor(None, _do_write, opened, event)
                    writer.write(conn.send(Reply(event.handle, error)))
                case BadRequest():
                    writer.write(conn.send(conn.reply_for(event)))
                case ClientFlags():
                    pass
                case Disconnect() | ConnectionClosed():
                    break
                case nbd.Event():  # a handshake option
                    writer.writelines(conn.send_with_data_passthrough(conn.reply_for(event)))
                    if opened is None and conn.export_name is not None:
                        opened = _OpenExport(exports[conn.export_name])
                        log.debug("NBD client attached to export %r", conn.export_name)
            if conn.state is nbd.State.CLOSED:  # after OPT_ABORT
                break
        await writer.drain()
    except nbd.ProtocolError as exc:
        log.warning("NBD connection dropped: %s", exc)
    except (ConnectionError, OSError) as exc:
        # Clients often hang up right after an option (nbdinfo after NBD_OPT_ABORT): not worth a warning.
        level = logging.WARNING if conn.state is nbd.State.TRANSMISSION else logging.DEBUG
        log.log(level, "NBD connection lost: %s", exc)
    finally:
        if opened is not None:
            opened.close()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _enlarge_socket_buffers(writer: _Sink) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return  # not a socket (a pipe or a custom transport): keep its defaults
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def _do_write(opened: _OpenExport, event: Write | Flush | Trim | WriteZeroes) -> int:
    """Perform one modifying command; the NBD error to reply with (0 = done, durable if FUA)."""
    try:
        match event:
            case Write(offset=offset, data=data, fua=fua):
                opened.write(offset, data)
            case Flush():
                opened.sync()
                return Errno.OK
            case Trim(offset=offset, length=length, fua=fua):
                opened.trim(offset, length)
            case WriteZeroes(offset=offset, length=length, fua=fua, no_hole=no_hole):
                opened.write_zeroes(offset, length, no_hole)
        if fua:
            opened.sync()  # proto.md: no reply to a FUA command before its data is on stable storage
    except OSError as exc:
        log.warning("NBD %s failed: %s", type(event).__name__, exc)
        return _wire_errno(exc)
    return Errno.OK


def _protocol_factory(exports: Sequence[Export]) -> Callable[[], _ChunkProtocol]:
    infos = prepare_exports(exports)
    by_name = {e.name: e for e in exports}
    return lambda: _ChunkProtocol(by_name, infos)


async def serve_unix(path: str | Path, exports: Sequence[Export]) -> asyncio.Server:
    """Listen on a Unix socket at ``path`` (replacing a stale socket file). Returns the started server."""
    factory = _protocol_factory(exports)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    return await asyncio.get_running_loop().create_unix_server(factory, path=os.fspath(path))


async def serve_socket(sock: socket.socket, exports: Sequence[Export]) -> asyncio.Server:
    """Serve on a listening socket made by the caller (AF_VSOCK on a Nitro parent)."""
    factory = _protocol_factory(exports)
    return await asyncio.get_running_loop().create_server(factory, sock=sock)


async def serve_tcp(host: str, port: int, exports: Sequence[Export]) -> asyncio.Server:
    """Listen on TCP ``host:port`` (port 0 picks one; see ``server.sockets``)."""
    factory = _protocol_factory(exports)
    return await asyncio.get_running_loop().create_server(factory, host=host, port=port)


def _parse_export(spec: str) -> Export:
    """NAME=PATH[,ro][,size=BYTES]"""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise RequestError(f"--export {spec!r}: expected NAME=PATH[,ro][,size=BYTES]")
    path, *opts = rest.split(",")
    read_only, size = False, None
    for opt in opts:
        if opt == "ro":
            read_only = True
        elif opt.startswith("size=") and opt[5:].isdigit():
            size = int(opt[5:])
        else:
            raise RequestError(f"--export {spec!r}: unknown option {opt!r}")
    return Export(name, Path(path), read_only, size)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m salmiac.parent.nbd_server",
                                     description="Serve files over NBD (for manual tests).")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="Unix socket path")
    where.add_argument("--listen", metavar="HOST:PORT", help="TCP address")
    parser.add_argument("--export", action="append", required=True, metavar="NAME=PATH[,ro][,size=N]")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(name)s: %(message)s")

    async def run() -> None:
        exports = [_parse_export(spec) for spec in args.export]
        if args.socket:
            server = await serve_unix(args.socket, exports)
        else:
            host, _, port = args.listen.rpartition(":")
            if not port.isdigit():
                raise RequestError(f"--listen {args.listen!r}: expected HOST:PORT")
            server = await serve_tcp(host or "127.0.0.1", int(port), exports)
        names = ", ".join(repr(e.name) for e in exports)
        log.info("serving %s on %s", names, ", ".join(str(s.getsockname()) for s in server.sockets))
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except SalmiacError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
