"""Control channel between the parent (untrusted host) and the enclave init (trusted), sans-IO.

Wire format: each message is a 4-byte big-endian length followed by a CBOR map ``{"type": NAME, ...fields}``
(deterministic encoding, see ``protocol.cbor``). One long-lived stream carries, in order:

    enclave → parent   Hello, then Log*/Output*, and finally Exited (then Log* of the shutdown)
    parent  → enclave  Start (exactly once, after Hello), then Signal*

Both sides distrust the other: every received message is decoded through ``decode_message``, which rejects
unknown types, unknown or missing keys, wrong types and oversize values; and each role accepts only the
messages the *other* role may send, in the order above. Violations raise ``RemoteProtocolError`` and put the
connection in ERROR; our own misuse raises ``LocalProtocolError``. No sockets, clocks or logging here: drivers
live in ``parent/`` and ``enclave/``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final

from salmiac.protocol import cbor

PROTOCOL_VERSION: Final = 1
LENGTH_BYTES: Final = 4
MAX_MESSAGE: Final = 1 << 20  # an Output chunk is at most MAX_OUTPUT_CHUNK; everything else is small
MAX_OUTPUT_CHUNK: Final = 64 * 1024
MAX_ARGS: Final = 4096
MAX_ARG_BYTES: Final = 128 * 1024
MAX_ENV: Final = 4096
MAX_LOG_BYTES: Final = 4096
MAX_CONFIG_BYTES: Final = 256 * 1024
CONFIG_KEYS: Final = frozenset({"network"})
"""What ``Start.config`` may carry; each value is validated by its owner (``protocol.netconfig``...)."""


class ProtocolError(Exception):
    def __init__(self, msg: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("use LocalProtocolError or RemoteProtocolError")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or out of order."""


class Role(enum.Enum):
    PARENT = "parent"
    ENCLAVE = "enclave"


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


# --- messages -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[str] = ""
    SENDER: ClassVar[Role]


@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of the enclave: it booted and is ready for its runtime parameters."""

    TYPE: ClassVar[str] = "hello"
    SENDER: ClassVar[Role] = Role.ENCLAVE
    version: int
    init_version: str


@dataclass(frozen=True, slots=True)
class Start(Message):
    """Runtime parameters from the parent. Everything here is untrusted input for the enclave.

    ``args``: replaces the image's CMD (like ``docker run IMAGE ARGS``), None keeps it.
    ``env``: extra "KEY=VALUE" entries (run -e), applied over the measured image env.
    ``time_ns``: wall clock to set at boot (the enclave has no RTC it can trust; this is only a clock).
    ``config``: opaque-to-this-layer dict of further options (network, storage) validated by their owners.
    """

    TYPE: ClassVar[str] = "start"
    SENDER: ClassVar[Role] = Role.PARENT
    time_ns: int
    args: list[str] | None = None
    env: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Signal(Message):
    """Deliver a signal to the app (SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 only)."""

    TYPE: ClassVar[str] = "signal"
    SENDER: ClassVar[Role] = Role.PARENT
    signum: int


class Stream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2


@dataclass(frozen=True, slots=True)
class Output(Message):
    TYPE: ClassVar[str] = "output"
    SENDER: ClassVar[Role] = Role.ENCLAVE
    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Log(Message):
    """A diagnostic line of the enclave init itself (not the app)."""

    TYPE: ClassVar[str] = "log"
    SENDER: ClassVar[Role] = Role.ENCLAVE
    level: str
    message: str


@dataclass(frozen=True, slots=True)
class Exited(Message):
    """The app ended: ``status`` is what a shell reports (exit code, or 128+N when killed by signal N)."""

    TYPE: ClassVar[str] = "exited"
    SENDER: ClassVar[Role] = Role.ENCLAVE
    status: int
    signal: int | None = None


ALLOWED_SIGNALS: Final = frozenset({1, 2, 3, 10, 12, 15})  # HUP INT QUIT USR1 USR2 TERM
LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error"})

MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls for cls in (Hello, Start, Signal, Output, Log, Exited)
}


# --- encoding -------------------------------------------------------------------------------------------------


def encode_message(msg: Message) -> bytes:
    body: dict[str, Any] = {"type": msg.TYPE}
    for f in fields(msg):
        body[f.name] = getattr(msg, f.name)
    try:
        payload = cbor.dumps(body)
    except cbor.CborError as exc:  # e.g. a config value CBOR cannot carry
        raise LocalProtocolError(f"{msg.TYPE}: {exc}") from exc
    if len(payload) > MAX_MESSAGE:
        raise LocalProtocolError(f"{msg.TYPE} message of {len(payload)} bytes exceeds {MAX_MESSAGE}")
    return len(payload).to_bytes(LENGTH_BYTES, "big") + payload


def _fail(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(msg)


def _str_list(name: str, value: Any, max_items: int) -> list[str]:
    if not isinstance(value, list) or len(value) > max_items:
        raise _fail(f"{name}: expected a list of at most {max_items} strings")
    total = 0
    for item in value:
        if not isinstance(item, str) or "\0" in item:
            raise _fail(f"{name}: items must be strings without NUL")
        total += len(item)
    if total > MAX_ARG_BYTES:
        raise _fail(f"{name}: {total} bytes exceeds {MAX_ARG_BYTES}")
    return list(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(msg: Message) -> None:
    """Type and range checks on a decoded message (the peer may be hostile)."""
    match msg:
        case Hello(version=v, init_version=iv):
            if not isinstance(v, int) or isinstance(v, bool) or not isinstance(iv, str) or len(iv) > 64:
                raise _fail("hello: bad version fields")
        case Start(time_ns=t, args=args, env=env, config=config):
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < 1 << 63:
                raise _fail("start: time_ns must be a non-negative 63-bit integer")
            if args is not None:
                _str_list("start.args", args, MAX_ARGS)
            for entry in _str_list("start.env", env, MAX_ENV):
                key, sep, _ = entry.partition("=")
                if not sep or not key:
                    raise _fail(f"start.env: {entry[:40]!r} is not KEY=VALUE")
            if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
                raise _fail("start.config: expected a map with string keys")
            unknown = sorted(set(config) - CONFIG_KEYS)
            if unknown:
                raise _fail(f"start.config: unknown option {unknown[0][:40]!r}")
            if "network" in config and not isinstance(config["network"], dict):
                raise _fail("start.config: network must be a map")
            try:
                config_size = len(cbor.dumps(config))
            except cbor.CborError as exc:  # only on send: whatever we decoded re-encodes
                raise _fail(f"start.config: {exc}") from exc
            if config_size > MAX_CONFIG_BYTES:
                raise _fail("start.config: too large")
        case Signal(signum=s):
            # Type first: a list is unhashable (TypeError in the set lookup) and 15.0 == 15 would slip through.
            if not _is_int(s) or s not in ALLOWED_SIGNALS:
                raise _fail(f"signal: signal {s!r} may not be forwarded")
        case Output(stream=s, data=d):
            if (
                not _is_int(s)
                or s not in (Stream.STDOUT, Stream.STDERR)
                or not isinstance(d, bytes)
                or len(d) > MAX_OUTPUT_CHUNK
            ):
                raise _fail("output: bad stream or data")
        case Log(level=lv, message=m):
            if not isinstance(lv, str) or lv not in LOG_LEVELS or not isinstance(m, str) or len(m) > MAX_LOG_BYTES:
                raise _fail("log: bad level or message")
        case Exited(status=st, signal=sig):
            if not isinstance(st, int) or isinstance(st, bool) or not 0 <= st <= 255:
                raise _fail("exited: status must be 0..255")
            if sig is not None and (not isinstance(sig, int) or isinstance(sig, bool) or not 1 <= sig <= 64):
                raise _fail("exited: bad signal number")


def decode_message(payload: bytes) -> Message:
    """Decode one message body (without the length prefix), rejecting anything unexpected."""
    try:
        body = cbor.loads(payload)
    except cbor.CborError as exc:
        raise _fail(f"bad CBOR: {exc}") from exc
    if not isinstance(body, dict):
        raise _fail("message is not a map")
    kind = body.pop("type", None)
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise _fail(f"unknown message type {kind!r}")
    names = {f.name for f in fields(cls)}
    unknown = set(body) - names
    if unknown:
        raise _fail(f"{kind}: unknown field {sorted(map(str, unknown))[0]!r}")
    try:
        msg = cls(**body)
    except TypeError as exc:  # a required field is missing
        raise _fail(f"{kind}: {exc}") from exc
    _validate(msg)
    return msg


# --- connection state machine --------------------------------------------------------------------------------


class State(enum.Enum):
    AWAIT_HELLO = "await-hello"  # nothing exchanged yet
    AWAIT_START = "await-start"  # Hello sent/received
    RUNNING = "running"  # Start sent/received
    EXITED = "exited"  # Exited sent/received; only Signal (late, ignored) may still arrive
    CLOSED = "closed"  # EOF
    ERROR = "error"


class ControlConnection:
    """One end of the control channel. ``role`` is who *we* are."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.AWAIT_HELLO
        self._buf = bytearray()
        self._eof = False

    # receiving
    def receive_data(self, data: bytes) -> None:
        if data:
            if self._eof:
                raise LocalProtocolError("data after EOF")
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Message | NeedData | None:
        """Next message from the peer, NEED_DATA, or None at a clean EOF."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("connection is in ERROR state")
        try:
            if len(self._buf) < LENGTH_BYTES:
                return self._at_eof()
            length = int.from_bytes(self._buf[:LENGTH_BYTES], "big")
            if length == 0 or length > MAX_MESSAGE:
                raise _fail(f"message length {length} out of range")
            if len(self._buf) < LENGTH_BYTES + length:
                return self._at_eof()
            payload = bytes(self._buf[LENGTH_BYTES : LENGTH_BYTES + length])
            del self._buf[: LENGTH_BYTES + length]
            msg = decode_message(payload)
            self._transition(msg, incoming=True)
            return msg
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def _at_eof(self) -> NeedData | None:
        if not self._eof:
            return NEED_DATA
        if self._buf:
            raise _fail("EOF inside a message")
        self.state = State.CLOSED
        return None

    # sending
    def send(self, msg: Message) -> bytes:
        if msg.SENDER is not self.role:
            raise LocalProtocolError(f"{self.role.value} may not send {msg.TYPE}")
        # What we send must pass the peer's checks, or the peer would drop the whole connection over it.
        try:
            _validate(msg)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from exc
        data = encode_message(msg)  # before the transition: a message we cannot encode changes no state
        self._transition(msg, incoming=False)
        return data

    def _transition(self, msg: Message, *, incoming: bool) -> None:
        err: type[ProtocolError] = RemoteProtocolError if incoming else LocalProtocolError
        expected_sender = (Role.ENCLAVE if self.role is Role.PARENT else Role.PARENT) if incoming else self.role
        if msg.SENDER is not expected_sender:
            raise err(f"{msg.TYPE} may not come from the {expected_sender.value}")
        state = self.state
        match msg:
            case Hello() if state is State.AWAIT_HELLO:
                self.state = State.AWAIT_START
            case Start() if state is State.AWAIT_START:
                self.state = State.RUNNING
            case Output() if state is State.RUNNING:
                pass
            case Log() if state in (State.AWAIT_START, State.RUNNING, State.EXITED):
                pass  # boot diagnostics before Start, shutdown steps after Exited
            case Signal() if state in (State.RUNNING, State.EXITED):
                pass
            case Exited() if state in (State.AWAIT_START, State.RUNNING):
                # AWAIT_START: the init could not even start the app (bad parameters, setup failure).
                self.state = State.EXITED
            case _:
                raise err(f"unexpected {msg.TYPE} in state {state.value}")
