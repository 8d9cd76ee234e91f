"""atheris target for the frame decoder and the network offer parser (the parent's two untrusted inputs).

    pip install atheris && python fuzz/fuzz_frames.py -max_total_time=300

Invariants checked: decoding never raises, every frame handed on is within bounds, the buffer stays
bounded, and decoding the re-encoded frames gives them back. Offers only ever fail with NetConfigError,
and an accepted offer survives to_dict/from_dict unchanged.
"""

from __future__ import annotations

import json
import sys

import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

with atheris.instrument_imports():
    from salmiac.protocol.frames import CLOSED, MIN_FRAME, FrameDecoder, FrameEncoder
    from salmiac.protocol.netconfig import NetConfigError, NetworkConfig


def fuzz_frames(fdp: atheris.FuzzedDataProvider) -> None:
    max_frame = fdp.ConsumeIntInRange(MIN_FRAME, 9019)
    dec = FrameDecoder(max_frame)
    got: list[bytes] = []
    while fdp.remaining_bytes():
        dec.receive_data(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096)))
        for frame in dec.frames():
            if not MIN_FRAME <= len(frame) <= max_frame:
                raise AssertionError("frame outside bounds")
            got.append(frame)
        if dec.buffered > 2 + max_frame + 4096:
            raise AssertionError("buffer not bounded")
    dec.receive_data(b"")
    dec.frames()
    if dec.next_frame() is not CLOSED:
        raise AssertionError("not closed after EOF")
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
