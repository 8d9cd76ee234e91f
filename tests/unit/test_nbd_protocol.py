"""salmiac.protocol.nbd: golden bytes fed whole / byte by byte / with trailing data, a client and a server
wired back to back, hostile input (bad magic, huge lengths, out-of-range offsets) and hypothesis fuzzing.

Golden bytes are written out here with struct from the field layout in proto.md, not produced by the
code under test."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.protocol import nbd
from salmiac.protocol.nbd import (
    NEED_DATA,
    PAUSED,
    BadRequest,
    ClientFlags,
    ConnectionClosed,
    Disconnect,
    Errno,
    Event,
    ExportDetails,
    ExportInfo,
    ExportList,
    Flush,
    Greeting,
    LocalProtocolError,
    NbdClient,
    NbdServer,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptionAck,
    OptionError,
    OptList,
    OptRejected,
    OptStructuredReply,
    Read,
    ReadReply,
    RemoteProtocolError,
    Reply,
    State,
    Trim,
    Write,
    WriteZeroes,
)

SIZE = 1 << 20
EXPORTS = {"disk": ExportInfo(SIZE), "ro": ExportInfo(SIZE, read_only=True)}

# ---- golden bytes (proto.md field layouts)
GREETING = b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 0b11)
CLIENT_FLAGS = struct.pack(">I", 0b11)
IHAVEOPT = b"IHAVEOPT"
REP_MAGIC = struct.pack(">Q", 0x3E889045565A9)


def opt(option: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", option, len(data)) + data


def go_data(name: bytes, infos: tuple[int, ...] = ()) -> bytes:
    return struct.pack(">I", len(name)) + name + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return REP_MAGIC + struct.pack(">III", option, reply, len(data)) + data


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length)


def simple_reply(handle: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", 0x67446698, error, handle)


GO_DISK = opt(7, go_data(b"disk", (3,)))
DISK_FLAGS = 0b1_0110_1101 & ~(1 << 8)  # HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_TRIM|SEND_WRITE_ZEROES
GO_REPLY_DISK = (rep(7, 3, struct.pack(">HQH", 0, SIZE, DISK_FLAGS))
                 + rep(7, 3, struct.pack(">HIII", 3, 1, 4096, 32 << 20))
                 + rep(7, 1))


# ---- helpers


def events(conn: NbdServer | NbdClient) -> list[Event]:
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return out
        assert isinstance(ev, Event)
        out.append(ev)


def splits(data: bytes) -> Iterator[list[bytes]]:
    """The h11 trio: whole, one byte at a time, and in two uneven pieces."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    yield [data[:3], data[3:]]


def server_in_transmission(name: str = "disk") -> NbdServer:
    srv = NbdServer(EXPORTS)
    assert srv.send(Greeting()) == GREETING
    srv.receive_data(CLIENT_FLAGS + opt(7, go_data(name.encode(), (3,))))
    flags_ev, go = events(srv)
    assert flags_ev == ClientFlags(3) and go == OptGo(name, (3,))
    srv.send(srv.reply_for(go))
    assert srv.state is State.TRANSMISSION
    return srv


def client_in_transmission(exports: dict[str, ExportInfo] | None = None,
                           name: str = "disk") -> tuple[NbdClient, NbdServer]:
    srv = NbdServer(exports or EXPORTS)
    cli = NbdClient(name)
    cli.receive_data(srv.send(Greeting()))
    assert events(cli) == [Greeting(3)]
    for ev in cli.handshake_events():
        srv.receive_data(cli.send(ev))
    for ev in events(srv):
        if not isinstance(ev, ClientFlags):
            cli.receive_data(srv.send(srv.reply_for(ev)))
    (details,) = events(cli)
    assert isinstance(details, ExportDetails)
    assert cli.state is State.TRANSMISSION and srv.state is State.TRANSMISSION
    return cli, srv


def feed_pieces(conn: NbdServer | NbdClient, pieces: list[bytes],
                answer: Callable[[Event], None] = lambda ev: None) -> list[Event]:
    """Feed each piece, then take events until more data is needed; ``answer`` sends our replies
    (after which buffered bytes may yield more events)."""
    got: list[Event] = []
    for piece in pieces:
        if not piece:
            continue  # b"" would mean EOF
        conn.receive_data(piece)
        while new := events(conn):
            for ev in new:
                got.append(ev)
                answer(ev)
    return got


# ---- handshake, byte level


def test_server_greeting_and_go_golden_bytes() -> None:
    for pieces in splits(CLIENT_FLAGS + GO_DISK):
        srv = NbdServer(EXPORTS)
        assert srv.send(Greeting()) == GREETING
        out: list[bytes] = []

        def answer(ev: Event, srv: NbdServer = srv, out: list[bytes] = out) -> None:
            if not isinstance(ev, ClientFlags):
                out.append(srv.send(srv.reply_for(ev)))

        got = feed_pieces(srv, pieces, answer)
        assert got == [ClientFlags(3), OptGo("disk", (3,))]
        assert b"".join(out) == GO_REPLY_DISK
        assert srv.state is State.TRANSMISSION
        assert srv.export_name == "disk" and srv.export is not None and srv.export.size == SIZE


def test_server_pauses_until_option_answered_and_keeps_trailing_bytes() -> None:
    srv = NbdServer(EXPORTS)
    srv.send(Greeting())
    trailing = request(0, 7, 0, 512)
    srv.receive_data(CLIENT_FLAGS + GO_DISK + trailing)
    assert srv.next_event() == ClientFlags(3)
    go = srv.next_event()
    assert srv.next_event() is PAUSED
    assert isinstance(go, OptGo)
    srv.send(srv.reply_for(go))
    assert srv.next_event() == Read(7, 0, 512)


def test_client_parses_greeting_and_go_reply_golden_bytes() -> None:
    for pieces in splits(GREETING + GO_REPLY_DISK):
        cli = NbdClient("disk")

        def answer(ev: Event, cli: NbdClient = cli) -> None:
            if isinstance(ev, Greeting):
                sent = b"".join(cli.send(e) for e in cli.handshake_events())
                assert sent == CLIENT_FLAGS + GO_DISK

        got = feed_pieces(cli, pieces, answer)
        assert got == [Greeting(3), ExportDetails(7, SIZE, DISK_FLAGS, 1, 4096, 32 << 20)]
        assert cli.state is State.TRANSMISSION


def test_client_ignores_unknown_info_and_reports_description_less_export() -> None:
    cli = NbdClient("x")
    cli.receive_data(GREETING)
    events(cli)
    for ev in cli.handshake_events():
        cli.send(ev)
    cli.receive_data(rep(7, 3, struct.pack(">H", 2) + b"a description")
                     + rep(7, 3, struct.pack(">HQH", 0, 4096, 1)) + rep(7, 1))
    assert events(cli) == [ExportDetails(7, 4096, 1, 1, 4096, 32 << 20)]


def test_export_name_option_with_and_without_zeroes() -> None:
    for client_flags, tail in ((3, b""), (1, bytes(124))):
        srv = NbdServer(EXPORTS)
        srv.send(Greeting())
        srv.receive_data(struct.pack(">I", client_flags) + opt(1, b"ro"))
        _, ev = events(srv)
        assert ev == OptExportName("ro")
        reply = srv.send(srv.reply_for(ev))
        assert reply == struct.pack(">QH", SIZE, 0b111) + tail  # HAS_FLAGS|READ_ONLY|SEND_FLUSH
        cli = NbdClient("ro")
        cli.receive_data(GREETING)
        events(cli)
        cli.send(ClientFlags(client_flags))
        cli.send(OptExportName("ro"))
        for pieces in splits(reply):
            clone = NbdClient("ro")
            clone.receive_data(GREETING)
            events(clone)
            clone.send(ClientFlags(client_flags))
            clone.send(OptExportName("ro"))
            assert feed_pieces(clone, pieces) == [ExportDetails(1, SIZE, 0b111)]


def test_list_info_abort_and_refusals() -> None:
    srv = NbdServer(EXPORTS)
    srv.send(Greeting())
    srv.receive_data(CLIENT_FLAGS + opt(3))
    _, ev = events(srv)
    assert srv.send(srv.reply_for(ev)) == (rep(3, 2, b"\0\0\0\x04disk") + rep(3, 2, b"\0\0\0\x02ro")
                                           + rep(3, 1))
    srv.receive_data(opt(6, go_data(b"nope")))
    (ev,) = events(srv)
    assert ev == OptInfo("nope", ())
    answer = srv.reply_for(ev)
    assert isinstance(answer, OptionError) and answer.reply == nbd.Rep.ERR_UNKNOWN
    srv.send(answer)
    srv.receive_data(opt(8))
    (ev,) = events(srv)
    assert srv.send(srv.reply_for(ev)).startswith(rep(8, 0x80000001)[:16])
    srv.receive_data(opt(42, b"whatever"))
    (ev,) = events(srv)
    assert ev == OptRejected(42, nbd.Rep.ERR_UNSUP, "option 42 is not supported")
    srv.send(srv.reply_for(ev))
    srv.receive_data(opt(3, b"x"))  # LIST carries no data
    (ev,) = events(srv)
    assert isinstance(ev, OptRejected) and ev.reply == nbd.Rep.ERR_INVALID
    srv.send(srv.reply_for(ev))
    srv.receive_data(opt(7, b"\xff\xff\xff\xff\0\0"))  # name length past the data
    (ev,) = events(srv)
    assert isinstance(ev, OptRejected) and ev.reply == nbd.Rep.ERR_INVALID
    srv.send(srv.reply_for(ev))
    srv.receive_data(opt(2))
    (ev,) = events(srv)
    assert srv.send(srv.reply_for(ev)) == rep(2, 1)
    assert srv.state is State.CLOSED
    srv.receive_data(b"")
    assert srv.next_event() == ConnectionClosed()


def test_client_sees_list_and_errors() -> None:
    cli = NbdClient("disk")
    cli.receive_data(GREETING)
    events(cli)
    cli.send(ClientFlags(3))
    cli.send(OptList())
    reply = rep(3, 2, b"\0\0\0\x01a") + rep(3, 2, b"\0\0\0\x01bdescription") + rep(3, 1)
    assert feed_pieces(cli, [reply]) == [ExportList(("a", "b"))]
    cli.send(OptGo("zzz"))
    cli.receive_data(rep(7, 0x80000006, b"no such export"))
    assert events(cli) == [OptionError(7, 0x80000006, "no such export")]
    cli.send(OptStructuredReply())
    cli.receive_data(rep(8, 0x80000001))
    assert events(cli) == [OptionError(8, 0x80000001, "")]
    cli.send(OptAbort())
    cli.receive_data(rep(2, 1))
    assert events(cli) == [OptionAck(2)]
    assert cli.state is State.CLOSED


# ---- transmission, byte level

TRANSMISSION_SAMPLE = (
    request(0, 1, 4096, 512)                                     # READ
    + request(1, 2, 0, 5, flags=1) + b"hello"                    # WRITE, FUA
    + request(3, 3, 0, 0)                                        # FLUSH
    + request(4, 4, 8192, 4096)                                  # TRIM
    + request(6, 5, 0, 65536, flags=2)                           # WRITE_ZEROES, NO_HOLE
    + request(2, 0, 0, 0)                                        # DISC
)
TRANSMISSION_EVENTS = [
    Read(1, 4096, 512), Write(2, 0, b"hello", fua=True), Flush(3), Trim(4, 8192, 4096),
    WriteZeroes(5, 0, 65536, no_hole=True), Disconnect(),
]


@pytest.mark.parametrize("style", ["whole", "bytewise", "split"])
def test_server_transmission_golden_bytes(style: str) -> None:
    pieces = list(splits(TRANSMISSION_SAMPLE))[["whole", "bytewise", "split"].index(style)]
    srv = server_in_transmission()
    got = feed_pieces(srv, pieces)
    assert [_plain(ev) for ev in got] == TRANSMISSION_EVENTS
    assert srv.state is State.DISCONNECTING
    # The server still answers what is outstanding, then sees EOF.
    assert srv.send(ReadReply(1, bytes(512))) == simple_reply(1) + bytes(512)
    for handle in (2, 3, 4, 5):
        assert srv.send(Reply(handle)) == simple_reply(handle)
    srv.receive_data(b"")
    assert srv.next_event() == ConnectionClosed()


def _plain(ev: Event) -> Event:
    """Write data may arrive as a view of the receive buffer; compare it as bytes."""
    if isinstance(ev, Write):
        return Write(ev.handle, ev.offset, bytes(ev.data), ev.fua)
    return ev


def test_client_replies_golden_bytes_with_trailing_data() -> None:
    for pieces in splits(simple_reply(9, 0) + b"DATA" + simple_reply(8, 5) + simple_reply(7)):
        cli, _ = client_in_transmission()
        cli.send(Read(9, 0, 4))
        cli.send(Read(8, 0, 4))
        cli.send(Write(7, 0, b"x"))
        got = feed_pieces(cli, [*pieces, simple_reply(99)[:5]])
        assert [(type(e).__name__, getattr(e, "handle", None)) for e in got] == [
            ("ReadReply", 9), ("Reply", 8), ("Reply", 7)]
        assert isinstance(got[0], ReadReply) and bytes(got[0].data) == b"DATA"
        assert got[1] == Reply(8, 5)
        assert cli.trailing_data == (simple_reply(99)[:5], False)


def test_back_to_back_round_trip() -> None:
    cli, srv = client_in_transmission()
    sent: list[Event] = [Read(1, 0, 4096), Write(2, 4096, b"\x01" * 4096, fua=True), Flush(3),
                         Trim(4, 0, 4096), WriteZeroes(5, 0, 8192), WriteZeroes(6, 0, 8192, True, True)]
    for ev in sent:
        srv.receive_data(cli.send(ev))
    assert [_plain(e) for e in events(srv)] == sent
    srv_out = srv.send(ReadReply(1, b"\x02" * 4096))
    for handle in (2, 3, 4, 5, 6):
        srv_out += srv.send(Reply(handle))
    cli.receive_data(srv_out)
    got = events(cli)
    assert isinstance(got[0], ReadReply) and bytes(got[0].data) == b"\x02" * 4096
    assert got[1:] == [Reply(h) for h in (2, 3, 4, 5, 6)]
    srv.receive_data(cli.send(Disconnect()))
    assert events(srv) == [Disconnect()]


def test_send_with_data_passthrough_does_not_copy_payload() -> None:
    _, srv = client_in_transmission()
    srv.receive_data(request(0, 1, 0, 8))
    events(srv)
    payload = memoryview(bytearray(b"abcdefgh"))
    header, data = srv.send_with_data_passthrough(ReadReply(1, payload))
    assert header == simple_reply(1) and data is payload


# ---- invalid but well-framed requests: error replies the spec asks for


@pytest.mark.parametrize(("raw", "error"), [
    (request(0, 1, SIZE - 511, 512), Errno.EINVAL),                 # read past the end
    (request(0, 1, (1 << 64) - 1, 512), Errno.EINVAL),              # offset+length wraps in C
    (request(0, 1, 0, (32 << 20) + 1), Errno.EINVAL),               # read over MAX_REQUEST
    (request(1, 1, SIZE - 2, 4) + b"abcd", Errno.ENOSPC),          # write past the end
    (request(6, 1, SIZE, 1), Errno.ENOSPC),                         # write zeroes past the end
    (request(4, 1, SIZE, 1), Errno.EINVAL),                         # trim past the end
    (request(99, 1, 0, 0), Errno.EINVAL),                           # unknown command
    (request(7, 1, 0, 512), Errno.EINVAL),                          # block status, not negotiated
    (request(0, 1, 0, 512, flags=1 << 2), Errno.EINVAL),            # DF without structured replies
    (request(1, 1, 0, 2, flags=2) + b"ab", Errno.EINVAL),           # NO_HOLE on WRITE
])
def test_bad_requests_get_error_replies_and_stream_continues(raw: bytes, error: int) -> None:
    for pieces in splits(raw + request(0, 2, 0, 512)):
        srv = server_in_transmission()
        got = feed_pieces(srv, pieces)
        assert len(got) == 2 and isinstance(got[0], BadRequest) and got[0].error == error
        assert got[1] == Read(2, 0, 512)
        assert srv.send(srv.reply_for(got[0])) == simple_reply(1, error)


@pytest.mark.parametrize("raw", [
    request(1, 1, 0, 4) + b"abcd", request(4, 1, 0, 4096), request(6, 1, 0, 4096),
])
def test_read_only_export_refuses_writes_with_eperm(raw: bytes) -> None:
    srv = server_in_transmission("ro")
    srv.receive_data(raw)
    (ev,) = events(srv)
    assert isinstance(ev, BadRequest) and ev.error == Errno.EPERM
    srv.receive_data(request(3, 2, 0, 0))
    assert events(srv) == [Flush(2)]


def test_rejected_write_payload_is_drained_not_kept() -> None:
    srv = server_in_transmission()
    srv.receive_data(request(1, 1, SIZE, 1 << 20))  # past the end: ENOSPC once the payload is drained
    assert srv.next_event() is NEED_DATA
    for _ in range(15):
        srv.receive_data(bytes(1 << 16))
        assert srv.next_event() is NEED_DATA
        assert len(srv._buf) == 0  # nothing of the payload is held
    srv.receive_data(bytes(1 << 16))
    (ev,) = events(srv)
    assert isinstance(ev, BadRequest) and ev.error == Errno.ENOSPC


# ---- protocol violations: RemoteProtocolError, with nothing allocated from the peer's numbers


@pytest.mark.parametrize("raw", [
    request(1, 1, 0, 0xFFFFFFFF),             # write payload of 4 GiB
    request(1, 1, 0, (32 << 20) + 1),         # write payload over MAX_REQUEST
    b"\x25\x60\x95\x14" + bytes(24),          # bad request magic
])
def test_transmission_violations_raise_before_payload(raw: bytes) -> None:
    srv = server_in_transmission()
    srv.receive_data(raw)
    with pytest.raises(RemoteProtocolError):
        srv.next_event()
    assert srv.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        srv.next_event()
    with pytest.raises(LocalProtocolError):
        srv.send(Reply(1))


def test_duplicate_in_flight_handle_is_a_violation() -> None:
    srv = server_in_transmission()
    srv.receive_data(request(0, 1, 0, 512) + request(0, 1, 512, 512))
    assert srv.next_event() == Read(1, 0, 512)
    with pytest.raises(RemoteProtocolError, match="reused handle"):
        srv.next_event()


@pytest.mark.parametrize("raw", [
    struct.pack(">I", 1 << 5),                                   # unknown client flag
    struct.pack(">I", 0),                                        # not fixed newstyle
    CLIENT_FLAGS + b"IHAVEOPX" + bytes(8),                       # bad option magic
    CLIENT_FLAGS + IHAVEOPT + struct.pack(">II", 7, 0xFFFFFFF0),  # huge option length
    CLIENT_FLAGS + opt(1, b"nope"),                              # EXPORT_NAME of unknown export
    CLIENT_FLAGS + opt(1, b"\xff"),                              # EXPORT_NAME not UTF-8
])
def test_handshake_violations(raw: bytes) -> None:
    srv = NbdServer(EXPORTS)
    srv.send(Greeting())
    srv.receive_data(raw)
    with pytest.raises(RemoteProtocolError):
        events(srv)
    assert len(srv._buf) <= len(raw)


def test_too_many_options_is_a_denial_of_service() -> None:
    srv = NbdServer(EXPORTS)
    srv.send(Greeting())
    srv.receive_data(CLIENT_FLAGS)
    events(srv)
    with pytest.raises(RemoteProtocolError, match="options"):
        for _ in range(nbd.MAX_OPTIONS + 1):
            srv.receive_data(opt(3))
            for ev in events(srv):
                srv.send(srv.reply_for(ev))


def test_eof_in_the_middle_of_a_message() -> None:
    srv = server_in_transmission()
    srv.receive_data(request(1, 1, 0, 10) + b"abc")
    srv.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        srv.next_event()


@pytest.mark.parametrize(("greeting", "replies", "match"), [
    (b"NBDMAGIX" + GREETING[8:], b"", "not an NBD server"),
    (GREETING[:16] + b"\0\0", b"", "fixed newstyle"),
    (GREETING, rep(7, 1), "without NBD_INFO_EXPORT"),
    (GREETING, rep(7, 3, b"\0\0\0"), "wrong length"),
    (GREETING, rep(3, 1), "answered option 3"),
    (GREETING, REP_MAGIC + struct.pack(">III", 7, 3, 0xFFFFFF), "exceeds"),
    (GREETING, b"\0" * 8 + struct.pack(">III", 7, 1, 0), "bad magic"),
    (GREETING, rep(7, 3, struct.pack(">HQH", 0, 1 << 63, 1)) + rep(7, 1), "too large"),
    (GREETING, rep(7, 3, struct.pack(">HQH", 0, 4096, 1)) + rep(7, 3, struct.pack(">HIII", 3, 3, 4096, 4096))
     + rep(7, 1), "minimum block"),
    (GREETING, rep(7, 2, b"\0\0\0\0"), "unexpected NBD option reply"),
])
def test_client_rejects_bad_servers(greeting: bytes, replies: bytes, match: str) -> None:
    cli = NbdClient("disk")

    def answer(ev: Event) -> None:
        assert isinstance(ev, Greeting)
        for out in cli.handshake_events():
            cli.send(out)

    with pytest.raises(RemoteProtocolError, match=match):
        feed_pieces(cli, [greeting, replies], answer)


def test_client_rejects_reply_for_unknown_handle_and_bad_magic() -> None:
    cli, _ = client_in_transmission()
    cli.receive_data(simple_reply(5))
    with pytest.raises(RemoteProtocolError, match="not in flight"):
        cli.next_event()
    cli, _ = client_in_transmission()
    cli.send(Read(5, 0, 4))
    cli.receive_data(b"\x67\x44\x66\x99" + bytes(12))
    with pytest.raises(RemoteProtocolError, match="bad magic"):
        cli.next_event()


# ---- local errors: our own misuse is caught before bytes go out


def test_local_misuse() -> None:
    cli = NbdClient("disk")
    with pytest.raises(LocalProtocolError):
        cli.send(Read(1, 0, 512))  # before the handshake
    cli, srv = client_in_transmission()
    with pytest.raises(LocalProtocolError, match="past the export end"):
        cli.send(Read(1, SIZE, 1))
    cli, srv = client_in_transmission()
    cli.send(Read(1, 0, 4))
    with pytest.raises(LocalProtocolError, match="already in flight"):
        cli.send(Read(1, 0, 4))
    with pytest.raises(LocalProtocolError, match="no NBD request"):
        srv.send(Reply(77))
    with pytest.raises(LocalProtocolError, match="ERROR state"):  # a local error poisons it, as in h11
        srv.send(Reply(1))
    cli, srv = client_in_transmission()
    srv.receive_data(request(0, 3, 0, 4))
    events(srv)
    with pytest.raises(LocalProtocolError, match="carries 3 bytes"):
        srv.send(ReadReply(3, b"abc"))
    cli, _ = client_in_transmission(name="ro")
    with pytest.raises(LocalProtocolError, match="read-only"):
        cli.send(Write(1, 0, b"x"))
    with pytest.raises(LocalProtocolError):
        Read(-1, 0, 0)
    with pytest.raises(LocalProtocolError):
        Read(1, 0, 1 << 32)
    with pytest.raises(LocalProtocolError):
        OptGo("a\0b")
    with pytest.raises(LocalProtocolError):
        ExportInfo(SIZE, min_block=3)
    with pytest.raises(TypeError):
        nbd.ProtocolError("abstract")
    srv = NbdServer(EXPORTS)
    with pytest.raises(LocalProtocolError):
        srv.send(OptionAck(2))  # nothing pending, and no greeting yet


def test_server_refuses_mismatched_answer() -> None:
    srv = NbdServer(EXPORTS)
    srv.send(Greeting())
    srv.receive_data(CLIENT_FLAGS + opt(3))
    events(srv)
    with pytest.raises(LocalProtocolError, match="does not answer"):
        srv.send(OptionAck(2))


# ---- fuzzing: arbitrary bytes only ever end in a ProtocolError, never another exception or a
# buffer larger than what was fed


def _drain_events(conn: NbdServer | NbdClient) -> None:
    for _ in range(10_000):
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return
        if isinstance(conn, NbdServer) and isinstance(ev, Event) and not isinstance(
                ev, ClientFlags | Disconnect | ConnectionClosed):
            if isinstance(ev, Read):
                conn.send(ReadReply(ev.handle, bytes(ev.length)))
            elif isinstance(ev, Write | Flush | Trim | WriteZeroes):
                conn.send(Reply(ev.handle))
            else:
                conn.send(conn.reply_for(ev))
        if isinstance(ev, ConnectionClosed):
            return


small_exports = {"disk": ExportInfo(1 << 16), "ro": ExportInfo(1 << 16, read_only=True)}


@settings(max_examples=300, deadline=None)
@given(prefix=st.sampled_from([b"", CLIENT_FLAGS, CLIENT_FLAGS + GO_DISK]),
       chunks=st.lists(st.binary(max_size=96), max_size=8), eof=st.booleans())
def test_fuzz_server_receive_data(prefix: bytes, chunks: list[bytes], eof: bool) -> None:
    srv = NbdServer(small_exports)
    srv.send(Greeting())
    fed = len(prefix)
    try:
        srv.receive_data(prefix)
        _drain_events(srv)
        for chunk in chunks:
            fed += len(chunk)
            srv.receive_data(chunk)
            _drain_events(srv)
            assert len(srv._buf) <= fed
        if eof:
            srv.receive_data(b"")
            _drain_events(srv)
    except nbd.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(st.tuples(st.integers(0, 8), st.integers(0, 31), st.integers(0, 1 << 17),
                                   st.integers(0, 1 << 17)), max_size=6))
def test_fuzz_server_requests(requests: list[tuple[int, int, int, int]]) -> None:
    """Structurally valid request headers with arbitrary fields: events or clean errors only."""
    srv = NbdServer(small_exports)
    srv.send(Greeting())
    srv.receive_data(CLIENT_FLAGS + GO_DISK)
    _drain_events(srv)
    try:
        for handle, (cmd, flags, offset, length) in enumerate(requests):
            payload = bytes(min(length, 4096)) if cmd == 1 else b""
            srv.receive_data(request(cmd, handle, offset, length, flags) + payload)
            _drain_events(srv)
    except nbd.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=96), max_size=8),
       prefix=st.sampled_from([b"", GREETING, GREETING + GO_REPLY_DISK]))
def test_fuzz_client_receive_data(chunks: list[bytes], prefix: bytes) -> None:
    cli = NbdClient("disk")
    try:
        for chunk in [prefix, *chunks]:
            if chunk:
                cli.receive_data(chunk)
            ev = cli.next_event()
            while ev is not NEED_DATA and ev is not PAUSED and not isinstance(ev, ConnectionClosed):
                if isinstance(ev, Greeting):
                    for out in cli.handshake_events():
                        cli.send(out)
                elif isinstance(ev, ExportDetails):
                    cli.send(Read(1, 0, 16))
                ev = cli.next_event()
    except nbd.ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.one_of(
    st.builds(lambda o, n: Read(0, o, n), st.integers(0, 1 << 15), st.integers(0, 1 << 15)),
    st.builds(lambda o, d, f: Write(0, o, d, f), st.integers(0, 1 << 15), st.binary(max_size=512),
              st.booleans()),
    st.builds(lambda o, n, f, h: WriteZeroes(0, o, n, f, h), st.integers(0, 1 << 15),
              st.integers(0, 1 << 15), st.booleans(), st.booleans()),
    st.builds(lambda o, n: Trim(0, o, n), st.integers(0, 1 << 15), st.integers(0, 1 << 15)),
), max_size=10), cut=st.integers(0, 50))
def test_round_trip_property(ops: list[Event], cut: int) -> None:
    """Whatever valid requests the client encodes, the server decodes the same, in any framing."""
    cli, srv = client_in_transmission({"disk": ExportInfo(1 << 16)})
    numbered = []
    wire = b""
    for handle, op in enumerate(ops, start=1):
        numbered_op = dataclasses.replace(op, handle=handle)  # type: ignore[type-var]
        numbered.append(numbered_op)
        wire += cli.send(numbered_op)
    got = feed_pieces(srv, [wire[:cut], wire[cut:]])
    assert [_plain(e) for e in got] == numbered


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=10),
       ops=st.lists(st.tuples(st.sampled_from(["head", "take", "skip"]), st.integers(0, 60)), max_size=20))
def test_receive_buffer_matches_a_flat_model(chunks: list[bytes], ops: list[tuple[str, int]]) -> None:
    """The chunked receive buffer (views, partial joins) behaves exactly like one flat bytearray."""
    buf = nbd._ReceiveBuffer()
    model = bytearray()
    for chunk in chunks:
        if chunk:
            buf.append(chunk)
            model += chunk
    for op, size in ops:
        if op == "skip":
            assert buf.skip(size) == min(size, len(model))
            del model[:size]
        elif op == "head":
            got = buf.head(size)
            head = None if got is None else bytes(got)[:size]  # it may return more than asked
            assert head == (bytes(model[:size]) if size <= len(model) else None)
        else:
            got = buf.take(size)
            want = bytes(model[:size]) if size <= len(model) else None
            assert (None if got is None else bytes(got)) == want
            if want is not None:
                del model[:size]
        assert len(buf) == len(model)
    assert buf.dump() == bytes(model)
