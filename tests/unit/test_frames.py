"""Framing of Ethernet frames over a stream: whole, byte by byte, with trailing data, hostile lengths."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.protocol.frames import (
    CLOSED,
    LENGTH_SIZE,
    MAX_FRAME,
    MAX_PAYLOAD,
    MIN_FRAME,
    NEED_DATA,
    FrameDecoder,
    FrameEncoder,
    FrameProtocolError,
    encode_raw,
)

ETH = bytes.fromhex("ffffffffffff0200000000010800")


def frame(n: int, fill: int = 0xAB) -> bytes:
    return (ETH + bytes([fill]) * n)[: max(n, MIN_FRAME)] if n >= MIN_FRAME else bytes([fill]) * n


def decode_all(chunks: list[bytes], dec: FrameDecoder | None = None, eof: bool = True) -> list[bytes]:
    dec = dec or FrameDecoder()
    out: list[bytes] = []
    for chunk in chunks:
        dec.receive_data(chunk)
        out += dec.frames()
    if eof:
        dec.receive_data(b"")
        out += dec.frames()
        assert dec.next_frame() is CLOSED
    return out


SAMPLE = [frame(14), frame(60), frame(1514), frame(MAX_FRAME)]


def test_whole_bytewise_and_trailing() -> None:
    wire = FrameEncoder().encode(SAMPLE)
    assert decode_all([wire]) == SAMPLE
    assert decode_all([wire[i : i + 1] for i in range(len(wire))]) == SAMPLE
    dec = FrameDecoder()
    dec.receive_data(wire + struct.pack(">I", 60) + b"x" * 10)
    assert dec.frames() == SAMPLE
    assert dec.next_frame() is NEED_DATA
    assert dec.buffered == 14


def test_wire_format_is_u32_big_endian_length_then_payload() -> None:
    wire = FrameEncoder().encode([frame(20)])
    assert wire[:4] == b"\x00\x00\x00\x14"
    assert wire[4:] == frame(20)
    big = FrameEncoder(max_frame=MAX_PAYLOAD).encode([frame(65563)])
    assert big[:4] == b"\x00\x01\x00\x1b", "a 64 KiB segment with its headers needs more than 16 bits"


def test_oversize_is_skipped_counted_and_stream_continues() -> None:
    dec = FrameDecoder(max_frame=1514)
    big = b"\x01" * 4000
    wire = encode_raw([frame(60), big, frame(61)])
    out = decode_all([wire[i : i + 7] for i in range(0, len(wire), 7)], dec)
    assert out == [frame(60), frame(61)]
    assert dec.stats.dropped_oversize == 1
    assert dec.stats.frames == 2
    # The rejected frame is discarded, never buffered.
    dec2 = FrameDecoder(max_frame=1514)
    dec2.receive_data(struct.pack(">I", 60000))
    assert dec2.next_frame() is NEED_DATA
    dec2.receive_data(b"\0" * 59999)
    assert dec2.buffered == 0
    dec2.receive_data(b"\0" + encode_raw([frame(30)]))
    assert dec2.frames() == [frame(30)]


def test_empty_and_runt_frames_are_dropped() -> None:
    dec = FrameDecoder()
    wire = encode_raw([b"", b"abc", frame(14)])
    assert decode_all([wire], dec) == [frame(14)]
    assert (dec.stats.dropped_empty, dec.stats.dropped_runt) == (1, 1)


def test_truncated_frame_at_eof_is_counted() -> None:
    dec = FrameDecoder()
    wire = FrameEncoder().encode([frame(100)])
    assert decode_all([wire[:-1]], dec) == []
    assert dec.stats.dropped_truncated == 1
    with pytest.raises(FrameProtocolError):
        dec.receive_data(b"more")


def test_eof_inside_skip_is_truncated() -> None:
    dec = FrameDecoder(max_frame=100)
    assert decode_all([struct.pack(">I", 500) + b"\0" * 10], dec) == []
    assert dec.stats.dropped_oversize == 1
    assert dec.stats.dropped_truncated == 1


def test_encoder_drops_bad_frames() -> None:
    enc = FrameEncoder(max_frame=1514)
    wire = enc.encode([b"", b"short", frame(60), b"\0" * 1515])
    assert decode_all([wire]) == [frame(60)]
    assert enc.stats.dropped_empty == 1
    assert enc.stats.dropped_runt == 1
    assert enc.stats.dropped_oversize == 1
    assert enc.stats.frames == 1


def test_bad_max_frame() -> None:
    with pytest.raises(FrameProtocolError):
        FrameDecoder(max_frame=MAX_PAYLOAD + 1)
    with pytest.raises(FrameProtocolError):
        FrameEncoder(max_frame=2)


def test_the_buffer_never_grows_whatever_is_fed() -> None:
    """A small decoder given ten times its capacity in one call: frames are parsed out to make room."""
    dec = FrameDecoder(max_frame=1514, capacity=4096)
    size = len(dec._buf)
    wire = FrameEncoder().encode([frame(1500, i) for i in range(30)])
    dec.receive_data(wire[:-1])
    assert len(dec._buf) == size
    got = dec.frames()
    assert got == [frame(1500, i) for i in range(29)]
    assert dec.buffered == LENGTH_SIZE + 1499
    dec.receive_data(wire[-1:])
    assert dec.frames() == [frame(1500, 29)]


def read_through(dec: FrameDecoder, wire: bytes, chunk: int) -> list[bytes]:
    """The zero-copy way, as the pump drives it: read into the decoder, write out the views."""
    out: list[bytes] = []
    pos = 0
    while pos < len(wire):
        space = dec.read_buffer()
        n = min(len(space), chunk, len(wire) - pos)
        space[:n] = wire[pos : pos + n]
        pos += n
        dec.received(n)
        out += [bytes(v) for v in dec.frame_views()]
    dec.received(0)
    out += [bytes(v) for v in dec.frame_views()]
    return out


@pytest.mark.parametrize("chunk", [1, 7, 1500, 5000, 1 << 20])
def test_zero_copy_reads_give_the_same_frames(chunk: int) -> None:
    frames = [frame(14 + (i * 97) % 1500, i) for i in range(60)]
    wire = encode_raw([b"", b"\x01" * 3000, *frames[:30], b"abc", *frames[30:]])
    dec = FrameDecoder(max_frame=1514, capacity=3000)
    assert read_through(dec, wire, chunk) == frames
    assert (dec.stats.dropped_empty, dec.stats.dropped_oversize, dec.stats.dropped_runt) == (1, 1, 1)
    assert dec.stats.frames == 60


def test_zero_copy_views_are_the_buffer_and_eof_counts_a_cut_frame() -> None:
    dec = FrameDecoder(max_frame=1514, capacity=100)
    wire = FrameEncoder().encode([frame(60), frame(70)])
    space = dec.read_buffer()
    space[: len(wire) - 5] = wire[:-5]
    dec.received(len(wire) - 5)
    (view,) = dec.frame_views()
    assert view.obj is dec._buf, "a view of the decoder's own buffer, not a copy"
    assert bytes(view) == frame(60)
    with pytest.raises(FrameProtocolError):
        dec.received(len(dec._buf))
    dec.received(0)
    assert dec.frame_views() == []
    assert dec.stats.dropped_truncated == 1
    with pytest.raises(FrameProtocolError):
        dec.read_buffer()


frames_st = st.lists(st.binary(min_size=MIN_FRAME, max_size=2000), max_size=20)


@settings(max_examples=200, deadline=None)
@given(frames_st, st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=10))
def test_roundtrip_any_split(frames: list[bytes], cuts: list[int]) -> None:
    wire = FrameEncoder().encode(frames)
    chunks, i, k = [], 0, 0
    while i < len(wire):
        n = cuts[k % len(cuts)]
        chunks.append(wire[i : i + n])
        i += n
        k += 1
    assert decode_all(chunks) == frames


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=5000), st.integers(min_value=MIN_FRAME, max_value=MAX_FRAME))
def test_arbitrary_bytes_never_crash_and_stay_bounded(data: bytes, max_frame: int) -> None:
    dec = FrameDecoder(max_frame=max_frame)
    for i in range(0, len(data), 97):
        dec.receive_data(data[i : i + 97])
        for f in dec.frames():
            assert MIN_FRAME <= len(f) <= max_frame
        assert dec.buffered <= LENGTH_SIZE + max_frame + 97
    dec.receive_data(b"")
    dec.frames()
    assert dec.next_frame() is CLOSED


def test_seal_in_place_matches_encode() -> None:
    enc, ref = FrameEncoder(max_frame=1514), FrameEncoder(max_frame=1514)
    payloads = [frame(60), b"", frame(1515), frame(14), b"abc"]
    buf = bytearray(10_000)
    pos = 0
    for p in payloads:
        buf[pos + LENGTH_SIZE : pos + LENGTH_SIZE + len(p)] = p
        pos = enc.seal(buf, pos, len(p))
    assert bytes(buf[:pos]) == ref.encode(payloads)
    assert enc.stats == ref.stats


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6000), st.integers(min_value=1, max_value=700), st.integers(min_value=1, max_value=2000))
def test_zero_copy_and_copying_agree_on_any_bytes(data: bytes, chunk: int, capacity: int) -> None:
    copying = FrameDecoder(max_frame=600, capacity=capacity)
    expected = decode_all([data[i : i + chunk] for i in range(0, len(data), chunk)], copying)
    zero_copy = FrameDecoder(max_frame=600, capacity=capacity)
    assert read_through(zero_copy, data, chunk) == expected
    assert zero_copy.stats == copying.stats
