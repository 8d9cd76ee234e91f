"""atheris fuzz target for the EIF reader: what a hostile image file can make ``read_eif`` do.

Run (atheris is not a project dependency; install it where you fuzz):
    pip install atheris
    python fuzz/fuzz_eif_reader.py -max_len=65536 -runs=1000000 [CORPUS_DIR]

Seed the corpus with a few small EIFs (e.g. ``tests/unit/test_eif_reader.py``'s ``build(VALID)``): a
random file rarely gets past the magic and the section table.

The first input byte picks the mode: bit 0 skips the CRC check, bit 1 recomputes the CRC first so the
mutation reaches the section parsers. The only exception allowed out of the reader is ``EifError``. A file
that is accepted must also be self-consistent: its header re-packs to the same bytes, ``describe()`` is
JSON-serialisable, the extracted kernel/ramdisks are the sections' bytes, and measuring those parts gives
the PCRs the reader computed. Anything else is a finding.
"""

from __future__ import annotations

import json
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import atheris  # type: ignore[import-untyped]  # installed only where fuzzing runs

with atheris.instrument_imports():
    from salmiac.eif import EifError, SectionType, measure_sections, read_eif_bytes

_CRC_OFFSET = 544
_HEADER_SIZE = 548


def _fix_crc(data: bytes) -> bytes:
    if len(data) < _HEADER_SIZE:
        return data
    crc = zlib.crc32(data[:_CRC_OFFSET] + data[_HEADER_SIZE:])
    return data[:_CRC_OFFSET] + struct.pack(">I", crc) + data[_HEADER_SIZE:]


def test_one_input(raw: bytes) -> None:
    if not raw:
        return
    mode, data = raw[0], raw[1:]
    if mode & 2:
        data = _fix_crc(data)
    try:
        image = read_eif_bytes(data, verify_crc=not mode & 1)
    except EifError:
        return

    if image.header.pack() != data[:_HEADER_SIZE]:
        raise AssertionError("accepted header does not re-pack to the same bytes")
    json.dumps(image.describe())
    if image.size != len(data):
        raise AssertionError(f"sections cover {image.size} bytes of a {len(data)}-byte file")
    for section, offset in image.sections:
        start = offset + 12
        if section.section_type == SectionType.CMDLINE and data[start : start + section.size] != (
            image.cmdline.encode("utf-8")
        ):
            raise AssertionError("cmdline is not the cmdline section's bytes")

    with tempfile.TemporaryDirectory() as out:
        kernel, cmdline, ramdisks = image.extract_boot_parts(Path(out))
        pcrs = measure_sections(kernel, cmdline.encode("utf-8"), ramdisks)
    measured = image.measure()
    if (pcrs.pcr0, pcrs.pcr1, pcrs.pcr2) != (measured.pcr0, measured.pcr1, measured.pcr2):
        # Only equal when the kernel and cmdline come first, as nitro-cli lays them out: PCRs follow file order.
        unmeasured = (SectionType.METADATA, SectionType.SIGNATURE)
        types = [s.section_type for s, _ in image.sections if s.section_type not in unmeasured]
        if types[:2] == [SectionType.KERNEL, SectionType.CMDLINE]:
            raise AssertionError("PCRs of the extracted parts differ from the reader's")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
