"""salmiac.parent.nbd_server against real NBD clients over a Unix socket: nbdinfo, nbdcopy, qemu-img,
qemu-io (FUA writes, TRIM, write-zeroes), plus raw requests the clients refuse to send themselves.

Needs Debian's libnbd-bin, nbdkit and qemu-utils."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from salmiac.enclave.nbd_client import connect_unix, handshake
from salmiac.parent import nbd_server
from salmiac.parent.nbd_server import Export, serve_unix

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("nbdinfo", "nbdcopy", "qemu-img", "qemu-io")),
    reason="needs libnbd-bin and qemu-utils")

RW_SIZE = 8 * 1024 * 1024
RO_SIZE = 3 * 1024 * 1024 + 4096


@dataclass
class Served:
    socket: Path
    rw: Path
    ro: Path
    syncs: list[int]

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"


class _ServerThread:
    """Our asyncio server on its own loop in a thread, so the test process can count fdatasync calls."""

    def __init__(self, path: Path, exports: list[Export], streams: bool) -> None:
        self._path, self._exports, self._streams = path, exports, streams
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            server = self._loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    async def _start(self) -> asyncio.Server:
        if not self._streams:
            return await serve_unix(self._path, self._exports)
        # The generic entry point, as used over streams that are not sockets we listen on.
        infos = nbd_server.prepare_exports(self._exports)
        by_name = {e.name: e for e in self._exports}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await nbd_server.serve_connection(reader, writer, by_name, infos)

        return await asyncio.start_unix_server(handle, path=str(self._path))

    def __enter__(self) -> _ServerThread:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("NBD server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["protocol", "streams"])
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Served]:
    rw, ro = tmp_path / "rw.img", tmp_path / "ro.img"
    ro.write_bytes(os.urandom(RO_SIZE))
    syncs: list[int] = []
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        syncs.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    sock = tmp_path / "nbd.sock"
    exports = [Export("disk", rw, size=RW_SIZE), Export("rootfs", ro, read_only=True)]
    with _ServerThread(sock, exports, streams=request.param == "streams"):
        yield Served(sock, rw, ro, syncs)


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False)


def test_nbdinfo_reports_size_flags_and_list(served: Served) -> None:
    out = run("nbdinfo", "--json", served.uri("disk"))
    assert out.returncode == 0, out.stderr
    (disk,) = json.loads(out.stdout)["exports"]
    assert disk["export-size"] == RW_SIZE
    assert served.rw.stat().st_size == RW_SIZE  # created sparse at the requested size
    assert (disk["is_read_only"], disk["can_flush"], disk["can_fua"], disk["can_trim"], disk["can_zero"],
            disk["can_multi_conn"]) == (False, True, True, True, True, True)
    assert disk["block_size_minimum"] == 1 and disk["block_size_maximum"] == 32 << 20
    out = run("nbdinfo", "--json", served.uri("rootfs"))
    (root,) = json.loads(out.stdout)["exports"]
    assert root["export-size"] == RO_SIZE and root["is_read_only"] is True
    out = run("nbdinfo", "--list", "--json", f"nbd+unix://?socket={served.socket}")
    assert out.returncode == 0, out.stderr
    assert sorted(e["export-name"] for e in json.loads(out.stdout)["exports"]) == ["disk", "rootfs"]
    out = run("nbdinfo", served.uri("missing"))
    assert out.returncode != 0


def test_nbdcopy_both_directions(served: Served, tmp_path: Path) -> None:
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(RW_SIZE))
    out = run("nbdcopy", source, served.uri("disk"))
    assert out.returncode == 0, out.stderr
    assert _sha256(served.rw) == _sha256(source)
    back = tmp_path / "back.img"
    out = run("nbdcopy", served.uri("disk"), back)
    assert out.returncode == 0, out.stderr
    assert _sha256(back) == _sha256(source)
    out = run("nbdcopy", served.uri("rootfs"), tmp_path / "root.img")
    assert out.returncode == 0, out.stderr
    assert _sha256(tmp_path / "root.img") == _sha256(served.ro)


def test_qemu_img_info_and_convert(served: Served, tmp_path: Path) -> None:
    out = run("qemu-img", "info", "--output=json", served.uri("rootfs"))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["virtual-size"] == RO_SIZE
    copy = tmp_path / "copy.raw"
    out = run("qemu-img", "convert", "-O", "raw", served.uri("rootfs"), copy)
    assert out.returncode == 0, out.stderr
    assert _sha256(copy) == _sha256(served.ro)
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(RW_SIZE))
    out = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, served.uri("disk"))
    assert out.returncode == 0, out.stderr
    assert _sha256(served.rw) == _sha256(source)


def test_fua_write_is_synced_before_reply_and_plain_write_is_not(served: Served) -> None:
    out = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", served.uri("disk"))
    assert out.returncode == 0, out.stdout + out.stderr
    plain_syncs = len(served.syncs)
    out = run("qemu-io", "-f", "raw", "-c", "write -f -P 0xa5 65536 64k", served.uri("disk"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(served.syncs) > plain_syncs  # the FUA request was followed by fdatasync
    data = served.rw.read_bytes()
    assert data[:65536] == b"\x5a" * 65536 and data[65536:131072] == b"\xa5" * 65536


def test_trim_and_write_zeroes(served: Served) -> None:
    size = 1 << 20
    out = run("qemu-io", "-f", "raw", "-c", f"write -P 0x11 0 {3 * size}", served.uri("disk"))
    assert out.returncode == 0, out.stdout + out.stderr
    allocated = os.stat(served.rw).st_blocks
    out = run("qemu-io", "-f", "raw",
              "-c", f"discard 0 {size}",                 # NBD_CMD_TRIM
              "-c", f"write -z -u {size} {size}",        # WRITE_ZEROES, holes allowed
              "-c", f"write -z {2 * size} {size}",       # WRITE_ZEROES with NO_HOLE
              served.uri("disk"))
    assert out.returncode == 0, out.stdout + out.stderr
    data = served.rw.read_bytes()
    assert data[size : 3 * size] == bytes(2 * size)
    # Trimmed contents are unspecified by the protocol; ours punches a hole, so they read as zeroes
    # and the file gives the blocks back.
    assert data[:size] == bytes(size)
    assert os.stat(served.rw).st_blocks < allocated


def test_read_only_export_refuses_writes(served: Served, tmp_path: Path) -> None:
    source = tmp_path / "s.img"
    source.write_bytes(os.urandom(4096))
    out = run("nbdcopy", source, served.uri("rootfs"))
    assert out.returncode != 0
    # Clients do not even try on a read-only export, so send the requests by hand.
    sock = connect_unix(str(served.socket))
    with sock:
        export = handshake(sock, "rootfs")
        assert export.read_only and export.size == RO_SIZE
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 4) + b"evil"
                     + struct.pack(">IHHQQI", 0x25609513, 0, 4, 8, 0, 4096)
                     + struct.pack(">IHHQQI", 0x25609513, 0, 0, 9, RO_SIZE, 1))
        replies = _recv_exactly(sock, 3 * 16)
        assert [struct.unpack_from(">IIQ", replies, i * 16) for i in range(3)] == [
            (0x67446698, 1, 7), (0x67446698, 1, 8), (0x67446698, 22, 9)]  # EPERM, EPERM, EINVAL
    assert served.ro.read_bytes()[:4] != b"evil"


def test_out_of_range_write_then_normal_traffic(served: Served) -> None:
    sock = connect_unix(str(served.socket))
    with sock:
        handshake(sock, "disk")
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, RW_SIZE - 2, 4) + b"ABCD"
                     + struct.pack(">IHHQQI", 0x25609513, 0, 1, 2, 0, 4) + b"good"
                     + struct.pack(">IHHQQI", 0x25609513, 0, 0, 3, 0, 4))
        replies = _recv_exactly(sock, 16 * 3 + 4)
        assert struct.unpack_from(">IIQ", replies, 0) == (0x67446698, 28, 1)  # ENOSPC
        assert struct.unpack_from(">IIQ", replies, 16) == (0x67446698, 0, 2)
        assert struct.unpack_from(">IIQ", replies, 32) == (0x67446698, 0, 3) and replies[48:] == b"good"


def test_protocol_violation_drops_only_that_connection(served: Served) -> None:
    sock = connect_unix(str(served.socket))
    with sock:
        handshake(sock, "disk")
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 0xFFFFFFFF))  # 4 GiB write
        sock.settimeout(10)
        assert sock.recv(16) == b""  # hard disconnect, no attempt to buffer 4 GiB
    out = run("nbdinfo", "--size", served.uri("disk"))
    assert out.stdout.strip() == str(RW_SIZE)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"server closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def test_prepare_exports_errors(tmp_path: Path) -> None:
    from salmiac.errors import RequestError

    with pytest.raises(RequestError, match="cannot open"):
        nbd_server.prepare_exports([Export("x", tmp_path / "missing", read_only=True)])
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    with pytest.raises(RequestError, match="smaller than"):
        nbd_server.prepare_exports([Export("x", small, read_only=True, size=4096)])
    with pytest.raises(RequestError, match="twice"):
        nbd_server.prepare_exports([Export("x", small, read_only=True), Export("x", small, read_only=True)])
    with pytest.raises(RequestError, match="not a regular file"):
        nbd_server.prepare_exports([Export("x", tmp_path, read_only=True)])


def test_serve_tcp(tmp_path: Path) -> None:
    async def main() -> bytes:
        server = await nbd_server.serve_tcp("127.0.0.1", 0, [Export("disk", tmp_path / "t.img", size=1 << 20)])
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            "nbdinfo", "--size", f"nbd://127.0.0.1:{port}/disk", stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        server.close()
        await server.wait_closed()
        return out

    assert asyncio.run(main()).strip() == b"1048576"


def test_command_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = str(tmp_path / "s.sock")
    assert nbd_server.main(["--socket", sock, "--export", "no-equals-sign"]) == 2
    assert "expected NAME=PATH" in capsys.readouterr().err
    assert nbd_server.main(["--socket", sock, "--export", f"x={tmp_path}/missing,ro"]) == 2
    assert "cannot open" in capsys.readouterr().err
    assert nbd_server.main(["--socket", sock, "--export", f"x={tmp_path}/f,bogus"]) == 2
    assert "unknown option 'bogus'" in capsys.readouterr().err
