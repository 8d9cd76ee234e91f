from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from salmiac.enclave_base import elf

PYTHON = Path(sys.executable).resolve()


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
@pytest.mark.parametrize("binary", [PYTHON, Path("/bin/ls"), Path("/usr/bin/env")])
def test_dynamic_info_matches_readelf(binary: Path) -> None:
    info = elf.dynamic_info(binary.read_bytes())
    dyn = subprocess.run(["readelf", "-d", str(binary)], capture_output=True, text=True, check=True).stdout
    assert list(info.needed) == re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn)
    hdr = subprocess.run(["readelf", "-l", str(binary)], capture_output=True, text=True, check=True).stdout
    interp = re.search(r"Requesting program interpreter: ([^\]]+)\]", hdr)
    assert info.interpreter == (interp.group(1) if interp else None)


def test_section_finds_named_sections() -> None:
    data = Path("/bin/ls").read_bytes()
    interp = elf.section(data, ".interp")
    assert interp is not None and interp.rstrip(b"\0").endswith(b"ld-linux-x86-64.so.2")
    assert elf.section(data, ".no-such-section") is None


def test_not_elf_and_truncated_files_are_elf_errors() -> None:
    with pytest.raises(elf.ElfError, match="not an ELF"):
        elf.dynamic_info(b"#!/bin/sh\n" * 10)
    data = Path("/bin/ls").read_bytes()
    with pytest.raises(elf.ElfError):
        elf.dynamic_info(data[:200])


@given(st.binary(min_size=0, max_size=600))
def test_arbitrary_bytes_after_a_valid_header_only_raise_elf_error(tail: bytes) -> None:
    head = Path("/bin/ls").read_bytes()[:64]
    for blob in (head + tail, head[:0x20] + tail[:32] + head[0x40:] + tail):
        try:
            elf.dynamic_info(blob)
            elf.section(blob, ".modinfo")
        except elf.ElfError:
            pass
