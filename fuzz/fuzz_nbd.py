"""atheris fuzz target for the NBD protocol core: what a hostile enclave (to the parent's server) or a
hostile parent (to the enclave's client) can put on the stream.

Run (atheris is not a project dependency; install it where you fuzz):
    pip install atheris
    python fuzz/fuzz_nbd.py -max_len=8192 -runs=1000000 [CORPUS_DIR]

The first input byte picks the role, how the rest is chunked (1..16 bytes per receive_data, so
byte-by-byte delivery is explored) and whether EOF follows; the second picks a handshake prefix so
mutations reach the transmission phase. The server side answers every event the way the asyncio driver
does. The only exception allowed out is ``ProtocolError`` (Remote from the peer's bytes); the receive
buffer may never hold more than was fed, and a Write/ReadReply payload never exceeds MAX_REQUEST.
"""

from __future__ import annotations

import struct
import sys

import atheris  # type: ignore[import-untyped]  # installed only where fuzzing runs

with atheris.instrument_imports():
    from salmiac.protocol import nbd

GREETING = b"NBDMAGICIHAVEOPT\x00\x03"
CLIENT_GO = (b"\x00\x00\x00\x03" + b"IHAVEOPT" + struct.pack(">II", 7, 12)
             + struct.pack(">I", 4) + b"disk" + struct.pack(">HH", 1, 3))
SERVER_GO_REPLY = (struct.pack(">QIII", 0x3E889045565A9, 7, 3, 12) + struct.pack(">HQH", 0, 1 << 20, 0x6D)
                   + struct.pack(">QIII", 0x3E889045565A9, 7, 1, 0))
EXPORTS = {"disk": nbd.ExportInfo(1 << 20), "ro": nbd.ExportInfo(1 << 16, read_only=True)}


def _server_step(srv: nbd.NbdServer) -> bool:
    """Take and answer events; False once the connection is over."""
    for _ in range(100_000):
        ev = srv.next_event()
        if ev is nbd.NEED_DATA or ev is nbd.PAUSED:
            return True
        match ev:
            case nbd.Read(handle=handle, length=length):
                assert length <= nbd.MAX_REQUEST
                srv.send(nbd.ReadReply(handle, bytes(length)))
            case nbd.Write(handle=handle, data=data):
                assert len(data) <= nbd.MAX_REQUEST
                srv.send(nbd.Reply(handle))
            case nbd.Flush() | nbd.Trim() | nbd.WriteZeroes():
                srv.send(nbd.Reply(ev.handle))
            case nbd.ConnectionClosed() | nbd.Disconnect():
                return False
            case nbd.ClientFlags():
                pass
            case nbd.Event():
                srv.send(srv.reply_for(ev))
    raise AssertionError("server produced events without consuming input")


def _client_step(cli: nbd.NbdClient) -> bool:
    for _ in range(100_000):
        ev = cli.next_event()
        if ev is nbd.NEED_DATA or ev is nbd.PAUSED:
            return True
        match ev:
            case nbd.Greeting():
                for out in cli.handshake_events():
                    cli.send(out)
            case nbd.ExportDetails(option=nbd.Opt.GO):
                cli.send(nbd.Read(1, 0, 512))
                cli.send(nbd.Write(2, 0, b"x" * 512))
            case nbd.ReadReply(data=data):
                assert len(data) <= nbd.MAX_REQUEST
            case nbd.ConnectionClosed():
                return False
    raise AssertionError("client produced events without consuming input")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, prefix_choice, rest = data[0], data[1], data[2:]
    chunk = 1 + (mode >> 1 & 0x0F)
    eof = bool(mode & 0x20)
    conn: nbd.NbdServer | nbd.NbdClient
    if mode & 1:
        conn = nbd.NbdServer(EXPORTS)
        conn.send(nbd.Greeting())
        prefix = CLIENT_GO if prefix_choice & 1 else b""
        step = _server_step
    else:
        conn = nbd.NbdClient("disk")
        prefix = (GREETING + (SERVER_GO_REPLY if prefix_choice & 2 else b"")) if prefix_choice & 1 else b""
        step = _client_step  # type: ignore[assignment]
    stream = prefix + rest
    fed = 0
    try:
        for i in range(0, len(stream), chunk):
            piece = stream[i : i + chunk]
            conn.receive_data(piece)
            fed += len(piece)
            if not step(conn):  # type: ignore[arg-type]
                return
            assert len(conn._buf) <= fed
        if eof:
            conn.receive_data(b"")
            step(conn)  # type: ignore[arg-type]
    except nbd.ProtocolError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
