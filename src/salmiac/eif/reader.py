"""Read and validate an EIF, which is hostile input until proven otherwise.

Upstream has two readers that disagree on a crafted file: nitro-cli's ``EifReader`` walks section headers
sequentially from offset 548 and ignores the offset table, QEMU (and the loader) follow the offset table.
A file where the two walks differ could be measured one way and booted another. So this reader accepts
only the layout ``EifBuilder`` produces, where both walks agree: sections contiguous from offset 548 in
table order, no gaps, no overlap, the last one ending at end of file, unused table entries zero, every
section header's size equal to the table's. On top: known section types only, section flags 0, reserved
header fields 0, exactly one kernel and one cmdline, at least one ramdisk (all after the kernel),
metadata exactly when the version requires it, at most one signature, bounded sizes for the sections
held in memory, and the CRC32. Every violation is an ``EifError`` naming what is wrong.

Validation streams the file once (CRC, PCRs, small sections), never holding kernel or ramdisks in memory.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from salmiac.eif.format import (
    CRC_OFFSET,
    EIF_HDR_KNOWN_FLAGS,
    HEADER_SIZE,
    MAX_CMDLINE_SIZE,
    MAX_METADATA_SIZE,
    MAX_NUM_SECTIONS,
    METADATA_VERSION,
    SECTION_HEADER_SIZE,
    SIGNATURE_MAX_SIZE,
    SIGNATURE_VERSION,
    EifError,
    EifHeader,
    SectionHeader,
    SectionType,
)
from salmiac.eif.measure import PcrHasher, Pcrs
from salmiac.eif.signature import (
    PcrSignature,
    certificate_info,
    parse_signature_section,
    verify_pcr0_signature,
)
from salmiac.errors import RequestError, RuntimeFailure

_READ_CHUNK = 1 << 20
#: Sections whose data we keep in memory, with their bounds (checked before reading).
_IN_MEMORY_LIMITS = {
    SectionType.CMDLINE: MAX_CMDLINE_SIZE,
    SectionType.METADATA: MAX_METADATA_SIZE,
    SectionType.SIGNATURE: SIGNATURE_MAX_SIZE,
}
_BUILD_KEYS = ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion")


@dataclass(frozen=True, slots=True)
class _Scan:
    header_bytes: bytes
    header: EifHeader
    sections: tuple[tuple[SectionHeader, int], ...]
    crc: int
    pcrs: Pcrs
    small: dict[SectionType, bytes]
    signature: PcrSignature | None


def _check_header(header: EifHeader, file_size: int) -> None:
    if header.flags & ~EIF_HDR_KNOWN_FLAGS:
        raise EifError(f"EIF header: reserved flag bits set (flags {header.flags:#06x})")
    if header.reserved or header.unused:
        raise EifError("EIF header: reserved fields are not zero")
    count = header.num_sections
    if count == 0:
        raise EifError("EIF header: no sections")
    for i in range(count, MAX_NUM_SECTIONS):
        if header.section_offsets[i] or header.section_sizes[i]:
            raise EifError(f"EIF header: unused section table entry {i} is not zero")
    position = HEADER_SIZE
    for i in range(count):
        offset, size = header.section_offsets[i], header.section_sizes[i]
        if offset > file_size - SECTION_HEADER_SIZE:
            raise EifError(f"section {i}: offset {offset} is out of range (file is {file_size} bytes)")
        if offset < position:
            raise EifError(f"section {i}: offset {offset} overlaps what precedes it (ends at {position})")
        if offset > position:
            raise EifError(f"section {i}: offset {offset} leaves a gap after offset {position}")
        if size > file_size - offset - SECTION_HEADER_SIZE:
            raise EifError(
                f"section {i}: {size} bytes at offset {offset} run past the end of the file ({file_size} bytes)"
            )
        position = offset + SECTION_HEADER_SIZE + size
    if position != file_size:
        raise EifError(f"{file_size - position} unexpected bytes after the last section")


def _check_section(index: int, section: SectionHeader, table_size: int) -> None:
    if section.flags:
        raise EifError(f"section {index} ({section.section_type.name.lower()}): flags {section.flags:#x}, not 0")
    if section.size != table_size:
        raise EifError(
            f"section {index}: section header says {section.size} bytes, the header table {table_size}"
        )
    limit = _IN_MEMORY_LIMITS.get(section.section_type)
    if limit is not None and section.size > limit:
        name = section.section_type.name.lower()
        raise EifError(f"section {index} ({name}): {section.size} bytes, over the {limit}-byte limit")
    if section.section_type == SectionType.KERNEL and section.size == 0:
        raise EifError(f"section {index} (kernel): empty")


def _check_composition(version: int, types: list[SectionType]) -> None:
    counts = Counter(types)
    for kind in (SectionType.KERNEL, SectionType.CMDLINE):
        if counts[kind] != 1:
            raise EifError(f"EIF has {counts[kind]} {kind.name.lower()} sections, expected exactly 1")
    if counts[SectionType.RAMDISK] == 0:
        raise EifError("EIF has no ramdisk section")
    if types.index(SectionType.RAMDISK) < types.index(SectionType.KERNEL):
        raise EifError("EIF has a ramdisk section before the kernel section")
    wanted_metadata = 1 if version >= METADATA_VERSION else 0
    if counts[SectionType.METADATA] != wanted_metadata:
        raise EifError(
            f"EIF version {version} has {counts[SectionType.METADATA]} metadata sections,"
            f" expected {wanted_metadata}"
        )
    if counts[SectionType.SIGNATURE] > (1 if version >= SIGNATURE_VERSION else 0):
        raise EifError(f"EIF version {version} has {counts[SectionType.SIGNATURE]} signature sections")


def _read_exact(f: BinaryIO, size: int, what: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise EifError(f"{what}: file ended early (changed while reading?)")
    return data


def _scan(f: BinaryIO, file_size: int, *, verify_crc: bool) -> _Scan:
    if file_size < HEADER_SIZE:
        raise EifError(f"truncated EIF: {file_size} bytes, the header alone is {HEADER_SIZE}")
    header_bytes = _read_exact(f, HEADER_SIZE, "EIF header")
    header = EifHeader.unpack(header_bytes)
    _check_header(header, file_size)

    # Structure first (12 bytes per section), so a bad file fails before its data is streamed.
    sections: list[tuple[SectionHeader, int]] = []
    for i in range(header.num_sections):
        offset = header.section_offsets[i]
        f.seek(offset)
        section = SectionHeader.unpack(_read_exact(f, SECTION_HEADER_SIZE, f"section {i} header"))
        _check_section(i, section, header.section_sizes[i])
        sections.append((section, offset))
    _check_composition(header.version, [s.section_type for s, _ in sections])

    crc = zlib.crc32(header_bytes[:CRC_OFFSET])
    hasher = PcrHasher()
    small: dict[SectionType, bytes] = {}
    f.seek(HEADER_SIZE)
    for i, (section, _offset) in enumerate(sections):
        raw_header = _read_exact(f, SECTION_HEADER_SIZE, f"section {i} header")
        if raw_header != section.pack():
            raise EifError(f"section {i} header: changed while reading")
        crc = zlib.crc32(raw_header, crc)
        hasher.begin(section.section_type)
        keep = section.section_type in _IN_MEMORY_LIMITS
        kept = bytearray()
        for chunk in _chunks(f, section.size, f"section {i}"):
            crc = zlib.crc32(chunk, crc)
            hasher.update(chunk)
            if keep:
                kept += chunk
        if keep:
            small[section.section_type] = bytes(kept)
    if verify_crc and crc != header.eif_crc32:
        raise EifError(f"EIF CRC mismatch: header says {header.eif_crc32:#010x}, contents give {crc:#010x}")

    signature = None
    signature_bytes = small.get(SectionType.SIGNATURE)
    if signature_bytes is not None:
        # Like nitro-cli and QEMU, only the first entry (PCR0's signature) counts.
        signature = parse_signature_section(signature_bytes)[0]
        try:
            hasher.set_signing_certificate(signature.signing_certificate)
        except ValueError as exc:
            raise EifError(f"signature section: signing certificate is not a PEM X.509 certificate: {exc}") from exc
    return _Scan(header_bytes, header, tuple(sections), crc, hasher.finish(), small, signature)


def _chunks(f: BinaryIO, size: int, what: str) -> Iterator[bytes]:
    remaining = size
    while remaining:
        chunk = f.read(min(remaining, _READ_CHUNK))
        if not chunk:
            raise EifError(f"{what}: file ended early (changed while reading?)")
        remaining -= len(chunk)
        yield chunk


def _parse_cmdline(data: bytes) -> str:
    # QEMU hands the kernel a C string: bytes after a NUL would be measured but never booted.
    if b"\0" in data:
        raise EifError("cmdline section contains a NUL byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EifError("cmdline section is not valid UTF-8") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_metadata(data: bytes) -> dict[str, Any]:
    """The metadata JSON, checked against upstream's ``EifIdentityInfo`` (what nitro-cli needs to describe it)."""
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EifError(f"metadata section is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise EifError("metadata section is not a JSON object")
    for key in ("ImageName", "ImageVersion"):
        if not isinstance(value.get(key), str):
            raise EifError(f"metadata section: {key} is missing or not a string")
    build = value.get("BuildMetadata")
    if not isinstance(build, dict):
        raise EifError("metadata section: BuildMetadata is missing or not an object")
    for key in _BUILD_KEYS:
        if not isinstance(build.get(key), str):
            raise EifError(f"metadata section: BuildMetadata.{key} is missing or not a string")
    return value


@dataclass(frozen=True)
class EifImage:
    """A validated EIF. ``sections`` is ``(section header, offset of that header)`` in file order."""

    header: EifHeader
    sections: tuple[tuple[SectionHeader, int], ...]
    cmdline: str
    metadata: dict[str, Any] | None
    signature: PcrSignature | None  # first entry of the signature section
    crc32: int  # computed over the file; equals header.eif_crc32 unless read with verify_crc=False
    pcrs: Pcrs
    source: Path | bytes
    _header_bytes: bytes

    @property
    def name(self) -> str:
        return "<in-memory EIF>" if isinstance(self.source, bytes) else str(self.source)

    @property
    def crc_ok(self) -> bool:
        return self.crc32 == self.header.eif_crc32

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    @property
    def signing_certificate(self) -> bytes | None:
        """The signing certificate (PEM) whose DER digest is PCR8, if signed."""
        return None if self.signature is None else self.signature.signing_certificate

    def signature_check(self) -> bool | None:
        """nitro-cli's ``SignatureCheck``: None if unsigned; True if the COSE signature verifies with the
        certificate's key and signs this image's PCR0. The hypervisor does not check it; PCR8 is what counts."""
        if self.signature is None:
            return None
        try:
            return verify_pcr0_signature(self.signature, self.pcrs.pcr0)
        except EifError:
            return False

    @property
    def size(self) -> int:
        header, offset = self.sections[-1]
        return offset + SECTION_HEADER_SIZE + header.size

    def measure(self) -> Pcrs:
        """PCR0/1/2 (and PCR8 if signed), computed while the file was streamed and validated."""
        return self.pcrs

    def _open(self) -> BinaryIO:
        if isinstance(self.source, bytes):
            return io.BytesIO(self.source)
        try:
            return self.source.open("rb")
        except OSError as exc:
            raise RequestError(f"EIF {self.source}: {exc.strerror}") from exc

    def extract_boot_parts(
        self, dst_dir: Path, *, join_ramdisks: bool = False
    ) -> tuple[Path, str, list[Path]]:
        """Write the kernel and the ramdisks to new files in ``dst_dir`` (for booting under QEMU).

        Returns ``(kernel_path, cmdline, ramdisk_paths)``; ramdisks are in file order, the order in which
        the Nitro loader concatenates them into one initramfs. With ``join_ramdisks`` they are written
        already concatenated into a single ``initrd`` file (what QEMU's ``-initrd`` takes). The file is
        re-checked against the CRC computed when it was read, so an EIF swapped in between is an error
        rather than an unmeasured boot; nothing is left in ``dst_dir`` on error.
        """
        kernel_path = dst_dir / "kernel"
        ramdisk_paths: list[Path] = []
        written: list[Path] = []
        joined: BinaryIO | None = None
        try:
            with self._open() as f:
                if _read_exact(f, HEADER_SIZE, "EIF header") != self._header_bytes:
                    raise EifError(f"EIF {self.name}: changed since it was read")
                crc = zlib.crc32(self._header_bytes[:CRC_OFFSET])
                for i, (section, _offset) in enumerate(self.sections):
                    crc = zlib.crc32(_read_exact(f, SECTION_HEADER_SIZE, f"section {i} header"), crc)
                    out: BinaryIO | None = None
                    if section.section_type == SectionType.KERNEL:
                        out = self._create(kernel_path, written)
                    elif section.section_type == SectionType.RAMDISK and join_ramdisks:
                        if joined is None:
                            ramdisk_paths.append(dst_dir / "initrd")
                            joined = self._create(ramdisk_paths[0], written)
                        out = joined
                    elif section.section_type == SectionType.RAMDISK:
                        ramdisk_paths.append(dst_dir / f"ramdisk{len(ramdisk_paths)}")
                        out = self._create(ramdisk_paths[-1], written)
                    try:
                        for chunk in _chunks(f, section.size, f"section {i}"):
                            crc = zlib.crc32(chunk, crc)
                            if out is not None:
                                out.write(chunk)
                    finally:
                        if out is not None and out is not joined:
                            out.close()
                if crc != self.crc32 or f.read(1):
                    raise EifError(f"EIF {self.name}: changed since it was read")
        except BaseException:
            if joined is not None:
                joined.close()
            for path in written:
                path.unlink(missing_ok=True)
            raise
        if joined is not None:
            joined.close()
        return kernel_path, self.cmdline, ramdisk_paths

    @staticmethod
    def _create(path: Path, written: list[Path]) -> BinaryIO:
        try:
            f = path.open("xb")
        except OSError as exc:
            raise RuntimeFailure(f"extracting EIF: {path}: {exc.strerror}") from exc
        written.append(path)
        return f

    def describe(self) -> dict[str, Any]:
        """JSON shaped like ``nitro-cli describe-eif`` (same keys, same order), plus our own
        ``Architecture`` (from header flag bit 0) and ``Sections`` (type, offset, size in file order).

        Differs from nitro-cli on purpose: a COSE signature that does not verify gives
        ``"SignatureCheck": false`` where nitro-cli fails the whole command.
        """
        out: dict[str, Any] = {
            "EifVersion": self.header.version,
            "Measurements": self.pcrs.to_json(),
            "IsSigned": self.is_signed,
        }
        if self.signature is not None:
            out["SigningCertificate"] = certificate_info(self.signature.signing_certificate)
        out["CheckCRC"] = self.crc_ok
        if self.signature is not None:
            out["SignatureCheck"] = self.signature_check()
        if self.metadata is not None:
            build = self.metadata["BuildMetadata"]
            out["ImageName"] = self.metadata["ImageName"]
            out["ImageVersion"] = self.metadata["ImageVersion"]
            meta: dict[str, Any] = {key: build[key] for key in _BUILD_KEYS}
            meta["DockerInfo"] = self.metadata.get("DockerInfo")
            custom = self.metadata.get("CustomMetadata")
            # nitro-cli flattens the custom metadata object into "Metadata" and omits it when null.
            if isinstance(custom, dict):
                meta.update({k: v for k, v in custom.items() if k not in meta})
            elif custom is not None:
                meta["CustomMetadata"] = custom
            out["Metadata"] = meta
        out["Architecture"] = self.header.arch
        out["Sections"] = [
            {"type": section.section_type.name.lower(), "offset": offset, "size": section.size}
            for section, offset in self.sections
        ]
        return out


def _image_from_scan(scan: _Scan, source: Path | bytes) -> EifImage:
    metadata_bytes = scan.small.get(SectionType.METADATA)
    return EifImage(
        header=scan.header,
        sections=scan.sections,
        cmdline=_parse_cmdline(scan.small[SectionType.CMDLINE]),
        metadata=None if metadata_bytes is None else _parse_metadata(metadata_bytes),
        signature=scan.signature,
        crc32=scan.crc,
        pcrs=scan.pcrs,
        source=source,
        _header_bytes=scan.header_bytes,
    )


def read_eif(path: Path, *, verify_crc: bool = True) -> EifImage:
    """Open, validate and measure the EIF at ``path``. ``verify_crc=False`` reports a bad CRC via
    ``crc_ok``/``describe()`` instead of raising (what ``nitro-cli describe-eif`` does)."""
    try:
        # O_NONBLOCK so a FIFO planted at the path cannot hang us before the regular-file check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RequestError(f"EIF {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RequestError(f"EIF {path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        file_size = st.st_size
        try:
            scan = _scan(f, file_size, verify_crc=verify_crc)
        except EifError as exc:
            raise EifError(f"EIF {path}: {exc}") from exc
    try:
        return _image_from_scan(scan, path)
    except EifError as exc:
        raise EifError(f"EIF {path}: {exc}") from exc


def read_eif_bytes(data: bytes, *, verify_crc: bool = True) -> EifImage:
    """``read_eif`` for an image already in memory (tests, fuzzing, small images)."""
    scan = _scan(io.BytesIO(data), len(data), verify_crc=verify_crc)
    return _image_from_scan(scan, data)
