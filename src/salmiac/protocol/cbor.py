"""A small, strict CBOR (RFC 8949) codec for the enclave's wire formats.

Why our own: the enclave decodes CBOR that the untrusted parent sends, and it ships in the initramfs where a
native extension is a liability. This codec is stdlib-only and *bounded*: every length is checked against the
bytes actually present before anything is allocated, nesting depth and item counts are capped, and indefinite
lengths are refused. Encoding is deterministic (RFC 8949 section 4.2.1: shortest integer heads, map keys sorted
by their encoded bytes), so equal values give equal bytes. On the host, ``cbor2`` serves as the test oracle.

Supported: unsigned/negative integers (64-bit), byte and text strings, arrays, maps, false/true/null, floats
(decoded from half/single/double, encoded as double), and tags where the caller allows them (COSE uses tag 18).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

MAX_DEPTH = 32
MAX_ITEMS = 1 << 16  # array/map entries per container


class CborError(ValueError):
    """Malformed, non-canonical beyond what we accept, or over a limit."""


@dataclass(frozen=True, slots=True)
class Tag:
    tag: int
    value: Any


def dumps(value: Any) -> bytes:
    out = bytearray()
    _encode(value, out, 0)
    return bytes(out)


def _head(major: int, arg: int, out: bytearray) -> None:
    if arg < 24:
        out.append(major << 5 | arg)
    elif arg < 1 << 8:
        out += bytes((major << 5 | 24, arg))
    elif arg < 1 << 16:
        out.append(major << 5 | 25)
        out += arg.to_bytes(2, "big")
    elif arg < 1 << 32:
        out.append(major << 5 | 26)
        out += arg.to_bytes(4, "big")
    elif arg < 1 << 64:
        out.append(major << 5 | 27)
        out += arg.to_bytes(8, "big")
    else:
        raise CborError(f"integer too large for CBOR: {arg}")


def _encode(value: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise CborError("nesting too deep")
    if value is None:
        out.append(0xF6)
    elif value is True:
        out.append(0xF5)
    elif value is False:
        out.append(0xF4)
    elif isinstance(value, int):
        if value >= 0:
            _head(0, value, out)
        else:
            _head(1, -1 - value, out)
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        _head(2, len(raw), out)
        out += raw
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _head(3, len(raw), out)
        out += raw
    elif isinstance(value, list | tuple):
        _head(4, len(value), out)
        for item in value:
            _encode(item, out, depth + 1)
    elif isinstance(value, dict):
        encoded: list[tuple[bytes, Any]] = []
        for k, v in value.items():
            key_buf = bytearray()
            _encode(k, key_buf, depth + 1)
            encoded.append((bytes(key_buf), v))
        encoded.sort(key=lambda kv: kv[0])
        for i in range(1, len(encoded)):
            if encoded[i][0] == encoded[i - 1][0]:
                raise CborError("duplicate map key")
        _head(5, len(encoded), out)
        for kb, v in encoded:
            out += kb
            _encode(v, out, depth + 1)
    elif isinstance(value, Tag):
        _head(6, value.tag, out)
        _encode(value.value, out, depth + 1)
    elif isinstance(value, float):
        out.append(0xFB)
        out += struct.pack(">d", value)
    else:
        raise CborError(f"cannot encode {type(value).__name__}")


def loads(data: bytes, *, allowed_tags: Collection[int] = ()) -> Any:
    """Decode exactly one item; trailing bytes are an error."""
    dec = _Decoder(memoryview(data), allowed_tags)
    value = dec.item(0)
    if dec.pos != len(data):
        raise CborError(f"{len(data) - dec.pos} trailing bytes after CBOR item")
    return value


class _Decoder:
    __slots__ = ("allowed_tags", "buf", "pos")

    def __init__(self, buf: memoryview, allowed_tags: Collection[int]) -> None:
        self.buf = buf
        self.pos = 0
        self.allowed_tags = allowed_tags

    def _take(self, n: int) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise CborError("truncated CBOR")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def _arg(self, info: int) -> int:
        if info < 24:
            return info
        if info == 24:
            return self._take(1)[0]
        if info == 25:
            return int.from_bytes(self._take(2), "big")
        if info == 26:
            return int.from_bytes(self._take(4), "big")
        if info == 27:
            return int.from_bytes(self._take(8), "big")
        if info == 31:
            raise CborError("indefinite-length items are not accepted")
        raise CborError(f"reserved additional information {info}")

    def item(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CborError("nesting too deep")
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            return self._simple(info)
        arg = self._arg(info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return bytes(self._take(arg))
        if major == 3:
            try:
                return str(self._take(arg), "utf-8")
            except UnicodeDecodeError as exc:
                raise CborError("invalid UTF-8 in text string") from exc
        if major == 4:
            self._check_count(arg)
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            self._check_count(arg)
            result: dict[Any, Any] = {}
            for _ in range(arg):
                key = self.item(depth + 1)
                # A tagged key may wrap a list (unhashable); no format of ours uses tagged keys.
                if isinstance(key, list | dict | Tag):
                    raise CborError("map keys must be scalars")
                if key in result:
                    raise CborError(f"duplicate map key {key!r}")
                result[key] = self.item(depth + 1)
            return result
        # major 6: tag
        if arg not in self.allowed_tags:
            raise CborError(f"unexpected CBOR tag {arg}")
        return Tag(arg, self.item(depth + 1))

    def _check_count(self, count: int) -> None:
        # Every entry needs at least one byte, so a count beyond the remaining input is a lie.
        if count > MAX_ITEMS or count > len(self.buf) - self.pos:
            raise CborError(f"container of {count} items exceeds the input or the limit")

    def _simple(self, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 25:
            return _half_to_float(int.from_bytes(self._take(2), "big"))
        if info == 26:
            return struct.unpack(">f", self._take(4))[0]
        if info == 27:
            return struct.unpack(">d", self._take(8))[0]
        raise CborError(f"unsupported simple value {info}")


def _half_to_float(h: int) -> float:
    exp = (h >> 10) & 0x1F
    mant = h & 0x3FF
    if exp == 0:
        val = math.ldexp(mant, -24)
    elif exp == 31:
        val = math.inf if mant == 0 else math.nan
    else:
        val = math.ldexp(mant + 1024, exp - 25)
    return -val if h & 0x8000 else val
