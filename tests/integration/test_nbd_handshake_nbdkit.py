"""The enclave's NBD handshake (and the sans-IO client's transmission) against Debian's nbdkit, an
independent server: `nbdkit memory` and `nbdkit file`. The kernel half (ioctls, NBD_DO_IT) needs the nbd
module, which this host lacks; it runs inside the QEMU guest."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from salmiac.enclave.nbd_client import NbdClientError, NbdExport, connect_unix, handshake
from salmiac.protocol import nbd

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")


def _start_nbdkit(sock: Path, *args: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nbdkit exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(str(sock)) == 0:
                    return proc
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("nbdkit did not start")


def test_handshake_with_nbdkit_memory(tmp_path: Path) -> None:
    sock = tmp_path / "mem.sock"
    proc = _start_nbdkit(sock, "memory", "16M")
    try:
        with connect_unix(str(sock)) as conn:
            export = handshake(conn, "")
            assert export == NbdExport("", 16 << 20, export.flags, export.min_block, export.preferred_block,
                                       export.max_block)
            assert not export.read_only
            assert export.flags & nbd.FLAG_SEND_FLUSH and export.flags & nbd.FLAG_SEND_TRIM
            assert conn.gettimeout() is None  # blocking again, ready for the kernel
            _transmission_round_trip(conn, export)
    finally:
        proc.terminate()
        proc.wait(10)


def test_handshake_with_nbdkit_file_read_only(tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    content = os.urandom(1 << 20)
    image.write_bytes(content)
    sock = tmp_path / "file.sock"
    proc = _start_nbdkit(sock, "-r", "file", str(image))
    try:
        with connect_unix(str(sock)) as conn:
            export = handshake(conn, "")
            assert export.size == len(content) and export.read_only
            cli = _transmission_client(export)
            conn.sendall(cli.send(nbd.Read(1, 4096, 65536)))
            (reply,) = _replies(conn, cli, 1)
            assert isinstance(reply, nbd.ReadReply) and bytes(reply.data) == content[4096 : 4096 + 65536]
            # A read-only export is refused by our client before a byte goes out.
            with pytest.raises(nbd.LocalProtocolError, match="read-only"):
                _transmission_client(export).send(nbd.Write(2, 0, b"x"))
    finally:
        proc.terminate()
        proc.wait(10)


def test_handshake_server_hangs_up_after_option(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    path = tmp_path / "closing.sock"
    listener.bind(str(path))
    listener.listen(1)
    with listener, connect_unix(str(path)) as conn:
        peer, _ = listener.accept()
        peer.sendall(b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03")
        hung_up = threading.Thread(target=_read_then_close, args=(peer, 4 + 16 + 4 + 4 + 2 + 2))
        hung_up.start()
        with pytest.raises(NbdClientError, match="closed the connection"):
            handshake(conn, "disk", timeout=10)
        hung_up.join(10)
    with pytest.raises(NbdClientError, match="cannot connect"):
        connect_unix(str(tmp_path / "nobody.sock"))


def _read_then_close(peer: socket.socket, size: int) -> None:
    """Take the client flags and its NBD_OPT_GO, then hang up without answering."""
    peer.settimeout(10)
    got = 0
    while got < size:
        chunk = peer.recv(size - got)
        if not chunk:
            break
        got += len(chunk)
    peer.close()


def test_handshake_with_not_an_nbd_server(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    path = tmp_path / "http.sock"
    listener.bind(str(path))
    listener.listen(1)
    with listener, connect_unix(str(path)) as conn:
        peer, _ = listener.accept()
        with peer:
            peer.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            with pytest.raises(NbdClientError, match="not an NBD server"):
                handshake(conn, "disk", timeout=10)


def test_handshake_times_out_on_silent_server(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    path = tmp_path / "silent.sock"
    listener.bind(str(path))
    listener.listen(1)
    with listener, connect_unix(str(path)) as conn:
        peer, _ = listener.accept()
        with peer, pytest.raises(NbdClientError, match="timed out"):
            handshake(conn, "disk", timeout=0.2)


def _transmission_client(export: NbdExport) -> nbd.NbdClient:
    """A client state machine already in transmission for ``export``, to drive requests by hand."""
    cli = nbd.NbdClient(export.name)
    cli._cs.state = nbd.State.TRANSMISSION
    cli.export = nbd.ExportDetails(nbd.Opt.GO, export.size, export.flags, export.min_block,
                                   export.preferred_block, export.max_block)
    return cli


def _replies(conn: socket.socket, cli: nbd.NbdClient, count: int) -> list[nbd.Event]:
    conn.settimeout(10)
    got: list[nbd.Event] = []
    while len(got) < count:
        ev = cli.next_event()
        if ev is nbd.NEED_DATA:
            cli.receive_data(conn.recv(1 << 20))
            continue
        assert isinstance(ev, nbd.Event)
        got.append(ev)
    conn.settimeout(None)
    return got


def _transmission_round_trip(conn: socket.socket, export: NbdExport) -> None:
    cli = _transmission_client(export)
    block = os.urandom(256 * 1024)
    # NBD does not order in-flight requests (nbdkit serves them on parallel threads): the write that the
    # zeroing overlaps must be acknowledged before the zeroing is sent.
    conn.sendall(cli.send(nbd.Write(1, 0, block, fua=True)))
    (written,) = _replies(conn, cli, 1)
    conn.sendall(b"".join(cli.send(ev) for ev in [
        nbd.WriteZeroes(2, 65536, 4096, no_hole=True),
        nbd.Trim(3, 131072, 4096),
        nbd.Flush(4),
        nbd.Read(5, 0, 65536),
        nbd.Read(6, export.size - 512, 512),
    ]))
    got = {ev.handle: ev for ev in [written, *_replies(conn, cli, 5)] if isinstance(ev, nbd.Reply | nbd.ReadReply)}
    assert [got[h] for h in (1, 2, 3, 4)] == [nbd.Reply(h) for h in (1, 2, 3, 4)]
    first = got[5]
    assert isinstance(first, nbd.ReadReply)
    assert hashlib.sha256(bytes(first.data)).digest() == hashlib.sha256(block[:65536]).digest()
    last = got[6]
    assert isinstance(last, nbd.ReadReply) and bytes(last.data) == bytes(512)
    conn.sendall(cli.send(nbd.Read(7, 65536, 4096)))
    (zeroed,) = _replies(conn, cli, 1)
    assert isinstance(zeroed, nbd.ReadReply) and bytes(zeroed.data) == bytes(4096)
    conn.sendall(cli.send(nbd.Disconnect()))
