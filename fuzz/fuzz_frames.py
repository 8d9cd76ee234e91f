"""atheris target for what the parent sends the enclave's network: frames, their virtio-net headers, the offer.

    pip install atheris && python fuzz/fuzz_frames.py -max_total_time=300

Invariants checked: decoding never raises, every frame handed on is within bounds, the buffer stays
bounded, the zero-copy path the pump uses (read_buffer/received/frame_views) gives the same frames and
counters as receive_data, and decoding the re-encoded frames gives them back. A virtio-net header check
answers (never raises) and what it accepts keeps its checksum inside the frame. Offers only ever fail with
NetConfigError, and an accepted offer survives to_dict/from_dict unchanged.
"""

from __future__ import annotations

import json
import sys

import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

with atheris.instrument_imports():
    from salmiac.protocol import vnet
    from salmiac.protocol.frames import CLOSED, LENGTH_SIZE, MIN_FRAME, FrameDecoder, FrameEncoder
    from salmiac.protocol.netconfig import NetConfigError, NetworkConfig


def fuzz_frames(fdp: atheris.FuzzedDataProvider) -> None:
    max_frame = fdp.ConsumeIntInRange(MIN_FRAME, 9019)
    capacity = fdp.ConsumeIntInRange(1, 8192)
    dec, zero_copy = FrameDecoder(max_frame, capacity), FrameDecoder(max_frame, capacity)
    got: list[bytes] = []
    zero_copy_got: list[bytes] = []
    while fdp.remaining_bytes():
        chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096))
        if not chunk:  # the data ran out: b"" would mean end of stream
            break
        dec.receive_data(chunk)
        for frame in dec.frames():
            if not MIN_FRAME <= len(frame) <= max_frame:
                raise AssertionError("frame outside bounds")
            got.append(frame)
        if dec.buffered > LENGTH_SIZE + max_frame:
            raise AssertionError("buffer not bounded")
        while chunk:
            space = zero_copy.read_buffer()
            n = min(len(space), len(chunk))
            space[:n] = chunk[:n]
            chunk = chunk[n:]
            zero_copy.received(n)
            zero_copy_got += [bytes(v) for v in zero_copy.frame_views()]
    dec.receive_data(b"")
    dec.frames()
    if dec.next_frame() is not CLOSED:
        raise AssertionError("not closed after EOF")
    zero_copy.received(0)
    zero_copy_got += [bytes(v) for v in zero_copy.frame_views()]
    if zero_copy_got != got or zero_copy.stats != dec.stats:
        raise AssertionError("zero-copy decoding differs")
    for frame in got:
        if vnet.refusal(frame, max_frame) is None and len(frame) >= vnet.SIZE:
            flags, _gso, _hl, _gs, start, offset = vnet.HEADER.unpack_from(frame)
            if flags & vnet.F_NEEDS_CSUM and start + offset + 2 > len(frame) - vnet.SIZE:
                raise AssertionError("accepted a checksum outside the frame")
    again = FrameDecoder(max_frame)
    again.receive_data(FrameEncoder(max_frame).encode(got))
    if again.frames() != got:
        raise AssertionError("re-encoding changed frames")


def fuzz_offer(data: bytes) -> None:
    try:
        unsafe = json.loads(data)
    except (ValueError, RecursionError):
        return
    try:
        cfg = NetworkConfig.from_dict(unsafe)
    except NetConfigError:
        return
    if NetworkConfig.from_dict(cfg.to_dict()) != cfg:
        raise AssertionError("offer does not round-trip")
    cfg.render_resolv_conf()
    cfg.render_hosts()


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        fuzz_frames(fdp)
    else:
        fuzz_offer(fdp.ConsumeBytes(fdp.remaining_bytes()))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
