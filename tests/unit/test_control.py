"""protocol.control, tested the way h11 is: exact bytes, whole / byte by byte / with trailing data, two connections
back to back, and every way a hostile peer can break the rules."""

from __future__ import annotations

import contextlib
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.protocol import cbor
from salmiac.protocol.control import (
    MAX_ARG_BYTES,
    MAX_ARGS,
    MAX_CONFIG_BYTES,
    MAX_ENV,
    MAX_LOG_BYTES,
    MAX_MESSAGE,
    MAX_OUTPUT_CHUNK,
    MESSAGE_TYPES,
    NEED_DATA,
    ControlConnection,
    Exited,
    Hello,
    LocalProtocolError,
    Log,
    Message,
    NeedData,
    Output,
    ProtocolError,
    RemoteProtocolError,
    Role,
    Signal,
    Start,
    State,
    Stream,
    decode_message,
    encode_message,
)


def txt(s: str) -> bytes:
    """A short CBOR text string, written out by hand (independent of the codec under test)."""
    raw = s.encode()
    assert len(raw) < 24
    return bytes([0x60 + len(raw)]) + raw


def framed(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


# Each message and its exact wire bytes: 4-byte big-endian length, then a map whose keys are sorted bytewise
# by their encoding (shorter text keys first, then by bytes).
EXACT: list[tuple[Message, bytes]] = [
    (
        Hello(1, "0.1.0"),
        framed(b"\xa3" + txt("type") + txt("hello") + txt("version") + b"\x01" + txt("init_version") + txt("0.1.0")),
    ),
    (
        Start(1_700_000_000_000_000_000),
        framed(
            b"\xa5"
            + txt("env") + b"\x80"
            + txt("args") + b"\xf6"
            + txt("type") + txt("start")
            + txt("config") + b"\xa0"
            + txt("time_ns") + b"\x1b" + (1_700_000_000_000_000_000).to_bytes(8, "big")
        ),
    ),
    (
        Start(5, args=["ls", "-l"], env=["A=1"], config={"network": {"mtu": True}}),
        framed(
            b"\xa5"
            + txt("env") + b"\x81" + txt("A=1")
            + txt("args") + b"\x82" + txt("ls") + txt("-l")
            + txt("type") + txt("start")
            + txt("config") + b"\xa1" + txt("network") + b"\xa1" + txt("mtu") + b"\xf5"
            + txt("time_ns") + b"\x05"
        ),
    ),
    (Signal(15), framed(b"\xa2" + txt("type") + txt("signal") + txt("signum") + b"\x0f")),
    (
        Output(Stream.STDERR, b"hi\n"),
        framed(b"\xa3" + txt("data") + b"\x43hi\n" + txt("type") + txt("output") + txt("stream") + b"\x02"),
    ),
    (
        Log("info", "booted"),
        framed(b"\xa3" + txt("type") + txt("log") + txt("level") + txt("info") + txt("message") + txt("booted")),
    ),
    (Exited(0), framed(b"\xa3" + txt("type") + txt("exited") + txt("signal") + b"\xf6" + txt("status") + b"\x00")),
    (
        Exited(137, 9),
        framed(b"\xa3" + txt("type") + txt("exited") + txt("signal") + b"\x09" + txt("status") + b"\x18\x89"),
    ),
]


@pytest.mark.parametrize(("msg", "wire"), EXACT, ids=[type(m).__name__ for m, _ in EXACT])
def test_exact_bytes(msg: Message, wire: bytes) -> None:
    assert encode_message(msg) == wire
    # cbor2 agrees on the body (its canonical order equals ours for text-only keys).
    body = cbor2.loads(wire[4:])
    assert body == {"type": msg.TYPE, **{k: getattr(msg, k) for k in body if k != "type"}}
    assert cbor2.dumps(body, canonical=True) == wire[4:]
    assert decode_message(wire[4:]) == msg


# --- a whole session -----------------------------------------------------------------------------------------

ENCLAVE_SIDE: list[Message] = [
    Hello(1, "0.1.0"),
    Log("info", "boot"),
]
PARENT_START = Start(123, args=["sh", "-c", "echo hi"], env=["A=b=c"], config={"network": {"mtu": 1500}})
ENCLAVE_RUNNING: list[Message] = [
    Output(Stream.STDOUT, b"hi\n"),
    Output(Stream.STDERR, b""),
    Log("warning", "slow"),
    Exited(143, 15),
    Log("debug", "unmounted"),
]


def enclave_wire() -> bytes:
    """Everything an enclave sends in a session, produced by a real enclave-side connection."""
    enc = ControlConnection(Role.ENCLAVE)
    out = b"".join(enc.send(m) for m in ENCLAVE_SIDE)
    enc.receive_data(encode_message(PARENT_START))
    assert enc.next_event() == PARENT_START
    return out + b"".join(enc.send(m) for m in ENCLAVE_RUNNING)


def state_of(conn: ControlConnection) -> State:
    """The state as a plain value: mypy would otherwise keep an earlier `assert conn.state is X` narrowing."""
    return conn.state


def drain(conn: ControlConnection) -> list[Message]:
    out: list[Message] = []
    while isinstance(ev := conn.next_event(), Message):
        out.append(ev)
    return out


def parent_reading(chunks: list[bytes]) -> tuple[ControlConnection, list[Message]]:
    """A parent driver: answers Hello with Start as soon as it sees it, before reading further."""
    par = ControlConnection(Role.PARENT)
    got: list[Message] = []
    for chunk in chunks:
        par.receive_data(chunk)
        while isinstance(ev := par.next_event(), Message):
            got.append(ev)
            if isinstance(ev, Hello):
                assert par.send(PARENT_START) == encode_message(PARENT_START)
    return par, got


def test_session_whole() -> None:
    par, got = parent_reading([enclave_wire()])
    assert got == ENCLAVE_SIDE + ENCLAVE_RUNNING
    assert par.state is State.EXITED
    assert par.next_event() is NEED_DATA
    par.receive_data(b"")
    assert par.next_event() is None
    assert state_of(par) is State.CLOSED


def test_session_byte_by_byte() -> None:
    wire = enclave_wire()
    par, got = parent_reading([wire[i : i + 1] for i in range(len(wire))])
    assert got == ENCLAVE_SIDE + ENCLAVE_RUNNING
    par.receive_data(b"")
    assert par.next_event() is None


def test_session_with_trailing_partial_message() -> None:
    trailing = encode_message(Log("info", "more"))[:-1]
    par, got = parent_reading([enclave_wire() + trailing])
    assert got == ENCLAVE_SIDE + ENCLAVE_RUNNING
    assert par.next_event() is NEED_DATA
    par.receive_data(b"")  # EOF with the partial message still buffered
    with pytest.raises(RemoteProtocolError, match="EOF inside a message"):
        par.next_event()
    assert par.state is State.ERROR


def test_session_with_trailing_complete_message_then_more() -> None:
    extra = encode_message(Log("info", "more"))
    _, got = parent_reading([enclave_wire() + extra[:7], extra[7:]])
    assert got == [*ENCLAVE_SIDE, *ENCLAVE_RUNNING, Log("info", "more")]


def test_two_connections_back_to_back() -> None:
    par, enc = ControlConnection(Role.PARENT), ControlConnection(Role.ENCLAVE)

    def to_parent(msg: Message) -> Message | NeedData | None:
        par.receive_data(enc.send(msg))
        return par.next_event()

    def to_enclave(msg: Message) -> Message | NeedData | None:
        enc.receive_data(par.send(msg))
        return enc.next_event()

    assert (par.state, enc.state) == (State.AWAIT_HELLO, State.AWAIT_HELLO)
    assert to_parent(Hello(1, "x")) == Hello(1, "x")
    assert (par.state, enc.state) == (State.AWAIT_START, State.AWAIT_START)
    assert to_parent(Log("info", "up")) == Log("info", "up")
    assert to_enclave(Start(1, env=["K=V"])) == Start(1, env=["K=V"])
    assert (par.state, enc.state) == (State.RUNNING, State.RUNNING)
    assert to_parent(Output(Stream.STDOUT, b"x" * MAX_OUTPUT_CHUNK)) == Output(1, b"x" * MAX_OUTPUT_CHUNK)
    assert to_enclave(Signal(2)) == Signal(2)
    assert to_parent(Log("error", "e")) == Log("error", "e")
    assert to_parent(Exited(130, 2)) == Exited(130, 2)
    assert (par.state, enc.state) == (State.EXITED, State.EXITED)
    assert to_enclave(Signal(15)) == Signal(15)  # late signal: allowed, ignored by the driver
    assert to_parent(Log("info", "bye")) == Log("info", "bye")
    par.receive_data(b"")
    enc.receive_data(b"")
    assert par.next_event() is None and enc.next_event() is None
    assert (par.state, enc.state) == (State.CLOSED, State.CLOSED)


def test_exited_before_start_is_a_setup_failure() -> None:
    par, enc = ControlConnection(Role.PARENT), ControlConnection(Role.ENCLAVE)
    par.receive_data(enc.send(Hello(1, "x")) + enc.send(Exited(125)))
    assert drain(par) == [Hello(1, "x"), Exited(125)]
    assert par.state is State.EXITED
    with pytest.raises(LocalProtocolError):
        par.send(Start(1))  # too late


# --- order violations ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "sequence"),
    [
        (Role.ENCLAVE, [Start(1)]),  # Start before Hello
        (Role.ENCLAVE, [Signal(15)]),  # Signal before anything
        (Role.PARENT, [Hello(1, "x"), Output(Stream.STDOUT, b"x")]),  # Output before Start
        (Role.PARENT, [Hello(1, "x"), Hello(1, "x")]),
        (Role.PARENT, [Log("info", "x")]),  # Log before Hello
        (Role.PARENT, [Hello(1, "x"), Exited(0), Exited(0)]),  # Exited twice
        (Role.PARENT, [Hello(1, "x"), Exited(0), Output(Stream.STDOUT, b"late")]),
        (Role.PARENT, [Hello(1, "x"), Signal(15)]),  # Signal from the enclave
        (Role.PARENT, [Start(1)]),  # Start from the enclave
        (Role.ENCLAVE, [Hello(1, "x")]),  # Hello from the parent
        (Role.ENCLAVE, [Exited(0)]),
        (Role.ENCLAVE, [Output(Stream.STDOUT, b"")]),
    ],
)
def test_out_of_order_is_remote_error(role: Role, sequence: list[Message]) -> None:
    conn = ControlConnection(role)
    conn.receive_data(b"".join(encode_message(m) for m in sequence))
    for expected in sequence[:-1]:
        assert conn.next_event() == expected
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError, match="ERROR"):
        conn.next_event()


def test_enclave_receiving_start_twice() -> None:
    enc = ControlConnection(Role.ENCLAVE)
    enc.send(Hello(1, "x"))
    enc.receive_data(encode_message(Start(1)) * 2)
    assert enc.next_event() == Start(1)
    with pytest.raises(RemoteProtocolError, match="unexpected start in state running"):
        enc.next_event()


@pytest.mark.parametrize(
    ("role", "before", "msg"),
    [
        (Role.PARENT, [], Hello(1, "x")),  # wrong role
        (Role.PARENT, [], Output(Stream.STDOUT, b"")),
        (Role.PARENT, [], Exited(0)),
        (Role.ENCLAVE, [], Start(1)),
        (Role.ENCLAVE, [], Signal(15)),
        (Role.PARENT, [], Start(1)),  # before Hello arrived
        (Role.PARENT, [], Signal(15)),
        (Role.ENCLAVE, [], Output(Stream.STDOUT, b"")),  # before Hello / Start
        (Role.ENCLAVE, [Hello(1, "x")], Hello(1, "x")),
        (Role.ENCLAVE, [Hello(1, "x")], Output(Stream.STDOUT, b"")),
    ],
)
def test_sending_out_of_turn_is_local_error(role: Role, before: list[Message], msg: Message) -> None:
    conn = ControlConnection(role)
    for m in before:
        conn.send(m)
    state = conn.state
    with pytest.raises(LocalProtocolError):
        conn.send(msg)
    assert conn.state is state


@pytest.mark.parametrize(
    "msg",
    [
        Output(Stream.STDOUT, b"x" * (MAX_OUTPUT_CHUNK + 1)),
        Output(3, b""),
        Log("info", "x" * (MAX_LOG_BYTES + 1)),
        Log("trace", "x"),
        Exited(256),
        Exited(0, 65),
    ],
    ids=["big-output", "stream-3", "long-log", "level", "status", "signal"],
)
def test_sending_what_the_peer_would_reject_is_local_error(msg: Message) -> None:
    enc = ControlConnection(Role.ENCLAVE)
    enc.send(Hello(1, "x"))
    enc.receive_data(encode_message(Start(1)))
    enc.next_event()
    with pytest.raises(LocalProtocolError):
        enc.send(msg)
    assert enc.state is State.RUNNING


def test_unencodable_start_is_local_error_and_changes_no_state() -> None:
    par = ControlConnection(Role.PARENT)
    par.receive_data(encode_message(Hello(1, "x")))
    par.next_event()
    with pytest.raises(LocalProtocolError):
        par.send(Start(1, config={"network": {"x": {1, 2}}}))
    with pytest.raises(LocalProtocolError):
        par.send(Start(1, config={"network": {"x": "y" * MAX_CONFIG_BYTES}}))
    with pytest.raises(LocalProtocolError, match="unknown option 'x'"):
        par.send(Start(1, config={"x": {}}))
    assert par.state is State.AWAIT_START
    par.send(Start(1))
    assert state_of(par) is State.RUNNING


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError):
        ProtocolError("x")
    assert issubclass(LocalProtocolError, ProtocolError) and issubclass(RemoteProtocolError, ProtocolError)


def test_data_after_eof_is_local_error() -> None:
    conn = ControlConnection(Role.PARENT)
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    assert conn.next_event() is None


# --- malformed messages --------------------------------------------------------------------------------------


def body(**fields: Any) -> bytes:
    return cbor.dumps(fields)


BAD_BODIES: list[tuple[str, bytes]] = [
    ("not-a-map", cbor.dumps(["hello"])),
    ("bad-cbor", b"\xa1\x64type"),
    ("trailing-cbor", body(type="signal", signum=15) + b"\x00"),
    ("indefinite", b"\xbf\x64type\x66signal\x66signum\x0f\xff"),
    ("no-type", body(signum=15)),
    ("unknown-type", body(type="shell", cmd="id")),
    ("type-not-str", body(type=1)),
    ("type-case", body(type="Signal", signum=15)),
    ("unknown-field", body(type="signal", signum=15, pid=1)),
    ("int-key", cbor.dumps({"type": "signal", "signum": 15, 1: 2})),
    ("missing-field", body(type="signal")),
    ("missing-hello-field", body(type="hello", version=1)),
    ("hello-version-str", body(type="hello", version="1", init_version="x")),
    ("hello-version-bool", body(type="hello", version=True, init_version="x")),
    ("hello-long-init-version", body(type="hello", version=1, init_version="x" * 65)),
    ("signal-9", body(type="signal", signum=9)),
    ("signal-0", body(type="signal", signum=0)),
    ("signal-65", body(type="signal", signum=65)),
    ("signal-negative", body(type="signal", signum=-15)),
    ("signal-bool", body(type="signal", signum=True)),
    ("signal-float", body(type="signal", signum=15.0)),
    ("signal-str", body(type="signal", signum="15")),
    ("signal-list", body(type="signal", signum=[15])),
    ("signal-null", body(type="signal", signum=None)),
    ("start-time-negative", body(type="start", time_ns=-1)),
    ("start-time-2**63", body(type="start", time_ns=1 << 63)),
    ("start-time-float", body(type="start", time_ns=1.0)),
    ("start-args-str", body(type="start", time_ns=1, args="ls")),
    ("start-args-int-item", body(type="start", time_ns=1, args=["ls", 1])),
    ("start-args-nul", body(type="start", time_ns=1, args=["a\0b"])),
    ("start-args-count", body(type="start", time_ns=1, args=[""] * (MAX_ARGS + 1))),
    ("start-args-bytes", body(type="start", time_ns=1, args=["x" * (MAX_ARG_BYTES + 1)])),
    ("start-env-no-equals", body(type="start", time_ns=1, env=["FOO"])),
    ("start-env-empty-key", body(type="start", time_ns=1, env=["=x"])),
    ("start-env-null", body(type="start", time_ns=1, env=None)),
    ("start-env-count", body(type="start", time_ns=1, env=["A=1"] * (MAX_ENV + 1))),
    ("start-config-list", body(type="start", time_ns=1, config=[])),
    ("start-config-int-key", body(type="start", time_ns=1, config={1: 2})),
    ("start-config-big", body(type="start", time_ns=1, config={"network": {"x": "y" * MAX_CONFIG_BYTES}})),
    ("start-config-unknown", body(type="start", time_ns=1, config={"storage-backdoor": {}})),
    ("start-config-network-list", body(type="start", time_ns=1, config={"network": []})),
    ("output-stream-0", body(type="output", stream=0, data=b"")),
    ("output-stream-3", body(type="output", stream=3, data=b"")),
    ("output-stream-bool", body(type="output", stream=True, data=b"")),
    ("output-stream-float", body(type="output", stream=1.0, data=b"")),
    ("output-data-str", body(type="output", stream=1, data="x")),
    ("output-data-oversize", body(type="output", stream=1, data=b"x" * (MAX_OUTPUT_CHUNK + 1))),
    ("log-level", body(type="log", level="critical", message="x")),
    ("log-level-list", body(type="log", level=["info"], message="x")),
    ("log-message-bytes", body(type="log", level="info", message=b"x")),
    ("log-message-long", body(type="log", level="info", message="x" * (MAX_LOG_BYTES + 1))),
    ("exited-status-256", body(type="exited", status=256, signal=None)),
    ("exited-status-negative", body(type="exited", status=-1, signal=None)),
    ("exited-status-bool", body(type="exited", status=False, signal=None)),
    ("exited-signal-0", body(type="exited", status=0, signal=0)),
    ("exited-signal-65", body(type="exited", status=0, signal=65)),
    ("exited-signal-str", body(type="exited", status=0, signal="9")),
]


@pytest.mark.parametrize("raw", [b for _, b in BAD_BODIES], ids=[n for n, _ in BAD_BODIES])
def test_malformed_message_is_remote_error(raw: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(raw)
    # And through a connection that would otherwise accept any message type at this point.
    for role in (Role.PARENT, Role.ENCLAVE):
        conn = ControlConnection(role)
        conn.receive_data(framed(raw))
        with pytest.raises(RemoteProtocolError):
            conn.next_event()
        assert conn.state is State.ERROR


def test_limits_are_inclusive() -> None:
    assert decode_message(body(type="output", stream=2, data=b"x" * MAX_OUTPUT_CHUNK)) == Output(
        2, b"x" * MAX_OUTPUT_CHUNK
    )
    longest = "x" * MAX_LOG_BYTES
    assert decode_message(body(type="log", level="debug", message=longest)) == Log("debug", longest)
    assert decode_message(body(type="start", time_ns=(1 << 63) - 1, env=["A="] * MAX_ENV)) == Start(
        (1 << 63) - 1, env=["A="] * MAX_ENV
    )
    assert decode_message(body(type="exited", status=255, signal=64)) == Exited(255, 64)
    for signum in (1, 2, 3, 10, 12, 15):
        assert decode_message(body(type="signal", signum=signum)) == Signal(signum)


@pytest.mark.parametrize(
    "prefix",
    [b"\x00\x00\x00\x00", (MAX_MESSAGE + 1).to_bytes(4, "big"), b"\xff\xff\xff\xff"],
    ids=["zero", "max+1", "4GiB"],
)
def test_bad_length_prefix_fails_before_the_body_arrives(prefix: bytes) -> None:
    conn = ControlConnection(Role.PARENT)
    conn.receive_data(prefix)  # no body at all: the length alone is enough to refuse
    with pytest.raises(RemoteProtocolError, match="length"):
        conn.next_event()
    assert conn.state is State.ERROR


def test_max_message_length_is_accepted_as_a_length() -> None:
    conn = ControlConnection(Role.PARENT)
    conn.receive_data(MAX_MESSAGE.to_bytes(4, "big") + b"\xa0")
    assert conn.next_event() is NEED_DATA  # waits for the rest; a MAX_MESSAGE body is allowed


@pytest.mark.parametrize("cut", [1, 3, 4, 5, len(encode_message(Hello(1, "x"))) - 1])
def test_eof_mid_message(cut: int) -> None:
    conn = ControlConnection(Role.PARENT)
    conn.receive_data(encode_message(Hello(1, "x"))[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="EOF"):
        conn.next_event()
    assert conn.state is State.ERROR


# --- hypothesis ----------------------------------------------------------------------------------------------


def feed_and_drain(conn: ControlConnection, chunks: list[bytes]) -> None:
    """Only RemoteProtocolError may escape; anything else fails the test."""
    with contextlib.suppress(RemoteProtocolError):
        for chunk in chunks:
            conn.receive_data(chunk)
            while isinstance(conn.next_event(), Message):
                pass
        conn.receive_data(b"")
        while isinstance(conn.next_event(), Message):
            pass


@given(st.lists(st.binary(min_size=1, max_size=64), max_size=8), st.sampled_from(list(Role)))  # b"" is EOF
@settings(max_examples=500, deadline=None)
def test_random_bytes_only_raise_remote_protocol_error(chunks: list[bytes], role: Role) -> None:
    feed_and_drain(ControlConnection(role), chunks)


SCALARS = (
    st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False)  # NaN != NaN would fail the re-encode check below, not the code
    | st.text(max_size=10)
    | st.binary(max_size=10)
)
VALUES = st.recursive(
    SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8
)
FIELD_NAMES = st.sampled_from(
    ["version", "init_version", "time_ns", "args", "env", "config", "signum", "stream", "data", "level", "message",
     "status", "signal", "extra"]
)


@given(
    st.sampled_from(sorted(MESSAGE_TYPES)),
    st.dictionaries(FIELD_NAMES, VALUES, max_size=5),
    st.sampled_from(list(Role)),
)
@settings(max_examples=300, deadline=None)
def test_random_typed_maps_only_raise_remote_protocol_error(kind: str, fields: dict[str, Any], role: Role) -> None:
    raw = framed(cbor.dumps({"type": kind, **fields}))
    with contextlib.suppress(RemoteProtocolError):
        msg = decode_message(raw[4:])
        # Whatever decoding accepted re-encodes to a valid message of the same kind.
        assert kind == msg.TYPE
        assert decode_message(encode_message(msg)[4:]) == msg
    feed_and_drain(ControlConnection(role), [raw])
