"""EIF (Enclave Image File) on-disk structures: constants, header, section header.

Byte layout per aws/aws-nitro-enclaves-image-format ``src/defs/mod.rs`` (see the project spec, section 1).
All integers are big-endian. Version history, as the upstream comment keeps it:

- 0/1: internal, no CRC (never accepted here).
- 2: first public format (kernel, cmdline, ramdisks) with a CRC32 over the file.
- 3: adds the optional Signature section (PCR8).
- 4: adds the mandatory Metadata section (JSON, not measured). What we write.

This module does no I/O: ``pack()`` gives bytes, ``unpack()`` takes bytes and raises ``EifError`` for
anything a hostile file can get wrong at this level (length, magic, version, section count, section type).
Cross-section rules (offsets, counts per type, CRC) are the reader's job.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from salmiac.errors import ImageError

EIF_MAGIC = b".eif"
CURRENT_VERSION = 4
#: Oldest version we read: versions 0 and 1 were internal and have no valid CRC.
MIN_SUPPORTED_VERSION = 2
#: Version that introduced the optional Signature section.
SIGNATURE_VERSION = 3
#: Version from which the Metadata section is mandatory.
METADATA_VERSION = 4
MAX_NUM_SECTIONS = 32

#: Header flag bit 0: the kernel is an aarch64 ``Image``; cleared for an x86_64 bzImage.
EIF_HDR_ARCH_ARM64 = 0x1
#: Every other flag bit is reserved and written as 0.
EIF_HDR_KNOWN_FLAGS = EIF_HDR_ARCH_ARM64

#: What nitro-cli's EifBuilder writes; the hypervisor and nitro-cli ignore both.
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2

#: The signature section is a small CBOR document (certificate + COSE_Sign1); upstream caps it at 32 KiB.
SIGNATURE_MAX_SIZE = 32768
#: Our bounds on the sections we hold in memory. Linux keeps at most 2048 bytes of command line on
#: x86_64 and arm64; nitro-cli caps custom metadata at 4 KiB, DockerInfo (``docker inspect``) is a few KiB.
MAX_CMDLINE_SIZE = 4096
MAX_METADATA_SIZE = 1 << 20

_HEADER = struct.Struct(f">4sHHQQHH{MAX_NUM_SECTIONS}Q{MAX_NUM_SECTIONS}QII")
_SECTION_HEADER = struct.Struct(">HHQ")

HEADER_SIZE = _HEADER.size
SECTION_HEADER_SIZE = _SECTION_HEADER.size
#: The CRC field is the last 4 bytes of the header; the CRC covers everything else in the file.
CRC_OFFSET = HEADER_SIZE - 4

_U64_MAX = (1 << 64) - 1


class EifError(ImageError):
    """The EIF file is malformed, truncated, inconsistent or unsupported."""


class SectionType(enum.IntEnum):
    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


def _check_u64s(name: str, values: tuple[int, ...]) -> None:
    if len(values) != MAX_NUM_SECTIONS:
        raise EifError(f"EIF header: {name} must have {MAX_NUM_SECTIONS} entries, not {len(values)}")
    for value in values:
        if not 0 <= value <= _U64_MAX:
            raise EifError(f"EIF header: {name} entry {value} is not a 64-bit unsigned integer")


@dataclass(frozen=True, slots=True)
class EifHeader:
    """The 548-byte file header. ``section_offsets[i]`` points at section i's 12-byte section header;
    ``section_sizes[i]`` is the size of its data only. Entries at and after ``num_sections`` are 0."""

    version: int
    flags: int
    default_mem: int
    default_cpus: int
    reserved: int
    num_sections: int
    section_offsets: tuple[int, ...]
    section_sizes: tuple[int, ...]
    unused: int
    eif_crc32: int

    def __post_init__(self) -> None:
        if not 0 <= self.num_sections <= MAX_NUM_SECTIONS:
            raise EifError(f"EIF header: {self.num_sections} sections, at most {MAX_NUM_SECTIONS} allowed")
        _check_u64s("section offsets", self.section_offsets)
        _check_u64s("section sizes", self.section_sizes)
        for name, value, bits in (
            ("version", self.version, 16),
            ("flags", self.flags, 16),
            ("default_mem", self.default_mem, 64),
            ("default_cpus", self.default_cpus, 64),
            ("reserved", self.reserved, 16),
            ("unused", self.unused, 32),
            ("eif_crc32", self.eif_crc32, 32),
        ):
            if not 0 <= value < (1 << bits):
                raise EifError(f"EIF header: {name} {value} does not fit in {bits} bits")

    @property
    def arch(self) -> str:
        """``"aarch64"`` or ``"x86_64"``, from header flag bit 0."""
        return "aarch64" if self.flags & EIF_HDR_ARCH_ARM64 else "x86_64"

    def pack(self) -> bytes:
        return _HEADER.pack(
            EIF_MAGIC,
            self.version,
            self.flags,
            self.default_mem,
            self.default_cpus,
            self.reserved,
            self.num_sections,
            *self.section_offsets,
            *self.section_sizes,
            self.unused,
            self.eif_crc32,
        )

    @classmethod
    def unpack(cls, data: bytes) -> EifHeader:
        """Parse exactly ``HEADER_SIZE`` bytes; checks length, magic, version and section count."""
        if len(data) != HEADER_SIZE:
            raise EifError(f"EIF header: {len(data)} bytes, expected {HEADER_SIZE} (file truncated?)")
        fields = _HEADER.unpack(data)
        magic, version, flags, default_mem, default_cpus, reserved, num_sections = fields[:7]
        if magic != EIF_MAGIC:
            raise EifError(f"not an EIF file: magic {magic!r}, expected {EIF_MAGIC!r}")
        if not MIN_SUPPORTED_VERSION <= version <= CURRENT_VERSION:
            raise EifError(
                f"EIF version {version} is not supported"
                f" (supported: {MIN_SUPPORTED_VERSION}..{CURRENT_VERSION})"
            )
        if num_sections > MAX_NUM_SECTIONS:
            raise EifError(f"EIF header: {num_sections} sections, at most {MAX_NUM_SECTIONS} allowed")
        offsets_end = 7 + MAX_NUM_SECTIONS
        sizes_end = offsets_end + MAX_NUM_SECTIONS
        return cls(
            version=version,
            flags=flags,
            default_mem=default_mem,
            default_cpus=default_cpus,
            reserved=reserved,
            num_sections=num_sections,
            section_offsets=tuple(fields[7:offsets_end]),
            section_sizes=tuple(fields[offsets_end:sizes_end]),
            unused=fields[sizes_end],
            eif_crc32=fields[sizes_end + 1],
        )


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """The 12-byte header in front of each section's data. ``flags`` is reserved (always 0)."""

    section_type: SectionType
    flags: int
    size: int

    def __post_init__(self) -> None:
        if self.section_type == SectionType.INVALID:
            raise EifError("EIF section header: section type 0 (invalid)")
        if not 0 <= self.flags <= 0xFFFF:
            raise EifError(f"EIF section header: flags {self.flags} do not fit in 16 bits")
        if not 0 <= self.size <= _U64_MAX:
            raise EifError(f"EIF section header: size {self.size} is not a 64-bit unsigned integer")

    def pack(self) -> bytes:
        return _SECTION_HEADER.pack(self.section_type, self.flags, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> SectionHeader:
        """Parse exactly ``SECTION_HEADER_SIZE`` bytes; checks length and section type."""
        if len(data) != SECTION_HEADER_SIZE:
            raise EifError(f"EIF section header: {len(data)} bytes, expected {SECTION_HEADER_SIZE}")
        raw_type, flags, size = _SECTION_HEADER.unpack(data)
        try:
            section_type = SectionType(raw_type)
        except ValueError as exc:
            raise EifError(f"EIF section header: unknown section type {raw_type}") from exc
        return cls(section_type=section_type, flags=flags, size=size)
