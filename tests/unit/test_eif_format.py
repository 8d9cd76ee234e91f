"""EIF header and section header: byte layout checked against the spec's offsets with struct, by hand."""

from __future__ import annotations

import struct

import pytest

from salmiac.eif.format import (
    CURRENT_VERSION,
    EIF_MAGIC,
    HEADER_SIZE,
    MAX_NUM_SECTIONS,
    SECTION_HEADER_SIZE,
    SIGNATURE_MAX_SIZE,
    EifError,
    EifHeader,
    SectionHeader,
    SectionType,
)
from salmiac.errors import ImageError


def _header(**overrides: object) -> EifHeader:
    fields: dict[str, object] = {
        "version": 4,
        "flags": 1,
        "default_mem": 0x0102030405060708,
        "default_cpus": 2,
        "reserved": 0,
        "num_sections": 3,
        "section_offsets": tuple([548, 600, 700] + [0] * 29),
        "section_sizes": tuple([40, 88, 0xFFFF_FFFF_FFFF_FFFF] + [0] * 29),
        "unused": 0,
        "eif_crc32": 0xDEADBEEF,
    }
    fields.update(overrides)
    return EifHeader(**fields)  # type: ignore[arg-type]


def test_constants_match_the_spec() -> None:
    assert bytes([46, 101, 105, 102]) == EIF_MAGIC
    assert (CURRENT_VERSION, MAX_NUM_SECTIONS, HEADER_SIZE, SECTION_HEADER_SIZE) == (4, 32, 548, 12)
    assert SIGNATURE_MAX_SIZE == 32768
    assert [t.value for t in SectionType] == [0, 1, 2, 3, 4, 5]
    assert issubclass(EifError, ImageError)


def test_header_field_offsets() -> None:
    data = _header().pack()
    assert len(data) == 548
    assert data[0x000:0x004] == b".eif"
    assert struct.unpack_from(">H", data, 0x004) == (4,)
    assert struct.unpack_from(">H", data, 0x006) == (1,)
    assert data[0x008:0x010] == bytes.fromhex("0102030405060708")
    assert struct.unpack_from(">Q", data, 0x010) == (2,)
    assert struct.unpack_from(">H", data, 0x018) == (0,)
    assert struct.unpack_from(">H", data, 0x01A) == (3,)
    assert struct.unpack_from(">3Q", data, 0x01C) == (548, 600, 700)
    assert data[0x01C + 24 : 0x11C] == bytes(29 * 8)
    assert struct.unpack_from(">3Q", data, 0x11C) == (40, 88, 0xFFFF_FFFF_FFFF_FFFF)
    assert data[0x11C + 24 : 0x21C] == bytes(29 * 8)
    assert struct.unpack_from(">I", data, 0x21C) == (0,)
    assert data[0x220:0x224] == bytes.fromhex("deadbeef")


def test_header_round_trip() -> None:
    header = _header()
    assert EifHeader.unpack(header.pack()) == header
    assert header.arch == "aarch64"
    assert _header(flags=0).arch == "x86_64"


def test_section_header_layout_and_round_trip() -> None:
    section = SectionHeader(SectionType.METADATA, 0, 0x0102030405060708)
    data = section.pack()
    assert data == bytes.fromhex("0005 0000 0102030405060708")
    assert SectionHeader.unpack(data) == section
    assert SectionHeader.unpack(bytes.fromhex("0003 0007 0000000000000010")) == SectionHeader(
        SectionType.RAMDISK, 7, 16
    )


@pytest.mark.parametrize("length", [0, 547, 549, 1000])
def test_header_wrong_length(length: int) -> None:
    with pytest.raises(EifError, match="548"):
        EifHeader.unpack(bytes(length))


def test_header_bad_magic() -> None:
    data = bytearray(_header().pack())
    data[0:4] = b"EIF."
    with pytest.raises(EifError, match="magic"):
        EifHeader.unpack(bytes(data))


@pytest.mark.parametrize("version", [0, 1, 5, 0xFFFF])
def test_header_unsupported_version(version: int) -> None:
    data = bytearray(_header().pack())
    struct.pack_into(">H", data, 4, version)
    with pytest.raises(EifError, match=f"version {version}"):
        EifHeader.unpack(bytes(data))


@pytest.mark.parametrize("version", [2, 3, 4])
def test_header_supported_versions(version: int) -> None:
    data = bytearray(_header().pack())
    struct.pack_into(">H", data, 4, version)
    assert EifHeader.unpack(bytes(data)).version == version


@pytest.mark.parametrize("count", [33, 0xFFFF])
def test_header_too_many_sections(count: int) -> None:
    data = bytearray(_header().pack())
    struct.pack_into(">H", data, 0x1A, count)
    with pytest.raises(EifError, match="sections"):
        EifHeader.unpack(bytes(data))


def test_header_constructor_validates() -> None:
    with pytest.raises(EifError):
        _header(section_offsets=(0,) * 31)
    with pytest.raises(EifError):
        _header(version=1 << 16)
    with pytest.raises(EifError):
        _header(section_sizes=(1 << 64,) + (0,) * 31)


@pytest.mark.parametrize("length", [0, 11, 13])
def test_section_header_wrong_length(length: int) -> None:
    with pytest.raises(EifError, match="12"):
        SectionHeader.unpack(bytes(length))


@pytest.mark.parametrize("raw_type", [0, 6, 0xFFFF])
def test_section_header_bad_type(raw_type: int) -> None:
    with pytest.raises(EifError, match="section type"):
        SectionHeader.unpack(struct.pack(">HHQ", raw_type, 0, 1))
