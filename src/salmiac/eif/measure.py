"""PCR measurements of an EIF (project spec, section 2).

Every build-time PCR is a single TPM-style extend of a content digest into a zeroed SHA-384 register::

    PCRx = SHA384(b"\\0" * 48 || SHA384(content_x))

where the contents are the section *data* (no section headers), in file order:

- PCR0: kernel || cmdline || ramdisk[0] || ramdisk[1] || ...   (the whole boot image)
- PCR1: kernel || cmdline || ramdisk[0]                          (the "bootstrap" part)
- PCR2: ramdisk[1] || ramdisk[2] || ...                          (the application part; may be empty)
- PCR8: the DER encoding of the signing certificate, only when the EIF has a Signature section.

Metadata and the signature itself are never measured. This is what upstream's ``EifHasher``
(``new_without_cache`` + ``tpm_extend_finalize_reset``) computes, what nitro-cli prints and what the
Nitro hypervisor (and QEMU's ``nitro-enclave`` machine) extends at boot.

The module is pure: ``PcrHasher`` is fed chunks as the writer or reader streams sections, so
ramdisks of hundreds of MiB are never held in memory. ``measure_sections`` is the one-call form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from salmiac.eif.format import SectionType

#: How nitro-cli names the algorithm: Rust's ``Debug`` output of ``sha2::Sha384``.
HASH_ALGORITHM = "Sha384 { ... }"
PCR_SIZE = 48
_ZERO_PCR = bytes(PCR_SIZE)
_READ_CHUNK = 1 << 20


def extend_zero(content_digest: bytes) -> bytes:
    """Extend a zeroed SHA-384 PCR with ``content_digest``: SHA384(0*48 || digest)."""
    return hashlib.sha384(_ZERO_PCR + content_digest).digest()


def measure_blob(content: bytes) -> bytes:
    """The PCR value for one blob, like ``nitro-cli pcr --input FILE``."""
    return extend_zero(hashlib.sha384(content).digest())


def pcr8_from_certificate(pem: bytes) -> bytes:
    """PCR8 for a signing certificate given as PEM (as the Signature section stores it).

    Raises ``ValueError`` if ``pem`` holds no parseable X.509 certificate.
    """
    cert = x509.load_pem_x509_certificate(pem)
    return measure_blob(cert.public_bytes(Encoding.DER))


@dataclass(frozen=True, slots=True)
class Pcrs:
    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("pcr0", "pcr1", "pcr2", "pcr8"):
            value = getattr(self, name)
            if value is not None and len(value) != PCR_SIZE:
                raise ValueError(f"{name} must be {PCR_SIZE} bytes, not {len(value)}")

    def to_json(self) -> dict[str, str]:
        """The ``Measurements`` object of ``nitro-cli build-enclave`` / ``describe-eif`` (lower-case hex)."""
        out = {
            "HashAlgorithm": HASH_ALGORITHM,
            "PCR0": self.pcr0.hex(),
            "PCR1": self.pcr1.hex(),
            "PCR2": self.pcr2.hex(),
        }
        if self.pcr8 is not None:
            out["PCR8"] = self.pcr8.hex()
        return out


class PcrHasher:
    """Incremental PCR0/1/2(/8) computation, fed section by section in file order.

    ``begin(section_type)`` opens a section, ``update(chunk)`` feeds its data, ``finish()`` returns the
    ``Pcrs``. Metadata and Signature sections may be begun and fed: their data is ignored, as upstream
    does. PCR8 comes from ``set_signing_certificate`` (the certificate, not the section bytes).
    """

    def __init__(self) -> None:
        self._image = hashlib.sha384()  # PCR0
        self._bootstrap = hashlib.sha384()  # PCR1
        self._app = hashlib.sha384()  # PCR2
        self._ramdisks_seen = 0
        self._current: SectionType | None = None
        self._pcr8: bytes | None = None
        self._finished = False

    @property
    def ramdisks_seen(self) -> int:
        return self._ramdisks_seen

    def begin(self, section_type: SectionType) -> None:
        if self._finished:
            raise RuntimeError("PcrHasher.begin() after finish()")
        if section_type == SectionType.INVALID:
            raise ValueError("cannot measure a section of type INVALID")
        if section_type == SectionType.RAMDISK:
            self._ramdisks_seen += 1
        self._current = section_type

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        match self._current:
            case None:
                raise RuntimeError("PcrHasher.update() before begin()")
            case SectionType.KERNEL | SectionType.CMDLINE:
                self._image.update(chunk)
                self._bootstrap.update(chunk)
            case SectionType.RAMDISK:
                # The first ramdisk is the bootstrap one (init + nsm.ko on nitro-cli images).
                self._image.update(chunk)
                (self._bootstrap if self._ramdisks_seen == 1 else self._app).update(chunk)
            case _:
                pass  # metadata and signature are not measured

    def set_signing_certificate(self, pem: bytes) -> None:
        """Record the signing certificate (PEM) whose DER digest becomes PCR8."""
        self._pcr8 = pcr8_from_certificate(pem)

    def finish(self) -> Pcrs:
        self._finished = True
        return Pcrs(
            pcr0=extend_zero(self._image.digest()),
            pcr1=extend_zero(self._bootstrap.digest()),
            pcr2=extend_zero(self._app.digest()),
            pcr8=self._pcr8,
        )


Blob = bytes | Path


def _chunks(blob: Blob) -> Iterable[bytes]:
    if isinstance(blob, bytes):
        yield blob
        return
    with blob.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            yield chunk


def measure_sections(
    kernel: Blob,
    cmdline: str | bytes,
    ramdisks: Sequence[Blob],
    *,
    signing_certificate_pem: bytes | None = None,
) -> Pcrs:
    """PCRs for an EIF made of these parts, without building it. Files (``Path``) are streamed.

    ``cmdline`` is measured exactly as the EIF stores it: its (UTF-8) bytes, no trailing NUL.
    """
    hasher = PcrHasher()
    hasher.begin(SectionType.KERNEL)
    for chunk in _chunks(kernel):
        hasher.update(chunk)
    hasher.begin(SectionType.CMDLINE)
    hasher.update(cmdline.encode("utf-8") if isinstance(cmdline, str) else cmdline)
    for ramdisk in ramdisks:
        hasher.begin(SectionType.RAMDISK)
        for chunk in _chunks(ramdisk):
            hasher.update(chunk)
    if signing_certificate_pem is not None:
        hasher.set_signing_certificate(signing_certificate_pem)
    return hasher.finish()
