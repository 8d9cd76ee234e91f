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
_COMPACT_AT = 1 << 16
"""Drop consumed bytes from the receive buffer once this many have piled up."""


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


class FrameDecoder:
    """Turns stream bytes into frames.

    ``receive_data(b"")`` means end of stream. ``next_frame()`` returns a frame (``bytes``), ``NEED_DATA``
    or ``CLOSED``; bad frames are skipped and counted in ``stats`` on the way.
    """

    __slots__ = ("_buf", "_closed", "_pos", "_skip", "max_frame", "stats")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = _check_max_frame(max_frame)
        self.stats = FrameStats()
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0  # bytes of a rejected frame still to discard
        self._closed = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into frames (bounded by ``LENGTH_SIZE + max_frame``)."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise FrameProtocolError("receive_data after end of stream")
        if not data:
            self._closed = True
            return
        if self._skip:
            # Discard straight from the input so a rejected frame is never buffered.
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
            if not data:
                return
        self._buf += data

    def next_frame(self) -> bytes | Need:
        while True:
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos
            if self._skip:
                n = min(self._skip, avail)
                self._skip -= n
                pos += n
                avail -= n
                self._pos = pos
                if self._skip:
                    return self._need()
            if avail < LENGTH_SIZE:
                return self._need()
            (length,) = _LENGTH.unpack_from(buf, pos)
            if length == 0 or length < MIN_FRAME or length > self.max_frame:
                self._count_bad(length)
                self._pos = pos + LENGTH_SIZE
                self._skip = length
                continue
            end = pos + LENGTH_SIZE + length
            if end > len(buf):
                return self._need()
            frame = bytes(buf[pos + LENGTH_SIZE : end])
            self._pos = end
            if end >= _COMPACT_AT:
                del buf[:end]
                self._pos = 0
            self.stats.frames += 1
            self.stats.bytes += length
            return frame

    def frames(self) -> list[bytes]:
        """All complete frames now available. Same result as calling ``next_frame`` until it stops; the
        common case (well-formed frames, nothing to skip) runs in one tight loop for the drivers."""
        out: list[bytes] = []
        if not self._skip:
            buf, pos, end_of_data = self._buf, self._pos, len(self._buf)
            unpack, max_frame, total = _LENGTH.unpack_from, self.max_frame, 0
            with memoryview(buf) as view:
                while end_of_data - pos >= LENGTH_SIZE:
                    (length,) = unpack(buf, pos)
                    end = pos + LENGTH_SIZE + length
                    if length < MIN_FRAME or length > max_frame or end > end_of_data:
                        break  # a bad length or an incomplete frame: next_frame handles both
                    out.append(bytes(view[pos + LENGTH_SIZE : end]))
                    total += length
                    pos = end
            self.stats.frames += len(out)
            self.stats.bytes += total
            self._pos = pos
            if pos >= _COMPACT_AT:
                del buf[:pos]
                self._pos = 0
        while isinstance(frame := self.next_frame(), bytes):
            out.append(frame)
        return out

    def _count_bad(self, length: int) -> None:
        if length == 0:
            self.stats.dropped_empty += 1
        elif length < MIN_FRAME:
            self.stats.dropped_runt += 1
        else:
            self.stats.dropped_oversize += 1

    def _need(self) -> Need:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        if not self._closed:
            return NEED_DATA
        if self._pos < len(self._buf) or self._skip:
            self.stats.dropped_truncated += 1
            self._buf.clear()
            self._pos = 0
            self._skip = 0
        return CLOSED


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
