"""PCRs against the spec's formula applied by hand: PCR = SHA384(0*48 || SHA384(content))."""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from salmiac.eif.format import SectionType
from salmiac.eif.measure import PcrHasher, Pcrs, measure_blob, measure_sections, pcr8_from_certificate

# Spec section 2: PCR2 of an EIF with a single ramdisk is the extend of SHA384 of nothing.
PCR2_SINGLE_RAMDISK = (
    "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a"
)


def by_hand(content: bytes) -> bytes:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).digest()


def make_certificate() -> tuple[bytes, bytes]:
    """A throwaway self-signed P-384 certificate: (PEM, DER)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "salmiac test signer")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER)


def test_single_ramdisk_pcr2_constant() -> None:
    pcrs = measure_sections(b"kernel", "cmdline", [b"only ramdisk"])
    assert pcrs.pcr2.hex() == PCR2_SINGLE_RAMDISK
    assert by_hand(b"").hex() == PCR2_SINGLE_RAMDISK


def test_pcrs_by_hand_with_three_ramdisks() -> None:
    kernel, cmdline, r0, r1, r2 = b"K" * 1000, b"console=ttyS0", b"bootstrap", b"app-1", b"app-2"
    pcrs = measure_sections(kernel, cmdline, [r0, r1, r2])
    assert pcrs.pcr0 == by_hand(kernel + cmdline + r0 + r1 + r2)
    assert pcrs.pcr1 == by_hand(kernel + cmdline + r0)
    assert pcrs.pcr2 == by_hand(r1 + r2)
    assert pcrs.pcr8 is None


def test_paths_are_streamed_like_bytes(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bytes(range(256)) * 9000)  # > 2 read chunks
    ramdisk = tmp_path / "initrd"
    ramdisk.write_bytes(b"R" * 5)
    from_paths = measure_sections(kernel, "a b", [ramdisk, ramdisk])
    assert from_paths == measure_sections(kernel.read_bytes(), b"a b", [b"R" * 5, b"R" * 5])


def test_hasher_chunking_and_ignored_sections() -> None:
    whole = measure_sections(b"kernel-bytes", "cmd", [b"r0", b"r1"])
    hasher = PcrHasher()
    hasher.begin(SectionType.KERNEL)
    for byte in b"kernel-bytes":
        hasher.update(bytes([byte]))
    hasher.begin(SectionType.CMDLINE)
    hasher.update(b"cmd")
    hasher.begin(SectionType.METADATA)
    hasher.update(b'{"not":"measured"}')
    hasher.begin(SectionType.RAMDISK)
    hasher.update(b"r0")
    hasher.begin(SectionType.RAMDISK)
    hasher.update(b"r")
    hasher.update(b"1")
    hasher.begin(SectionType.SIGNATURE)
    hasher.update(b"not measured either")
    assert hasher.finish() == whole
    with pytest.raises(RuntimeError):
        hasher.begin(SectionType.RAMDISK)


def test_hasher_misuse() -> None:
    with pytest.raises(RuntimeError):
        PcrHasher().update(b"x")
    with pytest.raises(ValueError):
        PcrHasher().begin(SectionType.INVALID)


def test_pcr8_is_digest_of_der() -> None:
    pem, der = make_certificate()
    assert pcr8_from_certificate(pem) == by_hand(der)
    pcrs = measure_sections(b"k", "c", [b"r"], signing_certificate_pem=pem)
    assert pcrs.pcr8 == by_hand(der)
    assert pcrs.pcr0 == measure_sections(b"k", "c", [b"r"]).pcr0
    with pytest.raises(ValueError):
        pcr8_from_certificate(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")


def test_to_json_like_nitro_cli() -> None:
    pcrs = Pcrs(pcr0=b"\x00" * 48, pcr1=b"\xab" * 48, pcr2=b"\x01" * 48)
    assert pcrs.to_json() == {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": "00" * 48,
        "PCR1": "ab" * 48,
        "PCR2": "01" * 48,
    }
    assert list(Pcrs(b"\0" * 48, b"\0" * 48, b"\0" * 48, b"\xff" * 48).to_json()) == [
        "HashAlgorithm",
        "PCR0",
        "PCR1",
        "PCR2",
        "PCR8",
    ]
    with pytest.raises(ValueError):
        Pcrs(pcr0=b"short", pcr1=b"\0" * 48, pcr2=b"\0" * 48)


def test_measure_blob_is_nitro_cli_pcr_input() -> None:
    assert measure_blob(b"hello") == by_hand(b"hello")
