"""Sans-IO NBD (Network Block Device) protocol: fixed newstyle handshake and simple-reply transmission.

Both roles live here, with no sockets, clocks or loggers, in the shape of h11:

* ``NbdServer(exports)`` and ``NbdClient(export_name)`` are state machines. ``receive_data(bytes)`` feeds
  bytes from the peer (``b""`` = EOF), ``next_event()`` returns the next event the peer sent or
  ``NEED_DATA``, and ``send(event)`` returns the bytes that carry one of our events.
* Events are frozen dataclasses. Their constructors check field ranges and raise ``LocalProtocolError``;
  anything the peer does wrong surfaces as ``RemoteProtocolError`` from ``next_event()`` and puts the
  connection in the ERROR state for good.
* The server knows its exports, so it decides what a handshake option deserves: ``reply_for(event)`` gives
  the standard answer (the driver then ``send()``s it). Transmission requests are answered by the driver,
  which does the I/O, with ``Reply`` / ``ReadReply``; a request that is well framed but invalid (offset past
  the end, write to a read-only export, unknown command...) arrives as ``BadRequest`` carrying the errno
  the spec asks for, and ``reply_for`` turns it into the error ``Reply``.

What is implemented (facts from the protocol document, NetworkBlockDevice/nbd doc/proto.md):
handshake flags FIXED_NEWSTYLE and NO_ZEROES; options EXPORT_NAME, GO, INFO, LIST, ABORT;
STRUCTURED_REPLY and every other option are refused with NBD_REP_ERR_UNSUP (so only simple replies are
ever used); infos NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE; commands READ, WRITE, DISC, FLUSH, TRIM,
WRITE_ZEROES (with NO_HOLE), the FUA flag on all of them. TLS, structured replies, block status, CACHE and
extended headers are not implemented; a client asking for them gets a refusal, never a broken stream.

Bounds (the peer is untrusted in both directions): an option's data is capped at ``MAX_OPTION_DATA``,
a handshake at ``MAX_OPTIONS`` options, READ and WRITE lengths at the export's ``max_block``
(at most ``MAX_REQUEST``); a WRITE whose payload is over the cap is a ``RemoteProtocolError`` before any
byte of it is buffered, a WRITE that is in range of the cap but out of the export is drained without
being kept.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Final

from salmiac.errors import RuntimeFailure

# --------------------------------------------------------------------------------------------------
# Wire constants (values from proto.md)

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# Handshake flags (server, 16 bits) and client flags (32 bits) share bit meanings.
FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
SERVER_HANDSHAKE_FLAGS: Final = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
KNOWN_CLIENT_FLAGS: Final = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# Transmission flags (16 bits).
FLAG_HAS_FLAGS: Final = 1 << 0
FLAG_READ_ONLY: Final = 1 << 1
FLAG_SEND_FLUSH: Final = 1 << 2
FLAG_SEND_FUA: Final = 1 << 3
FLAG_ROTATIONAL: Final = 1 << 4
FLAG_SEND_TRIM: Final = 1 << 5
FLAG_SEND_WRITE_ZEROES: Final = 1 << 6
FLAG_SEND_DF: Final = 1 << 7
FLAG_CAN_MULTI_CONN: Final = 1 << 8
FLAG_SEND_RESIZE: Final = 1 << 9
FLAG_SEND_CACHE: Final = 1 << 10
FLAG_SEND_FAST_ZERO: Final = 1 << 11


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ERR_BIT: Final = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERR_BIT | 1
    ERR_POLICY = REP_ERR_BIT | 2
    ERR_INVALID = REP_ERR_BIT | 3
    ERR_PLATFORM = REP_ERR_BIT | 4
    ERR_TLS_REQD = REP_ERR_BIT | 5
    ERR_UNKNOWN = REP_ERR_BIT | 6
    ERR_SHUTDOWN = REP_ERR_BIT | 7
    ERR_BLOCK_SIZE_REQD = REP_ERR_BIT | 8
    ERR_TOO_BIG = REP_ERR_BIT | 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4


class Errno(enum.IntEnum):
    """The only error values the protocol allows on the wire (not the host's errno numbering)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# --------------------------------------------------------------------------------------------------
# Bounds

MAX_STRING: Final = 4096  # proto.md: strings MUST be no longer than 4096 bytes
MAX_OPTION_DATA: Final = 4 + MAX_STRING + 2 + 2 * 64  # a GO/INFO with the longest name and 64 info requests
MAX_OPTIONS: Final = 64  # options per handshake before we call it a denial of service
MAX_OPTION_REPLY: Final = 4 + 2 * MAX_STRING  # a REP_SERVER with name and description
MAX_EXPORTS_LISTED: Final = 4096
MAX_REQUEST: Final = 32 * 1024 * 1024  # the spec's default maximum payload when none was negotiated
MAX_EXPORT_SIZE: Final = (1 << 63) - 1  # offsets must stay representable as off_t
U16: Final = (1 << 16) - 1
U32: Final = (1 << 32) - 1
U64: Final = (1 << 64) - 1

_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
_GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_CLIENT_FLAGS = struct.Struct(">I")
_REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_INFO_EXPORT = struct.Struct(">HQH")  # info type, size, flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")  # info type, minimum, preferred, maximum
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
ZEROES_124: Final = bytes(124)

REQUEST_SIZE: Final = _REQUEST.size
SIMPLE_REPLY_SIZE: Final = _SIMPLE_REPLY.size


# --------------------------------------------------------------------------------------------------
# Errors


class ProtocolError(RuntimeFailure):
    """Base of the two NBD protocol errors; not raised itself."""

    def __init__(self, message: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(message)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol or the connection's state forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection is unusable (hard disconnect)."""


def _check_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > MAX_STRING or "\0" in name:
        raise LocalProtocolError(f"NBD export name must be at most {MAX_STRING} bytes without NUL")
    return raw


def _check_range(what: str, value: int, top: int) -> None:
    if not 0 <= value <= top:
        raise LocalProtocolError(f"NBD {what} {value} out of range 0..{top}")


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


# --------------------------------------------------------------------------------------------------
# Events


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
"""Returned by ``next_event()`` when more bytes from the peer are needed."""
PAUSED: Final = _Sentinel("PAUSED")
"""Returned by ``next_event()`` when it is our turn to send (an option awaits our answer)."""


class Event:
    """Base class of everything ``next_event()`` returns and ``send()`` accepts."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server says about one export. ``flags()`` derives the transmission flags."""

    size: int
    read_only: bool = False
    multi_conn: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_REQUEST

    def __post_init__(self) -> None:
        _check_range("export size", self.size, MAX_EXPORT_SIZE)
        if not _is_power_of_two(self.min_block) or self.min_block > 65536:
            raise LocalProtocolError(f"NBD minimum block size {self.min_block} is not a power of 2 <= 64 KiB")
        if not _is_power_of_two(self.preferred_block) or not self.min_block <= self.preferred_block:
            raise LocalProtocolError(f"NBD preferred block size {self.preferred_block} is invalid")
        if not self.preferred_block <= self.max_block <= MAX_REQUEST or self.max_block % self.min_block:
            raise LocalProtocolError(f"NBD maximum block size {self.max_block} is invalid")

    def flags(self) -> int:
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH
        if self.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        if self.multi_conn:
            flags |= FLAG_CAN_MULTI_CONN
        return flags


# Handshake, server -> client


@dataclass(frozen=True, slots=True)
class Greeting(Event):
    """The server's opening: magic numbers and handshake flags."""

    flags: int = SERVER_HANDSHAKE_FLAGS

    def __post_init__(self) -> None:
        _check_range("handshake flags", self.flags, U16)


@dataclass(frozen=True, slots=True)
class OptionAck(Event):
    """NBD_REP_ACK to an option that has nothing else to say (ABORT)."""

    option: int


@dataclass(frozen=True, slots=True)
class OptionError(Event):
    """An error reply (NBD_REP_ERR_*) to an option; the handshake goes on."""

    option: int
    reply: int
    message: str = ""

    def __post_init__(self) -> None:
        if not self.reply & REP_ERR_BIT or self.reply > U32:
            raise LocalProtocolError(f"NBD option reply {self.reply:#x} is not an error")
        _check_name(self.message)


@dataclass(frozen=True, slots=True)
class ExportList(Event):
    """The answer to OPT_LIST: one NBD_REP_SERVER per name, then NBD_REP_ACK."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.names) > MAX_EXPORTS_LISTED:
            raise LocalProtocolError(f"more than {MAX_EXPORTS_LISTED} NBD exports to list")
        for name in self.names:
            _check_name(name)

    @property
    def option(self) -> int:
        return Opt.LIST


@dataclass(frozen=True, slots=True)
class ExportDetails(Event):
    """A granted GO / INFO / EXPORT_NAME. After GO or EXPORT_NAME the transmission phase starts."""

    option: int
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_REQUEST

    def __post_init__(self) -> None:
        if self.option not in (Opt.GO, Opt.INFO, Opt.EXPORT_NAME):
            raise LocalProtocolError(f"NBD export details answer GO, INFO or EXPORT_NAME, not {self.option}")
        _check_range("export size", self.size, MAX_EXPORT_SIZE)
        _check_range("transmission flags", self.flags, U16)
        for what, value in (("min", self.min_block), ("preferred", self.preferred_block),
                            ("max", self.max_block)):
            _check_range(f"{what} block size", value, U32)


# Handshake, client -> server


@dataclass(frozen=True, slots=True)
class ClientFlags(Event):
    flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

    def __post_init__(self) -> None:
        _check_range("client flags", self.flags, U32)


@dataclass(frozen=True, slots=True)
class OptExportName(Event):
    name: str

    def __post_init__(self) -> None:
        _check_name(self.name)


@dataclass(frozen=True, slots=True)
class OptGo(Event):
    name: str
    info_requests: tuple[int, ...] = (Info.BLOCK_SIZE,)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.info_requests) > 64 or any(not 0 <= i <= U16 for i in self.info_requests):
            raise LocalProtocolError("NBD info requests must be at most 64 16-bit values")


@dataclass(frozen=True, slots=True)
class OptInfo(Event):
    name: str
    info_requests: tuple[int, ...] = (Info.BLOCK_SIZE,)

    def __post_init__(self) -> None:
        _check_name(self.name)
        if len(self.info_requests) > 64 or any(not 0 <= i <= U16 for i in self.info_requests):
            raise LocalProtocolError("NBD info requests must be at most 64 16-bit values")


@dataclass(frozen=True, slots=True)
class OptList(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptAbort(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptStructuredReply(Event):
    pass


@dataclass(frozen=True, slots=True)
class OptRejected(Event):
    """Server side only: an option the server refuses without looking further (unknown, malformed,
    unsupported). ``reply_for`` answers it with ``OptionError(option, reply, reason)``."""

    option: int
    reply: int
    reason: str


# Transmission, client -> server


@dataclass(frozen=True, slots=True)
class Read(Event):
    handle: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_range("handle", self.handle, U64)
        _check_range("offset", self.offset, U64)
        _check_range("length", self.length, U32)


@dataclass(frozen=True, slots=True)
class Write(Event):
    handle: int
    offset: int
    data: bytes | bytearray | memoryview
    fua: bool = False

    def __post_init__(self) -> None:
        _check_range("handle", self.handle, U64)
        _check_range("offset", self.offset, U64)
        _check_range("length", len(self.data), U32)


@dataclass(frozen=True, slots=True)
class Flush(Event):
    handle: int

    def __post_init__(self) -> None:
        _check_range("handle", self.handle, U64)


@dataclass(frozen=True, slots=True)
class Trim(Event):
    handle: int
    offset: int
    length: int
    fua: bool = False

    def __post_init__(self) -> None:
        _check_range("handle", self.handle, U64)
        _check_range("offset", self.offset, U64)
        _check_range("length", self.length, U32)


@dataclass(frozen=True, slots=True)
class WriteZeroes(Event):
    handle: int
    offset: int
    length: int
    fua: bool = False
    no_hole: bool = False

    def __post_init__(self) -> None:
        _check_range("handle", self.handle, U64)
        _check_range("offset", self.offset, U64)
        _check_range("length", self.length, U32)


@dataclass(frozen=True, slots=True)
class Disconnect(Event):
    """NBD_CMD_DISC: the client will send nothing more; the server answers outstanding requests and closes."""


@dataclass(frozen=True, slots=True)
class BadRequest(Event):
    """Server side only: a well-framed request that must fail with ``error`` (already drained)."""

    handle: int
    error: int
    reason: str


# Transmission, server -> client


@dataclass(frozen=True, slots=True)
class Reply(Event):
    """A simple reply without data: success of WRITE/FLUSH/TRIM/WRITE_ZEROES, or any error."""

    handle: int
    error: int = Errno.OK

    def __post_init__(self) -> None:
        _check_range("handle", self.handle, U64)
        _check_range("error", self.error, U32)


@dataclass(frozen=True, slots=True)
class ReadReply(Event):
    """A successful simple reply to READ, carrying exactly the requested bytes."""

    handle: int
    data: bytes | bytearray | memoryview

    def __post_init__(self) -> None:
        _check_range("handle", self.handle, U64)


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side (``receive_data(b"")``) at a message boundary."""


# --------------------------------------------------------------------------------------------------
# State: everything that changes the connection's phase lives here, and it does not know our role.


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    GREETING = "greeting"  # server must send Greeting
    CLIENT_FLAGS = "client flags"  # client must send ClientFlags
    OPTIONS = "options"  # client may send an option
    OPTION_REPLY = "option reply"  # server must answer the pending option
    TRANSMISSION = "transmission"  # requests and replies
    DISCONNECTING = "disconnecting"  # client sent DISC; server may still answer outstanding requests
    CLOSED = "closed"
    ERROR = "error"


_OPTION_EVENTS: tuple[type[Event], ...] = (
    OptExportName, OptGo, OptInfo, OptList, OptAbort, OptStructuredReply, OptRejected,
)
_REQUEST_EVENTS: tuple[type[Event], ...] = (Read, Write, Flush, Trim, WriteZeroes, BadRequest)
_REPLY_EVENTS: tuple[type[Event], ...] = (Reply, ReadReply)

# (state, who sends, event type) -> next state. A missing key is a protocol error. Answers to options
# are resolved in ``_ConnectionState.process`` because their next state depends on the option.
_TRANSITIONS: dict[tuple[State, Role, type[Event]], State] = {
    (State.GREETING, Role.SERVER, Greeting): State.CLIENT_FLAGS,
    (State.CLIENT_FLAGS, Role.CLIENT, ClientFlags): State.OPTIONS,
    **{(State.OPTIONS, Role.CLIENT, ev): State.OPTION_REPLY for ev in _OPTION_EVENTS},
    **{(State.TRANSMISSION, Role.CLIENT, ev): State.TRANSMISSION for ev in _REQUEST_EVENTS},
    (State.TRANSMISSION, Role.CLIENT, Disconnect): State.DISCONNECTING,
    **{(State.TRANSMISSION, Role.SERVER, ev): State.TRANSMISSION for ev in _REPLY_EVENTS},
    **{(State.DISCONNECTING, Role.SERVER, ev): State.DISCONNECTING for ev in _REPLY_EVENTS},
}

# Which answers fit which pending option, and where each leads.
_ANSWERS: dict[int, dict[type[Event], State]] = {
    Opt.EXPORT_NAME: {ExportDetails: State.TRANSMISSION},
    Opt.GO: {ExportDetails: State.TRANSMISSION, OptionError: State.OPTIONS},
    Opt.INFO: {ExportDetails: State.OPTIONS, OptionError: State.OPTIONS},
    Opt.LIST: {ExportList: State.OPTIONS, OptionError: State.OPTIONS},
    Opt.ABORT: {OptionAck: State.CLOSED, OptionError: State.CLOSED},
}
_REFUSAL_ONLY: dict[type[Event], State] = {OptionError: State.OPTIONS}


_READ: Final = int(Cmd.READ)
_WRITE: Final = int(Cmd.WRITE)
_DISC: Final = int(Cmd.DISC)
_FLUSH: Final = int(Cmd.FLUSH)
_TRIM: Final = int(Cmd.TRIM)
_WRITE_ZEROES: Final = int(Cmd.WRITE_ZEROES)
# command -> (transmission flag that must have been offered, command flags it accepts). FUA is accepted
# everywhere as proto.md asks ("the server MUST accept all commands with this bit set").
_COMMAND_RULES: Final[dict[int, tuple[int, int]]] = {
    _READ: (FLAG_HAS_FLAGS, CMD_FLAG_FUA),
    _WRITE: (FLAG_HAS_FLAGS, CMD_FLAG_FUA),
    _FLUSH: (FLAG_SEND_FLUSH, CMD_FLAG_FUA),
    _TRIM: (FLAG_SEND_TRIM, CMD_FLAG_FUA),
    _WRITE_ZEROES: (FLAG_SEND_WRITE_ZEROES, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE),
}


def option_code(event: Event) -> int:
    """The NBD_OPT_* number an option event travels as."""
    match event:
        case OptExportName():
            return Opt.EXPORT_NAME
        case OptGo():
            return Opt.GO
        case OptInfo():
            return Opt.INFO
        case OptList():
            return Opt.LIST
        case OptAbort():
            return Opt.ABORT
        case OptStructuredReply():
            return Opt.STRUCTURED_REPLY
        case OptRejected(option=option):
            return option
    raise LocalProtocolError(f"{type(event).__name__} is not an NBD option")


class _ConnectionState:
    def __init__(self) -> None:
        self.state = State.GREETING
        self.pending_option: int | None = None
        self.options_seen = 0

    def process(self, sender: Role, event: Event) -> None:
        """Apply ``event`` sent by ``sender``; raise LocalProtocolError if it is not allowed now."""
        if self.state is State.OPTION_REPLY and sender is Role.SERVER:
            assert self.pending_option is not None  # set on entering OPTION_REPLY
            answers = _ANSWERS.get(self.pending_option, _REFUSAL_ONLY)
            next_state = answers.get(type(event))
            if next_state is None or getattr(event, "option", None) != self.pending_option:
                raise LocalProtocolError(
                    f"{type(event).__name__} does not answer pending NBD option {self.pending_option}")
            self.pending_option = None
            self.state = next_state
            return
        next_state = _TRANSITIONS.get((self.state, sender, type(event)))
        if next_state is None:
            raise LocalProtocolError(
                f"{sender.value} cannot send {type(event).__name__} in NBD state {self.state.value}")
        if next_state is State.OPTION_REPLY:
            self.options_seen += 1
            if self.options_seen > MAX_OPTIONS:
                raise LocalProtocolError(f"more than {MAX_OPTIONS} NBD options in one handshake")
            self.pending_option = option_code(event)
        self.state = next_state

    def close(self) -> None:
        if self.state is not State.ERROR:
            self.state = State.CLOSED


# --------------------------------------------------------------------------------------------------
# Shared connection machinery


Chunk = bytes | bytearray | memoryview


class _ReceiveBuffer:
    """Received bytes kept as the chunks they arrived in, so a payload that lies within one chunk is
    handed out as a view of it instead of being copied (WRITE data, READ replies)."""

    def __init__(self) -> None:
        self._chunks: deque[Chunk] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, data: bytes | bytearray | memoryview) -> None:
        chunk = data if isinstance(data, bytes) else bytes(data)  # never keep a view of a caller's buffer
        self._chunks.append(chunk)
        self._len += len(chunk)

    def head(self, size: int) -> Chunk | None:
        """Contiguous bytes from the read position, at least ``size`` of them (maybe more: callers
        ``unpack_from`` the prefix), not consumed; None if fewer are buffered."""
        if self._len < size:
            return None
        if not size:
            return b""
        first = self._chunks[0]
        if len(first) < size:
            # Join only the bytes asked for: the chunk that completes a header often carries a large
            # payload, which stays where it is and can still be handed out as a view.
            parts: list[Chunk] = []
            got = 0
            while got < size:
                part = self._chunks.popleft()
                if got + len(part) > size:
                    self._chunks.appendleft(memoryview(part)[size - got :])
                    part = memoryview(part)[: size - got]
                parts.append(part)
                got += len(part)
            first = b"".join(parts)
            self._chunks.appendleft(first)
        return first

    def take(self, size: int) -> Chunk | None:
        """Consume and return ``size`` bytes (a view when they lie in one chunk); None if short."""
        if self._len < size:
            return None
        if not size:
            return b""
        first = self._chunks[0]
        if len(first) == size:
            self._chunks.popleft()
            self._len -= size
            return first
        if len(first) > size:
            view = memoryview(first)
            self._chunks[0] = view[size:]
            self._len -= size
            return view[:size]
        out = bytearray(size)
        got = 0
        while got < size:
            part = self._chunks.popleft()
            n = min(len(part), size - got)
            out[got : got + n] = part[:n]
            if n < len(part):
                self._chunks.appendleft(memoryview(part)[n:])
            got += n
        self._len -= size
        return out

    def skip(self, size: int) -> int:
        """Drop up to ``size`` bytes; return how many were dropped."""
        dropped = 0
        while dropped < size and self._chunks:
            part = self._chunks[0]
            n = min(len(part), size - dropped)
            if n == len(part):
                self._chunks.popleft()
            else:
                self._chunks[0] = memoryview(part)[n:]
            dropped += n
        self._len -= dropped
        return dropped

    def dump(self) -> bytes:
        return b"".join(self._chunks)


class _Connection:
    our_role: ClassVar[Role]
    their_role: ClassVar[Role]

    def __init__(self) -> None:
        self._cs = _ConnectionState()
        self._buf = _ReceiveBuffer()
        self._eof = False

    @property
    def state(self) -> State:
        return self._cs.state

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes received from the peer; ``b""`` means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("NBD data received after EOF")
            return
        if data:
            self._buf.append(data)
        else:
            self._eof = True

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not consumed, and whether EOF was seen (like h11)."""
        return self._buf.dump(), self._eof

    def next_event(self) -> Event | _Sentinel:
        if self._cs.state is State.ERROR:
            raise RemoteProtocolError("NBD connection is in the ERROR state")
        try:
            event = self._parse()
            if event is NEED_DATA:
                if self._eof:
                    return self._at_eof()
                return NEED_DATA
            if event is PAUSED:
                return PAUSED
            assert isinstance(event, Event)
            self._received(event)
            return event
        except ProtocolError as exc:
            self._cs.state = State.ERROR
            raise RemoteProtocolError(str(exc)) from exc

    def _at_eof(self) -> Event:
        if self._buf:
            raise RemoteProtocolError(f"NBD peer closed in the middle of a message ({len(self._buf)} bytes)")
        self._cs.close()
        return ConnectionClosed()

    def send(self, event: Event) -> bytes:
        """The bytes that carry ``event`` to the peer (payloads joined; see send_with_data_passthrough)."""
        return b"".join(self.send_with_data_passthrough(event))

    def send_with_data_passthrough(self, event: Event) -> list[bytes | bytearray | memoryview]:
        """Like ``send`` but a payload is returned as its own element, not copied (for writev)."""
        if self._cs.state is State.ERROR:
            raise LocalProtocolError("cannot send on an NBD connection in the ERROR state")
        try:
            self._check_send(event)
            self._cs.process(self.our_role, event)
            return self._encode(event)
        except LocalProtocolError:
            self._cs.state = State.ERROR
            raise

    def _received(self, event: Event) -> None:
        try:
            self._cs.process(self.their_role, event)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from exc

    def _take(self, size: int) -> bytes | None:
        """Consume ``size`` bytes as an independent bytes object (for small handshake messages)."""
        chunk = self._buf.take(size)
        return None if chunk is None else bytes(chunk)

    # Role-specific parts
    def _parse(self) -> Event | _Sentinel:
        raise NotImplementedError

    def _check_send(self, event: Event) -> None:
        raise NotImplementedError

    def _encode(self, event: Event) -> list[bytes | bytearray | memoryview]:
        raise NotImplementedError


def _option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


# --------------------------------------------------------------------------------------------------
# Server role


class NbdServer(_Connection):
    """Server side. ``exports`` maps export names to what is served; "" is the default export."""

    our_role = Role.SERVER
    their_role = Role.CLIENT

    def __init__(self, exports: Mapping[str, ExportInfo]) -> None:
        super().__init__()
        for name in exports:
            _check_name(name)
        self.exports: Mapping[str, ExportInfo] = dict(exports)
        self.no_zeroes = False
        self.export_name: str | None = None
        self.export: ExportDetails | None = None  # as granted, what requests are checked against
        self._pending_name: str | None = None
        self._drain = 0  # payload bytes of a rejected WRITE still to discard
        self._drained: BadRequest | None = None
        self._in_flight: dict[int, int] = {}  # handle -> READ length, or -1 for requests without data

    # ---- parsing what the client sends
    def _parse(self) -> Event | _Sentinel:
        state = self._cs.state
        if state is State.CLIENT_FLAGS:
            raw = self._take(_CLIENT_FLAGS.size)
            if raw is None:
                return NEED_DATA
            (flags,) = _CLIENT_FLAGS.unpack(raw)
            if flags & ~KNOWN_CLIENT_FLAGS:
                raise RemoteProtocolError(f"NBD client sent unknown client flags {flags:#x}")
            if not flags & FLAG_FIXED_NEWSTYLE:
                raise RemoteProtocolError("NBD client does not speak fixed newstyle negotiation")
            self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
            return ClientFlags(flags)
        if state is State.OPTIONS:
            return self._parse_option()
        if state is State.TRANSMISSION:
            return self._parse_request()
        if state in (State.GREETING, State.OPTION_REPLY):
            return PAUSED  # our turn; whatever the client sent meanwhile waits in the buffer
        if self._buf:
            raise RemoteProtocolError(f"NBD client sent data in state {state.value}")
        return NEED_DATA

    def _parse_option(self) -> Event | _Sentinel:
        header = self._buf.head(_OPTION_HEADER.size)
        if header is None:
            return NEED_DATA
        magic, option, length = _OPTION_HEADER.unpack_from(header)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"NBD option has bad magic {magic:#x}")
        if length > MAX_OPTION_DATA:
            raise RemoteProtocolError(f"NBD option {option} data of {length} bytes exceeds {MAX_OPTION_DATA}")
        if len(self._buf) < _OPTION_HEADER.size + length:
            return NEED_DATA
        self._buf.skip(_OPTION_HEADER.size)
        data = self._take(length)
        assert data is not None
        return self._decode_option(option, data)

    def _decode_option(self, option: int, data: bytes) -> Event:
        if option == Opt.EXPORT_NAME:
            name = self._decode_name(data)
            if name is None or name not in self.exports:
                # The spec gives no way to refuse EXPORT_NAME but closing the connection.
                raise RemoteProtocolError(f"NBD client asked for unknown export {data[:64]!r}")
            return OptExportName(name)
        if option in (Opt.GO, Opt.INFO):
            if len(data) < 6:
                return OptRejected(option, Rep.ERR_INVALID, "option data too short")
            (name_len,) = _U32.unpack_from(data)
            if name_len > len(data) - 6:
                return OptRejected(option, Rep.ERR_INVALID, "export name length exceeds option data")
            name = self._decode_name(data[4 : 4 + name_len])
            (count,) = _U16.unpack_from(data, 4 + name_len)
            rest = data[6 + name_len :]
            if len(rest) != 2 * count or count > 64:
                return OptRejected(option, Rep.ERR_INVALID, "info request count does not match option data")
            if name is None:
                return OptRejected(option, Rep.ERR_INVALID, "export name is not valid UTF-8 without NUL")
            requests = struct.unpack(f">{count}H", rest)
            return OptGo(name, requests) if option == Opt.GO else OptInfo(name, requests)
        if option == Opt.LIST:
            if data:
                return OptRejected(option, Rep.ERR_INVALID, "NBD_OPT_LIST carries no data")
            return OptList()
        if option == Opt.ABORT:
            return OptAbort()
        if option == Opt.STRUCTURED_REPLY:
            if data:
                return OptRejected(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY carries no data")
            return OptStructuredReply()
        return OptRejected(option, Rep.ERR_UNSUP, f"option {option} is not supported")

    @staticmethod
    def _decode_name(raw: bytes) -> str | None:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\0" in name or len(raw) > MAX_STRING:
            return None
        return name

    def _parse_request(self) -> Event | _Sentinel:
        if self._drain:
            self._drain -= self._buf.skip(self._drain)
            if self._drain:
                return NEED_DATA
            assert self._drained is not None
            event, self._drained = self._drained, None
            return event
        buf = self._buf
        header = buf.head(REQUEST_SIZE)
        if header is None:
            return NEED_DATA
        magic, flags, cmd, handle, offset, length = _REQUEST.unpack_from(header)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"NBD request has bad magic {magic:#x}")
        if cmd == _DISC:
            buf.skip(REQUEST_SIZE)
            return Disconnect()
        if handle in self._in_flight:
            raise RemoteProtocolError(f"NBD client reused handle {handle:#x} while it is in flight")
        export = self.export
        assert export is not None  # set when entering TRANSMISSION
        if cmd == _WRITE:
            if length > export.max_block:
                raise RemoteProtocolError(f"NBD write of {length} bytes exceeds the {export.max_block} limit")
            error = self._check_request(cmd, flags, offset, length, export)
            if error is not None:  # drain the payload as it comes, keeping none of it
                buf.skip(REQUEST_SIZE)
                self._drain = length
                self._drained = BadRequest(handle, error[0], error[1])
                self._in_flight[handle] = -1
                return self._parse_request()
            if len(buf) < REQUEST_SIZE + length:
                return NEED_DATA
            buf.skip(REQUEST_SIZE)
            data = buf.take(length)
            assert data is not None  # the whole payload is buffered (checked above)
            self._in_flight[handle] = -1
            return Write(handle, offset, data, bool(flags & CMD_FLAG_FUA))
        buf.skip(REQUEST_SIZE)
        error = self._check_request(cmd, flags, offset, length, export)
        if error is not None:
            self._in_flight[handle] = -1
            return BadRequest(handle, error[0], error[1])
        fua = bool(flags & CMD_FLAG_FUA)
        if cmd == _READ:
            self._in_flight[handle] = length
            return Read(handle, offset, length)
        self._in_flight[handle] = -1
        if cmd == _FLUSH:
            return Flush(handle)
        if cmd == _TRIM:
            return Trim(handle, offset, length, fua)
        return WriteZeroes(handle, offset, length, fua, bool(flags & CMD_FLAG_NO_HOLE))

    @staticmethod
    def _check_request(cmd: int, flags: int, offset: int, length: int,
                       export: ExportDetails) -> tuple[int, str] | None:
        """The errno proto.md asks for when a well-framed request cannot be served, else None."""
        rule = _COMMAND_RULES.get(cmd)
        if rule is None:
            return Errno.EINVAL, f"unsupported command {cmd}"
        if cmd not in (_READ, _FLUSH) and export.flags & FLAG_READ_ONLY:
            return Errno.EPERM, "export is read-only"
        if not export.flags & rule[0]:
            return Errno.EINVAL, f"command {cmd} was not offered"
        if flags & ~rule[1]:
            return Errno.EINVAL, f"command flags {flags:#x} not valid for command {cmd}"
        if cmd == _FLUSH:
            return None  # offset and length are reserved; the Linux client leaves them unset
        if cmd == _READ and length > export.max_block:
            return Errno.EINVAL, f"read of {length} bytes exceeds the {export.max_block} limit"
        if offset + length > export.size:
            past_end = Errno.ENOSPC if cmd in (_WRITE, _WRITE_ZEROES) else Errno.EINVAL
            return past_end, f"range {offset}+{length} is past the export size {export.size}"
        return None

    # ---- what the server sends
    def _check_send(self, event: Event) -> None:
        if isinstance(event, Reply | ReadReply):
            expected = self._in_flight.get(event.handle)
            if expected is None:
                raise LocalProtocolError(f"no NBD request with handle {event.handle:#x} is in flight")
            if isinstance(event, ReadReply) and len(event.data) != expected:
                raise LocalProtocolError(
                    f"NBD read reply carries {len(event.data)} bytes, request asked for {expected}")
            if isinstance(event, Reply) and event.error == Errno.OK and expected > 0:
                raise LocalProtocolError("a successful NBD read reply must carry the data (ReadReply)")

    def _encode(self, event: Event) -> list[bytes | bytearray | memoryview]:
        match event:
            case ReadReply(handle=handle, data=data):
                del self._in_flight[handle]
                return [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, Errno.OK, handle), data]
            case Reply(handle=handle, error=error):
                del self._in_flight[handle]
                return [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)]
            case Greeting(flags=flags):
                return [_GREETING.pack(NBDMAGIC, IHAVEOPT, flags)]
            case OptionAck(option=option):
                return [_option_reply(option, Rep.ACK)]
            case OptionError(option=option, reply=reply, message=message):
                return [_option_reply(option, reply, message.encode())]
            case ExportList(names=names):
                out: list[bytes | bytearray | memoryview] = []
                for name in names:
                    raw = name.encode()
                    out.append(_option_reply(Opt.LIST, Rep.SERVER, _U32.pack(len(raw)) + raw))
                out.append(_option_reply(Opt.LIST, Rep.ACK))
                return out
            case ExportDetails():
                return self._encode_details(event)
        raise LocalProtocolError(f"the NBD server cannot send {type(event).__name__}")

    def _encode_details(self, ev: ExportDetails) -> list[bytes | bytearray | memoryview]:
        if ev.option == Opt.EXPORT_NAME:
            tail = b"" if self.no_zeroes else ZEROES_124
            return [_EXPORT_NAME_REPLY.pack(ev.size, ev.flags) + tail]
        export_info = _INFO_EXPORT.pack(Info.EXPORT, ev.size, ev.flags)
        block_info = _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, ev.min_block, ev.preferred_block, ev.max_block)
        return [_option_reply(ev.option, Rep.INFO, export_info),
                _option_reply(ev.option, Rep.INFO, block_info),
                _option_reply(ev.option, Rep.ACK)]

    def _received(self, event: Event) -> None:
        super()._received(event)
        if isinstance(event, OptExportName | OptGo | OptInfo):
            self._pending_name = event.name

    def send_with_data_passthrough(self, event: Event) -> list[bytes | bytearray | memoryview]:
        out = super().send_with_data_passthrough(event)
        if isinstance(event, ExportDetails) and self._cs.state is State.TRANSMISSION:
            # Requests are checked against what the client was told, so both sides agree.
            self.export_name, self.export = self._pending_name, event
        return out

    def reply_for(self, event: Event) -> Event:
        """The standard answer to a handshake option or a ``BadRequest``, from ``exports``."""
        match event:
            case OptExportName(name=name):
                return self._details(Opt.EXPORT_NAME, self.exports[name])
            case OptGo(name=name) | OptInfo(name=name):
                option = option_code(event)
                info = self.exports.get(name)
                if info is None:
                    return OptionError(option, Rep.ERR_UNKNOWN, f"no export named {name[:256]!r}")
                return self._details(option, info)
            case OptList():
                return ExportList(tuple(sorted(self.exports)))
            case OptAbort():
                return OptionAck(Opt.ABORT)
            case OptStructuredReply():
                return OptionError(Opt.STRUCTURED_REPLY, Rep.ERR_UNSUP, "structured replies not supported")
            case OptRejected(option=option, reply=reply, reason=reason):
                return OptionError(option, reply, reason)
            case BadRequest(handle=handle, error=error):
                return Reply(handle, error)
        raise LocalProtocolError(f"no standard NBD answer to {type(event).__name__}")

    @staticmethod
    def _details(option: int, info: ExportInfo) -> ExportDetails:
        return ExportDetails(option, info.size, info.flags(), info.min_block, info.preferred_block,
                             info.max_block)


# --------------------------------------------------------------------------------------------------
# Client role


class NbdClient(_Connection):
    """Client side, for one export. The caller sends ``ClientFlags`` and options itself; see
    ``handshake_events()`` for the usual sequence."""

    our_role = Role.CLIENT
    their_role = Role.SERVER

    def __init__(self, export_name: str = "") -> None:
        super().__init__()
        _check_name(export_name)
        self.export_name = export_name
        self.server_flags = 0
        self.no_zeroes = False
        self.export: ExportDetails | None = None
        self._listed: list[str] = []
        self._info: dict[int, tuple[int, ...]] = {}
        self._in_flight: dict[int, int] = {}  # handle -> READ length, or -1

    def handshake_events(self) -> list[Event]:
        """What the client sends after the Greeting to enter transmission with OPT_GO."""
        flags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if self.server_flags & FLAG_NO_ZEROES else 0)
        return [ClientFlags(flags), OptGo(self.export_name, (Info.BLOCK_SIZE,))]

    # ---- parsing what the server sends
    def _parse(self) -> Event | _Sentinel:
        state = self._cs.state
        if state is State.GREETING:
            raw = self._take(_GREETING.size)
            if raw is None:
                return NEED_DATA
            magic, opt_magic, flags = _GREETING.unpack(raw)
            if magic != NBDMAGIC:
                raise RemoteProtocolError(f"not an NBD server (magic {magic:#x})")
            if opt_magic != IHAVEOPT:
                raise RemoteProtocolError("NBD server does not use newstyle negotiation")
            if not flags & FLAG_FIXED_NEWSTYLE:
                raise RemoteProtocolError("NBD server does not support fixed newstyle negotiation")
            self.server_flags = flags
            return Greeting(flags)
        if state is State.OPTION_REPLY:
            return self._parse_option_reply()
        if state in (State.TRANSMISSION, State.DISCONNECTING):
            return self._parse_reply()
        if state in (State.CLIENT_FLAGS, State.OPTIONS):
            return PAUSED  # our turn to send; anything the server sent meanwhile waits in the buffer
        if self._buf:
            raise RemoteProtocolError(f"NBD server sent data in state {state.value}")
        return NEED_DATA

    def _parse_option_reply(self) -> Event | _Sentinel:
        option = self._cs.pending_option
        assert option is not None
        if option == Opt.EXPORT_NAME:
            size = _EXPORT_NAME_REPLY.size + (0 if self.no_zeroes else 124)
            raw = self._take(size)
            if raw is None:
                return NEED_DATA
            export_size, flags = _EXPORT_NAME_REPLY.unpack_from(raw)
            return self._granted(option, export_size, flags, None)
        while True:
            header = self._buf.head(_REPLY_HEADER.size)
            if header is None:
                return NEED_DATA
            magic, replied, reply, length = _REPLY_HEADER.unpack_from(header)
            if magic != OPTION_REPLY_MAGIC:
                raise RemoteProtocolError(f"NBD option reply has bad magic {magic:#x}")
            if replied != option:
                raise RemoteProtocolError(f"NBD server answered option {replied}, we asked {option}")
            if length > MAX_OPTION_REPLY:
                raise RemoteProtocolError(f"NBD option reply of {length} bytes exceeds {MAX_OPTION_REPLY}")
            if len(self._buf) < _REPLY_HEADER.size + length:
                return NEED_DATA
            self._buf.skip(_REPLY_HEADER.size)
            data = self._take(length)
            assert data is not None
            event = self._option_reply_event(option, reply, data)
            if event is not None:
                return event

    def _option_reply_event(self, option: int, reply: int, data: bytes) -> Event | None:
        if reply & REP_ERR_BIT:
            self._listed, self._info = [], {}
            return OptionError(option, reply, data[:MAX_STRING].decode("utf-8", "replace").replace("\0", ""))
        if reply == Rep.SERVER and option == Opt.LIST:
            if len(data) < 4 or _U32.unpack_from(data)[0] > len(data) - 4:
                raise RemoteProtocolError("NBD_REP_SERVER with a bad name length")
            if len(self._listed) >= MAX_EXPORTS_LISTED:
                raise RemoteProtocolError(f"NBD server listed more than {MAX_EXPORTS_LISTED} exports")
            (name_len,) = _U32.unpack_from(data)
            try:
                self._listed.append(data[4 : 4 + name_len].decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise RemoteProtocolError("NBD_REP_SERVER export name is not UTF-8") from exc
            return None
        if reply == Rep.INFO and option in (Opt.GO, Opt.INFO):
            if len(data) < 2:
                raise RemoteProtocolError("NBD_REP_INFO shorter than its type")
            (kind,) = _U16.unpack_from(data)
            if kind == Info.EXPORT:
                if len(data) != _INFO_EXPORT.size:
                    raise RemoteProtocolError("NBD_INFO_EXPORT has the wrong length")
                self._info[kind] = _INFO_EXPORT.unpack(data)[1:]
            elif kind == Info.BLOCK_SIZE:
                if len(data) != _INFO_BLOCK_SIZE.size:
                    raise RemoteProtocolError("NBD_INFO_BLOCK_SIZE has the wrong length")
                self._info[kind] = _INFO_BLOCK_SIZE.unpack(data)[1:]
            # Other info types are ignored, as the spec tells clients to.
            return None
        if reply == Rep.ACK:
            if option == Opt.LIST:
                names, self._listed = tuple(self._listed), []
                return ExportList(names)
            if option in (Opt.GO, Opt.INFO):
                info, self._info = self._info, {}
                if Info.EXPORT not in info:
                    raise RemoteProtocolError("NBD server acknowledged GO/INFO without NBD_INFO_EXPORT")
                size, flags = info[Info.EXPORT]
                return self._granted(option, size, flags, info.get(Info.BLOCK_SIZE))
            if option == Opt.STRUCTURED_REPLY:
                raise RemoteProtocolError("NBD server enabled structured replies, which this client lacks")
            return OptionAck(option)
        raise RemoteProtocolError(f"unexpected NBD option reply {reply:#x} to option {option}")

    def _granted(self, option: int, size: int, flags: int, blocks: tuple[int, ...] | None) -> ExportDetails:
        if size > MAX_EXPORT_SIZE:
            raise RemoteProtocolError(f"NBD export size {size} is too large")
        if not flags & FLAG_HAS_FLAGS:
            flags = FLAG_HAS_FLAGS  # proto.md: MUST always be 1; treat an old server's 0 as "no features"
        min_block, preferred, max_block = blocks if blocks is not None else (1, 4096, MAX_REQUEST)
        if not _is_power_of_two(min_block) or min_block > 65536:
            raise RemoteProtocolError(f"NBD minimum block size {min_block} is invalid")
        if not _is_power_of_two(preferred) or preferred < min_block:
            raise RemoteProtocolError(f"NBD preferred block size {preferred} is invalid")
        if max_block < preferred or (max_block != U32 and max_block % min_block):
            raise RemoteProtocolError(f"NBD maximum block size {max_block} is invalid")
        details = ExportDetails(option, size, flags, min_block, preferred, min(max_block, MAX_REQUEST))
        if option != Opt.INFO:
            self.export = details
        return details

    def _parse_reply(self) -> Event | _Sentinel:
        buf = self._buf
        header = buf.head(SIMPLE_REPLY_SIZE)
        if header is None:
            return NEED_DATA
        magic, error, handle = _SIMPLE_REPLY.unpack_from(header)
        if magic != SIMPLE_REPLY_MAGIC:
            raise RemoteProtocolError(f"NBD reply has bad magic {magic:#x}")
        expected = self._in_flight.get(handle)
        if expected is None:
            raise RemoteProtocolError(f"NBD reply for handle {handle:#x}, which is not in flight")
        if error or expected < 0:
            buf.skip(SIMPLE_REPLY_SIZE)
            del self._in_flight[handle]
            return Reply(handle, error)
        if len(buf) < SIMPLE_REPLY_SIZE + expected:
            return NEED_DATA
        buf.skip(SIMPLE_REPLY_SIZE)
        data = buf.take(expected)
        assert data is not None  # the whole payload is buffered (checked above)
        del self._in_flight[handle]
        return ReadReply(handle, data)

    # ---- what the client sends
    def _check_send(self, event: Event) -> None:
        if isinstance(event, ClientFlags):
            if event.flags & ~KNOWN_CLIENT_FLAGS:
                raise LocalProtocolError(f"unknown NBD client flags {event.flags:#x}")
            if event.flags & FLAG_NO_ZEROES and not self.server_flags & FLAG_NO_ZEROES:
                raise LocalProtocolError("NO_ZEROES was not offered by the NBD server")
            self.no_zeroes = bool(event.flags & FLAG_NO_ZEROES)
            return
        if isinstance(event, OptRejected | BadRequest):
            raise LocalProtocolError(f"{type(event).__name__} is a server-side event")
        if isinstance(event, Read | Write | Flush | Trim | WriteZeroes):
            if event.handle in self._in_flight:
                raise LocalProtocolError(f"NBD handle {event.handle:#x} is already in flight")
            export = self.export
            if export is None:
                return  # the state table refuses requests before transmission
            self._check_request(event, export)

    @staticmethod
    def _check_request(event: Read | Write | Flush | Trim | WriteZeroes, export: ExportDetails) -> None:
        needs = {Flush: FLAG_SEND_FLUSH, Trim: FLAG_SEND_TRIM, WriteZeroes: FLAG_SEND_WRITE_ZEROES}
        flag = needs.get(type(event))
        if flag is not None and not export.flags & flag:
            raise LocalProtocolError(f"NBD server does not offer {type(event).__name__}")
        if isinstance(event, Write | Trim | WriteZeroes):
            if export.flags & FLAG_READ_ONLY:
                raise LocalProtocolError("NBD export is read-only")
            if event.fua and not export.flags & FLAG_SEND_FUA:
                raise LocalProtocolError("NBD server does not offer FUA")
        if isinstance(event, Read | Write):
            length = event.length if isinstance(event, Read) else len(event.data)
            if length > export.max_block:
                raise LocalProtocolError(f"NBD request of {length} bytes exceeds {export.max_block}")
        if isinstance(event, Read | Write | Trim | WriteZeroes):
            length = len(event.data) if isinstance(event, Write) else event.length
            if event.offset + length > export.size:
                raise LocalProtocolError(f"NBD request {event.offset}+{length} is past the export end")

    def _encode(self, event: Event) -> list[bytes | bytearray | memoryview]:
        pack = _REQUEST.pack
        match event:
            case Read(handle=handle, offset=offset, length=length):
                self._in_flight[handle] = length
                return [pack(REQUEST_MAGIC, 0, Cmd.READ, handle, offset, length)]
            case Write(handle=handle, offset=offset, data=data, fua=fua):
                self._in_flight[handle] = -1
                flags = CMD_FLAG_FUA if fua else 0
                return [pack(REQUEST_MAGIC, flags, Cmd.WRITE, handle, offset, len(data)), data]
            case Flush(handle=handle):
                self._in_flight[handle] = -1
                return [pack(REQUEST_MAGIC, 0, Cmd.FLUSH, handle, 0, 0)]
            case Trim(handle=handle, offset=offset, length=length, fua=fua):
                self._in_flight[handle] = -1
                return [pack(REQUEST_MAGIC, CMD_FLAG_FUA if fua else 0, Cmd.TRIM, handle, offset, length)]
            case WriteZeroes(handle=handle, offset=offset, length=length, fua=fua, no_hole=no_hole):
                self._in_flight[handle] = -1
                flags = (CMD_FLAG_FUA if fua else 0) | (CMD_FLAG_NO_HOLE if no_hole else 0)
                return [pack(REQUEST_MAGIC, flags, Cmd.WRITE_ZEROES, handle, offset, length)]
            case Disconnect():
                return [pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0)]
            case ClientFlags(flags=flags):
                return [_CLIENT_FLAGS.pack(flags)]
            case OptExportName(name=name):
                return [_OPTION_HEADER.pack(IHAVEOPT, Opt.EXPORT_NAME, len(name.encode())) + name.encode()]
            case OptGo(name=name, info_requests=infos) | OptInfo(name=name, info_requests=infos):
                raw = name.encode()
                body = (_U32.pack(len(raw)) + raw + _U16.pack(len(infos))
                        + struct.pack(f">{len(infos)}H", *infos))
                return [_OPTION_HEADER.pack(IHAVEOPT, option_code(event), len(body)) + body]
            case OptList() | OptAbort() | OptStructuredReply():
                return [_OPTION_HEADER.pack(IHAVEOPT, option_code(event), 0)]
        raise LocalProtocolError(f"the NBD client cannot send {type(event).__name__}")


__all__ = [
    "MAX_REQUEST", "NEED_DATA", "PAUSED", "BadRequest", "ClientFlags", "ConnectionClosed", "Disconnect", "Errno",
    "Event", "ExportDetails", "ExportInfo", "ExportList", "Flush", "Greeting", "LocalProtocolError",
    "NbdClient", "NbdServer", "OptAbort", "OptExportName", "OptGo", "OptInfo", "OptList", "OptRejected",
    "OptStructuredReply", "OptionAck", "OptionError", "ProtocolError", "Read", "ReadReply",
    "RemoteProtocolError", "Reply", "State", "Trim", "Write", "WriteZeroes",
]
