"""atheris fuzz target for the control channel: what a hostile parent (or enclave) can put on the stream.

Run (atheris is not a project dependency; install it where you fuzz):
    pip install atheris
    python fuzz/fuzz_control.py -max_len=4096 -runs=1000000 [CORPUS_DIR]

The first input byte picks the role and how the rest is chunked, so byte-by-byte delivery and EOF placement are
explored too. The only exception allowed out of the protocol is RemoteProtocolError (and CborError out of the
codec); anything else, or a decoded message that does not re-encode to itself, is a finding.
"""

from __future__ import annotations

import contextlib
import sys

import atheris  # type: ignore[import-untyped]  # installed only where fuzzing runs

with atheris.instrument_imports():
    from salmiac.protocol import cbor
    from salmiac.protocol.control import (
        ControlConnection,
        Message,
        RemoteProtocolError,
        Role,
        decode_message,
        encode_message,
    )


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    role = Role.PARENT if mode & 1 else Role.ENCLAVE
    chunk = 1 + (mode >> 1 & 0x0F)  # 1..16 bytes per receive_data
    conn = ControlConnection(role)
    try:
        for piece in _chunks(rest, chunk):
            conn.receive_data(piece)
            while isinstance(event := conn.next_event(), Message):
                if decode_message(encode_message(event)[4:]) != event:
                    raise AssertionError(f"{event!r} does not survive a round trip")
        if mode & 0x80:
            conn.receive_data(b"")
            while isinstance(conn.next_event(), Message):
                pass
    except RemoteProtocolError:
        pass

    # The body decoder on its own, without the framing and the state machine in the way.
    with contextlib.suppress(RemoteProtocolError):
        decode_message(rest)
    with contextlib.suppress(cbor.CborError):
        cbor.loads(rest, allowed_tags=(18,))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
