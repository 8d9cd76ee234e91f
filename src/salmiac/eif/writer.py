"""Write an EIF the way nitro-cli's ``EifBuilder`` does, byte for byte, but streamed and deterministic.

Layout (project spec 1.3): the 548-byte header, then with no padding ``Kernel, Cmdline, Metadata,
Ramdisk[0..n]``, each as a 12-byte section header followed by its data. The header's offset table points
at each section header; its size table holds data sizes. The CRC32 (zlib) covers the whole file except
the CRC field itself (bytes 544..547).

Since every size is known before any data is copied, the header (minus its CRC) is written first and
the CRC and PCRs are accumulated while the sections stream through; only the 4 CRC bytes are patched at
the end. The file is written under a temporary name in the destination directory and renamed into
place, so a failure never leaves a half-written EIF at ``dst``.

Determinism: the only non-content input upstream has is the build time in the metadata JSON. Here it is
``EifMetadata.build_epoch`` (seconds, UTC); ``build_epoch_from_env`` reads ``SOURCE_DATE_EPOCH`` at the
edge and otherwise gives a fixed epoch, so the same inputs always produce the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Literal, TypeAlias

import salmiac
from salmiac.eif.format import (
    CRC_OFFSET,
    CURRENT_VERSION,
    DEFAULT_CPUS,
    DEFAULT_MEM,
    EIF_HDR_ARCH_ARM64,
    HEADER_SIZE,
    MAX_CMDLINE_SIZE,
    MAX_METADATA_SIZE,
    MAX_NUM_SECTIONS,
    SECTION_HEADER_SIZE,
    EifHeader,
    SectionHeader,
    SectionType,
)
from salmiac.eif.measure import PcrHasher, Pcrs
from salmiac.errors import RequestError, RuntimeFailure

#: Build time used when SOURCE_DATE_EPOCH is not set: fixed, so builds are reproducible by default.
DEFAULT_BUILD_EPOCH = 0
#: nitro-cli refuses a custom metadata file larger than this.
CUSTOM_METADATA_MAX_SIZE = 4096
#: Kernel, cmdline and metadata take 3 of the 32 section slots.
MAX_RAMDISKS = MAX_NUM_SECTIONS - 3
UNKNOWN = "Unknown"
_COPY_CHUNK = 1 << 20
_MAX_EPOCH = 253402300799  # 9999-12-31T23:59:59Z, the last time RFC 3339 can write

#: JSON values as ``json`` produces and consumes them.
JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"


def build_epoch_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The build time to record: ``SOURCE_DATE_EPOCH`` if set (reproducible-builds.org), else a fixed epoch.

    Call this at the edge (CLI / conversion request) and pass the result to ``EifMetadata``.
    """
    env = os.environ if environ is None else environ
    raw = env.get("SOURCE_DATE_EPOCH")
    if raw is None or raw == "":
        return DEFAULT_BUILD_EPOCH
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(_MAX_EPOCH))) or int(raw) > _MAX_EPOCH:
        raise RequestError(
            f"SOURCE_DATE_EPOCH={raw!r} is not a number of seconds since 1970 (0..{_MAX_EPOCH})"
        )
    return int(raw)


def kernel_config_info(config: Path) -> tuple[str, str]:
    """(OperatingSystem, KernelVersion) from line 3 of a kernel ``.config``, as upstream's identity.rs does.

    Line 3 looks like ``# Linux/x86_64 4.14.177-104.253.amzn2.x86_64 Kernel Configuration``; it is split on
    each of ' ', '/' and '-' and words 1 and 3 are taken ("Linux", "4.14.177"); "Unknown" where absent.
    """
    try:
        with config.open("rb") as f:
            lines = [f.readline(4096) for _ in range(3)]
    except OSError as exc:
        raise RequestError(f"kernel config {config}: {exc.strerror}") from exc
    if not lines[2]:
        raise RequestError(f"kernel config {config}: fewer than 3 lines, not a kernel .config")
    words = re.split("[ /-]", lines[2].decode("utf-8", "replace").rstrip("\r\n"))
    os_name = words[1] if len(words) > 1 else UNKNOWN
    version = words[3] if len(words) > 3 else UNKNOWN
    return os_name, version


def _dumps(value: JsonValue, what: str) -> str:
    # serde_json compact output; serde_json::Value objects are BTreeMaps, so nested keys come out sorted.
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise RequestError(f"EIF metadata: {what} is not serialisable as JSON: {exc}") from exc


@dataclass(frozen=True)
class EifMetadata:
    """The Metadata section (``EifIdentityInfo`` upstream). Not measured, but part of the file's bytes."""

    image_name: str
    image_version: str
    build_epoch: int = DEFAULT_BUILD_EPOCH
    build_tool: str = "salmiac"
    build_tool_version: str = salmiac.__version__
    operating_system: str = UNKNOWN
    kernel_version: str = UNKNOWN
    docker_info: JsonValue = None
    custom_metadata: JsonValue = None

    def __post_init__(self) -> None:
        if not 0 <= self.build_epoch <= _MAX_EPOCH:
            raise RequestError(f"EIF metadata: build time {self.build_epoch} is out of range")
        custom = _dumps(self.custom_metadata, "CustomMetadata")
        if len(custom.encode("utf-8", "surrogatepass")) > CUSTOM_METADATA_MAX_SIZE:
            raise RequestError(f"EIF metadata: custom metadata is over {CUSTOM_METADATA_MAX_SIZE} bytes")

    def with_kernel_config(self, config: Path) -> EifMetadata:
        """A copy with OperatingSystem and KernelVersion read from the kernel's ``.config``."""
        os_name, version = kernel_config_info(config)
        return replace(self, operating_system=os_name, kernel_version=version)

    @property
    def build_time(self) -> str:
        """RFC 3339 like chrono's ``to_rfc3339()`` for a whole second: ``1970-01-01T00:00:00+00:00``."""
        return datetime.fromtimestamp(self.build_epoch, UTC).isoformat()

    def to_json_bytes(self) -> bytes:
        """Compact JSON, keys in ``EifIdentityInfo`` field order (project spec 1.5)."""
        build = (
            f'{{"BuildTime":{_dumps(self.build_time, "BuildTime")},'
            f'"BuildTool":{_dumps(self.build_tool, "BuildTool")},'
            f'"BuildToolVersion":{_dumps(self.build_tool_version, "BuildToolVersion")},'
            f'"OperatingSystem":{_dumps(self.operating_system, "OperatingSystem")},'
            f'"KernelVersion":{_dumps(self.kernel_version, "KernelVersion")}}}'
        )
        text = (
            f'{{"ImageName":{_dumps(self.image_name, "ImageName")},'
            f'"ImageVersion":{_dumps(self.image_version, "ImageVersion")},'
            f'"BuildMetadata":{build},'
            f'"DockerInfo":{_dumps(self.docker_info, "DockerInfo")},'
            f'"CustomMetadata":{_dumps(self.custom_metadata, "CustomMetadata")}}}'
        )
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(f"EIF metadata: not valid Unicode: {exc.reason}") from exc
        if len(data) > MAX_METADATA_SIZE:
            raise RequestError(f"EIF metadata: {len(data)} bytes, over the {MAX_METADATA_SIZE}-byte limit")
        return data


@dataclass(frozen=True, slots=True)
class EifInfo:
    path: Path
    size: int
    sha256: str
    pcrs: Pcrs


def _check_cmdline(cmdline: str) -> bytes:
    if not cmdline.isascii() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in cmdline):
        raise RequestError(f"kernel command line {cmdline!r}: only printable ASCII is allowed")
    if len(cmdline) > MAX_CMDLINE_SIZE:
        raise RequestError(
            f"kernel command line: {len(cmdline)} bytes, over the {MAX_CMDLINE_SIZE}-byte limit"
        )
    return cmdline.encode("ascii")


def _open_input(what: str, path: Path) -> tuple[BinaryIO, int]:
    try:
        # O_NONBLOCK: opening a FIFO must not hang before the regular-file check below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RequestError(f"{what} {path}: {exc.strerror}") from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RequestError(f"{what} {path}: not a regular file")
    return os.fdopen(fd, "rb"), st.st_size


@dataclass(slots=True)
class _Part:
    section_type: SectionType
    what: str
    size: int
    content: bytes | BinaryIO  # small sections in memory, files streamed


def write_eif(
    dst: Path,
    *,
    kernel: Path,
    cmdline: str,
    ramdisks: Sequence[Path],
    metadata: EifMetadata,
    kernel_config: Path | None = None,
    arch: Literal["x86_64", "aarch64"] = "x86_64",
) -> EifInfo:
    """Build an unsigned EIF at ``dst`` from a kernel image, a command line and 1..29 ramdisks.

    With ``kernel_config`` (the kernel's ``.config``), the metadata's OperatingSystem and KernelVersion
    come from its third line, as nitro-cli does. Returns the EIF's path, size, SHA-256 and PCRs.
    ``dst`` is replaced atomically; on any error it is untouched.
    """
    if kernel_config is not None:
        metadata = metadata.with_kernel_config(kernel_config)
    if arch not in ("x86_64", "aarch64"):
        raise RequestError(f"EIF architecture {arch!r}: expected x86_64 or aarch64")
    cmdline_bytes = _check_cmdline(cmdline)
    if not 1 <= len(ramdisks) <= MAX_RAMDISKS:
        raise RequestError(f"an EIF needs 1..{MAX_RAMDISKS} ramdisks, got {len(ramdisks)}")
    metadata_bytes = metadata.to_json_bytes()

    opened: list[BinaryIO] = []
    try:
        kernel_f, kernel_size = _open_input("kernel", kernel)
        opened.append(kernel_f)
        if kernel_size == 0:
            raise RequestError(f"kernel {kernel}: empty file")
        parts = [
            _Part(SectionType.KERNEL, f"kernel {kernel}", kernel_size, content=kernel_f),
            _Part(SectionType.CMDLINE, "cmdline", len(cmdline_bytes), content=cmdline_bytes),
            _Part(SectionType.METADATA, "metadata", len(metadata_bytes), content=metadata_bytes),
        ]
        for path in ramdisks:
            f, size = _open_input("ramdisk", path)
            opened.append(f)
            parts.append(_Part(SectionType.RAMDISK, f"ramdisk {path}", size, content=f))
        return _write(dst, parts, EIF_HDR_ARCH_ARM64 if arch == "aarch64" else 0)
    finally:
        for f in opened:
            f.close()


def _header_for(parts: Sequence[_Part], flags: int) -> EifHeader:
    offsets: list[int] = []
    position = HEADER_SIZE
    for part in parts:
        offsets.append(position)
        position += SECTION_HEADER_SIZE + part.size
    padding = [0] * (MAX_NUM_SECTIONS - len(parts))
    return EifHeader(
        version=CURRENT_VERSION,
        flags=flags,
        default_mem=DEFAULT_MEM,
        default_cpus=DEFAULT_CPUS,
        reserved=0,
        num_sections=len(parts),
        section_offsets=(*offsets, *padding),
        section_sizes=(*(p.size for p in parts), *padding),
        unused=0,
        eif_crc32=0,
    )


def _write(dst: Path, parts: Sequence[_Part], flags: int) -> EifInfo:
    header_bytes = _header_for(parts, flags).pack()
    try:
        fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
    except OSError as exc:
        raise RequestError(f"EIF output {dst}: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as out:
            crc = zlib.crc32(header_bytes[:CRC_OFFSET])
            hasher = PcrHasher()
            out.write(header_bytes)
            for part in parts:
                section_header = SectionHeader(part.section_type, 0, part.size).pack()
                crc = zlib.crc32(section_header, crc)
                out.write(section_header)
                hasher.begin(part.section_type)
                for chunk in _part_chunks(part):
                    crc = zlib.crc32(chunk, crc)
                    hasher.update(chunk)
                    out.write(chunk)
            out.seek(CRC_OFFSET)
            out.write(struct.pack(">I", crc))
            out.flush()
            os.fsync(out.fileno())
            out.seek(0)
            digest = hashlib.file_digest(out, "sha256").hexdigest()
            size = out.seek(0, os.SEEK_END)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RuntimeFailure(f"writing EIF {dst}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    return EifInfo(path=dst, size=size, sha256=digest, pcrs=hasher.finish())


def _part_chunks(part: _Part) -> Iterator[bytes]:
    """The section's data; a file must hold exactly the size it had when the header was laid out."""
    if isinstance(part.content, bytes):
        yield part.content
        return
    remaining = part.size
    while remaining:
        chunk = part.content.read(min(remaining, _COPY_CHUNK))
        if not chunk:
            raise RuntimeFailure(f"{part.what} shrank while it was being copied into the EIF")
        remaining -= len(chunk)
        yield chunk
    if part.content.read(1):
        raise RuntimeFailure(f"{part.what} grew while it was being copied into the EIF")


def _fsync_dir(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # durability of the rename is best effort; the file itself is already fsynced
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
