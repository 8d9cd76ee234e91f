"""Ethernet frames over one byte stream (vsock, virtio-serial, a Unix socket): sans-IO framing.

Wire format, both directions::

    frame  := length payload
    length := u32, big-endian, number of payload bytes
    payload:= one Ethernet frame (destination MAC first, no FCS, no preamble), preceded by a 10-byte
              virtio-net header when the link was offered with segmentation offload (``protocol.vnet``)

Many frames may be written with one write (batching); a reader may see them split anywhere.

Bounds. A plain frame is at most ``MAX_FRAME`` (largest MTU we accept, 9001, plus a 14-byte Ethernet header and
a 4-byte VLAN tag); with offload a frame may be a 64 KiB TCP segment the kernel cuts up later, so lengths need
more than 16 bits. Each endpoint sets its own ``max_frame`` (never above ``MAX_PAYLOAD``). A frame that is
empty, shorter than an Ethernet header, or longer than the decoder's ``max_frame`` is a protocol violation: it
is skipped and counted in ``FrameStats``, never handed on and never a crash.

Resynchronisation. The length field is trusted for *skipping*: after a bad length the decoder discards
exactly that many bytes, without buffering them, and goes on with the next length, so whatever a length says
memory stays bounded. A peer that is merely buggy (one frame too big) stays in step; a peer that sends
garbage can only produce more garbage frames, and that it could do anyway with well-formed lengths - the
consumer of frames (a TAP device, the parent's network) treats every payload as hostile regardless.
Only an incomplete frame at end of stream ends the conversation, as ``CLOSED`` with
``dropped_truncated`` counted.

Nothing here touches sockets, clocks or loggers: drivers live in ``salmiac.framepump``,
``salmiac.enclave.network`` and ``salmiac.parent.netrelay``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass, fields

ETH_HEADER = 14
"""Destination MAC, source MAC, EtherType."""
VLAN_TAG = 4
MAX_MTU = 9001
"""Largest MTU offered to the enclave (AWS jumbo frames)."""
MAX_FRAME = MAX_MTU + ETH_HEADER + VLAN_TAG
"""Largest plain Ethernet frame (no offload)."""
MAX_PAYLOAD = 1 << 17
"""Largest ``max_frame`` an endpoint may set: a 64 KiB segment, its Ethernet/VLAN header and a virtio-net
header fit with room to spare."""
MIN_FRAME = ETH_HEADER
"""A frame shorter than an Ethernet header cannot be delivered anywhere."""

_LENGTH = struct.Struct(">I")
LENGTH_SIZE = _LENGTH.size


class Need(enum.Enum):
    """What ``FrameDecoder.next_frame`` returns when it has no frame to give."""

    NEED_DATA = "need-data"
    CLOSED = "closed"


NEED_DATA = Need.NEED_DATA
CLOSED = Need.CLOSED


class FrameProtocolError(Exception):
    """Misuse of the framing API by our own code (data after EOF, a bad ``max_frame``)."""


@dataclass(slots=True)
class FrameStats:
    """Counters for one direction of one endpoint. Plain ints, cheap to bump per frame."""

    frames: int = 0
    bytes: int = 0
    dropped_oversize: int = 0
    dropped_empty: int = 0
    dropped_runt: int = 0
    dropped_truncated: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_oversize + self.dropped_empty + self.dropped_runt + self.dropped_truncated

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _check_max_frame(max_frame: int) -> int:
    if not MIN_FRAME <= max_frame <= MAX_PAYLOAD:
        raise FrameProtocolError(f"max_frame {max_frame} outside [{MIN_FRAME}, {MAX_PAYLOAD}]")
    return max_frame


DECODER_CAPACITY = 1 << 20
"""Bytes a decoder takes in per read by default, besides room for one partial frame."""


class FrameDecoder:
    """Turns stream bytes into frames.

    Two ways to feed it. ``receive_data(data)`` copies bytes in (``b""``: end of stream), and ``frames()`` or
    ``next_frame()`` hand out ``bytes``. A driver moving much data reads straight into the decoder instead:
    ``read_buffer()`` is free space to read into, ``received(n)`` says how much was read there (0: end of
    stream), and ``frame_views()`` hands out the frames as views of the decoder's buffer, valid until the next
    ``read_buffer()`` or ``receive_data()``: no copy between the stream and the device. ``next_frame()``
    returns a frame, ``NEED_DATA`` or ``CLOSED``; bad frames are skipped and counted in ``stats`` on the way.

    The buffer has a fixed size (``capacity`` plus room for one frame and its length) and never moves, so a view
    cannot outlive its bytes; the unparsed tail moves to its start when room runs low. Given more than fits,
    ``receive_data`` parses complete frames out (kept as ``bytes`` for ``frames()``) to make room, so it takes
    any amount.
    """

    __slots__ = ("_buf", "_closed", "_end", "_ready", "_skip", "_start", "_view", "max_frame", "stats")

    def __init__(self, max_frame: int = MAX_FRAME, capacity: int = DECODER_CAPACITY) -> None:
        self.max_frame = _check_max_frame(max_frame)
        self.stats = FrameStats()
        self._buf = bytearray(max(capacity, 1) + LENGTH_SIZE + max_frame)
        self._view = memoryview(self._buf)
        self._start = 0  # first byte not parsed yet
        self._end = 0  # end of the bytes received
        self._skip = 0  # bytes of a rejected frame still to discard
        self._closed = False
        self._ready: list[bytes] = []  # frames receive_data parsed out to make room

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into frames (bounded by ``LENGTH_SIZE + max_frame`` once parsed)."""
        return self._end - self._start

    # --- zero-copy feeding ---------------------------------------------------------------------------------

    def read_buffer(self) -> memoryview:
        """Free space to read the stream into, at least half the buffer. Voids the views handed out before."""
        if self._closed:
            raise FrameProtocolError("read after end of stream")
        self._make_room()
        return self._view[self._end :]

    def received(self, n: int) -> None:
        """``n`` bytes were read into ``read_buffer()``; 0 means end of stream."""
        if n == 0:
            self._closed = True
        elif 0 < n <= len(self._buf) - self._end:
            self._end += n
        else:
            raise FrameProtocolError(f"received {n} bytes into {len(self._buf) - self._end} of space")

    def frame_views(self) -> list[memoryview]:
        """Every complete frame now available, as views of the buffer."""
        out = [memoryview(f) for f in self._ready] + self._parse()
        self._ready = []
        self._settle()
        return out

    # --- copying feeding -----------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise FrameProtocolError("receive_data after end of stream")
        if not data:
            self._closed = True
            return
        view = memoryview(data)
        while view:
            if self._skip and self._start == self._end:
                # Discard straight from the input so a rejected frame is never buffered.
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            self._make_room()
            if self._end == len(self._buf):
                self._ready += [bytes(f) for f in self._parse()]
                continue
            n = min(len(self._buf) - self._end, len(view))
            self._view[self._end : self._end + n] = view[:n]
            self._end += n
            view = view[n:]

    def frames(self) -> list[bytes]:
        """Every complete frame now available."""
        out = self._ready + [bytes(f) for f in self._parse()]
        self._ready = []
        self._settle()
        return out

    def next_frame(self) -> bytes | Need:
        if not self._ready:
            self._ready = [bytes(f) for f in self._parse()]
        if self._ready:
            return self._ready.pop(0)
        self._settle()
        return CLOSED if self._closed else NEED_DATA

    # --- internals -----------------------------------------------------------------------------------------

    def _parse(self) -> list[memoryview]:
        out: list[memoryview] = []
        buf, view, pos, end = self._buf, self._view, self._start, self._end
        unpack, max_frame, total = _LENGTH.unpack_from, self.max_frame, 0
        while True:
            if self._skip:
                n = min(self._skip, end - pos)
                self._skip -= n
                pos += n
                if self._skip:
                    break
            if end - pos < LENGTH_SIZE:
                break
            (length,) = unpack(buf, pos)
            if length < MIN_FRAME or length > max_frame:
                self._count_bad(length)
                pos += LENGTH_SIZE
                self._skip = length
                continue
            stop = pos + LENGTH_SIZE + length
            if stop > end:
                break
            out.append(view[pos + LENGTH_SIZE : stop])
            total += length
            pos = stop
        self._start = pos
        self.stats.frames += len(out)
        self.stats.bytes += total
        return out

    def _make_room(self) -> None:
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
        elif start and len(self._buf) - end < len(self._buf) // 2:
            k = end - start
            # At most one partial frame moves; through a copy when it overlaps its new place.
            self._view[:k] = self._view[start:end] if k <= start else bytes(self._view[start:end])
            self._start, self._end = 0, k

    def _settle(self) -> None:
        """At end of stream, what is left is an incomplete frame: counted once, then gone."""
        if self._closed and (self._start < self._end or self._skip):
            self.stats.dropped_truncated += 1
            self._start = self._end = self._skip = 0

    def _count_bad(self, length: int) -> None:
        if length == 0:
            self.stats.dropped_empty += 1
        elif length < MIN_FRAME:
            self.stats.dropped_runt += 1
        else:
            self.stats.dropped_oversize += 1


class FrameEncoder:
    """Turns frames into stream bytes. Our own bad frames are dropped and counted, like the peer's."""

    __slots__ = ("max_frame", "stats")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = _check_max_frame(max_frame)
        self.stats = FrameStats()

    def encode(self, frames: Iterable[bytes | bytearray | memoryview]) -> bytes:
        parts: list[bytes | bytearray | memoryview] = []
        stats = self.stats
        pack = _LENGTH.pack
        for frame in frames:
            length = len(frame)
            if length < MIN_FRAME or length > self.max_frame:
                self._count_bad(length)
                continue
            parts.append(pack(length))
            parts.append(frame)
            stats.frames += 1
            stats.bytes += length
        return b"".join(parts)

    def seal(self, buf: bytearray | memoryview, pos: int, length: int) -> int:
        """In-place framing for drivers that read frames straight into their send buffer (readv style).

        The caller has put a ``length``-byte payload at ``buf[pos + LENGTH_SIZE:]``; if the frame is
        acceptable its length is written at ``pos`` and the position after it is returned, otherwise it
        is counted as dropped and ``pos`` is returned so the next frame overwrites it.
        """
        if length < MIN_FRAME or length > self.max_frame:
            self._count_bad(length)
            return pos
        _LENGTH.pack_into(buf, pos, length)
        self.stats.frames += 1
        self.stats.bytes += length
        return pos + LENGTH_SIZE + length

    def _count_bad(self, length: int) -> None:
        if length == 0:
            self.stats.dropped_empty += 1
        elif length < MIN_FRAME:
            self.stats.dropped_runt += 1
        else:
            self.stats.dropped_oversize += 1


def encode_raw(payloads: Iterable[bytes], *, lengths: Iterable[int] | None = None) -> bytes:
    """Build stream bytes with arbitrary (even lying) lengths: for tests and fuzzing of peers."""
    out = bytearray()
    lens = list(lengths) if lengths is not None else None
    for i, payload in enumerate(payloads):
        length = len(payload) if lens is None else lens[i]
        out += _LENGTH.pack(length)
        out += payload
    return bytes(out)
