"""EIF reader: round trip with the writer, describe-eif shape, boot-part extraction, and rejection of
hostile files (each crafted by hand with struct, CRC recomputed so that only the intended flaw remains)."""

from __future__ import annotations

import datetime
import hashlib
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salmiac.eif import (
    EifError,
    EifImage,
    EifMetadata,
    PcrSignature,
    SectionType,
    parse_signature_section,
    read_eif,
    read_eif_bytes,
    verify_pcr0_signature,
    write_eif,
)
from salmiac.errors import RequestError, RuntimeFailure

KERNEL, CMDLINE, R0, R1 = b"bzImage" * 10, b"console=ttyS0 quiet", b"bootstrap-cpio", b"app-cpio"
META = (
    b'{"ImageName":"img","ImageVersion":"2","BuildMetadata":{"BuildTime":"t","BuildTool":"b",'
    b'"BuildToolVersion":"v","OperatingSystem":"Linux","KernelVersion":"6.1"},"DockerInfo":null,'
    b'"CustomMetadata":{"team":"x"}}'
)
K, C, M, R, S = (
    SectionType.KERNEL,
    SectionType.CMDLINE,
    SectionType.METADATA,
    SectionType.RAMDISK,
    SectionType.SIGNATURE,
)
Sections = list[tuple[int, bytes]]
VALID: Sections = [(K, KERNEL), (C, CMDLINE), (M, META), (R, R0), (R, R1)]


def by_hand(content: bytes) -> bytes:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).digest()


def build(
    sections: Sections,
    *,
    version: int = 4,
    flags: int = 0,
    fields: Callable[[dict[str, object]], None] | None = None,
    section_flags: dict[int, int] | None = None,
    trailing: bytes = b"",
    crc: int | None = None,
) -> bytes:
    """An EIF assembled field by field; ``fields`` may rewrite header fields before the CRC is computed."""
    offsets, sizes, body, position = [], [], b"", 548
    for i, (section_type, data) in enumerate(sections):
        offsets.append(position)
        sizes.append(len(data))
        body += struct.pack(">HHQ", section_type, (section_flags or {}).get(i, 0), len(data)) + data
        position += 12 + len(data)
    pad = [0] * (32 - len(sections))
    h: dict[str, object] = {
        "magic": b".eif",
        "version": version,
        "flags": flags,
        "reserved": 0,
        "num_sections": len(sections),
        "offsets": offsets + pad,
        "sizes": sizes + pad,
        "unused": 0,
    }
    if fields:
        fields(h)
    magic: bytes = h["magic"]  # type: ignore[assignment]
    header = (
        magic
        + struct.pack(">HHQQHH", h["version"], h["flags"], 1 << 30, 2, h["reserved"], h["num_sections"])
        + struct.pack(">32Q", *h["offsets"])  # type: ignore[misc]
        + struct.pack(">32Q", *h["sizes"])  # type: ignore[misc]
        + struct.pack(">I", h["unused"])
    )
    body += trailing
    crc_value = zlib.crc32(header + body) if crc is None else crc
    return header + struct.pack(">I", crc_value) + body


def make_certificate() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "salmiac test signer")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER)


def signature_section(pem: bytes, cose: bytes = b"\x84\x44\xa1\x01\x38\x22\xa0\x40\x40") -> bytes:
    # serde_cbor's Vec<u8> is an array of unsigned ints; cbor2 encodes a list of ints the same way.
    encoded: bytes = cbor2.dumps([{"signing_certificate": list(pem), "signature": list(cose)}])
    return encoded


# --- happy paths -----------------------------------------------------------------------------------


def test_round_trip_with_writer(tmp_path: Path) -> None:
    kernel, r0, r1 = tmp_path / "k", tmp_path / "r0", tmp_path / "r1"
    kernel.write_bytes(KERNEL)
    r0.write_bytes(R0)
    r1.write_bytes(R1)
    meta = EifMetadata(image_name="img", image_version="2", build_epoch=86400, custom_metadata={"team": "x"})
    info = write_eif(tmp_path / "a.eif", kernel=kernel, cmdline=CMDLINE.decode(), ramdisks=[r0, r1], metadata=meta)
    image = read_eif(tmp_path / "a.eif")
    assert image.measure() == info.pcrs
    assert image.cmdline == CMDLINE.decode()
    assert [(s.section_type, s.size) for s, _ in image.sections] == [
        (K, len(KERNEL)),
        (C, len(CMDLINE)),
        (M, len(meta.to_json_bytes())),
        (R, len(R0)),
        (R, len(R1)),
    ]
    assert image.sections[0][1] == 548
    assert image.size == info.size
    assert image.crc_ok and not image.is_signed
    assert image.metadata is not None and image.metadata["BuildMetadata"]["BuildTime"] == "1970-01-02T00:00:00+00:00"


def test_pcrs_and_describe_shape() -> None:
    image = read_eif_bytes(build(VALID))
    pcrs = image.measure()
    assert pcrs.pcr0 == by_hand(KERNEL + CMDLINE + R0 + R1)
    assert pcrs.pcr1 == by_hand(KERNEL + CMDLINE + R0)
    assert pcrs.pcr2 == by_hand(R1)
    described = image.describe()
    assert list(described) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "CheckCRC",
        "ImageName",
        "ImageVersion",
        "Metadata",
        "Architecture",
        "Sections",
    ]
    assert described["EifVersion"] == 4
    assert described["Measurements"] == {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": pcrs.pcr0.hex(),
        "PCR1": pcrs.pcr1.hex(),
        "PCR2": pcrs.pcr2.hex(),
    }
    assert described["IsSigned"] is False and described["CheckCRC"] is True
    assert (described["ImageName"], described["ImageVersion"]) == ("img", "2")
    # nitro-cli flattens CustomMetadata into Metadata.
    assert described["Metadata"] == {
        "BuildTime": "t",
        "BuildTool": "b",
        "BuildToolVersion": "v",
        "OperatingSystem": "Linux",
        "KernelVersion": "6.1",
        "DockerInfo": None,
        "team": "x",
    }
    assert described["Architecture"] == "x86_64"
    assert described["Sections"][0] == {"type": "kernel", "offset": 548, "size": len(KERNEL)}
    assert [s["type"] for s in described["Sections"]] == ["kernel", "cmdline", "metadata", "ramdisk", "ramdisk"]


def test_single_ramdisk_pcr2_constant() -> None:
    image = read_eif_bytes(build(VALID[:4]))
    assert image.measure().pcr2.hex() == (
        "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a"
    )


def test_sections_in_other_orders_are_measured_in_file_order() -> None:
    image = read_eif_bytes(build([(M, META), (C, CMDLINE), (K, KERNEL), (R, R0), (R, R1)]))
    assert image.measure().pcr0 == by_hand(CMDLINE + KERNEL + R0 + R1)


def test_older_versions() -> None:
    v2 = read_eif_bytes(build([(K, KERNEL), (C, CMDLINE), (R, R0)], version=2))
    assert v2.metadata is None and "Metadata" not in v2.describe()
    pem, _ = make_certificate()
    v3 = read_eif_bytes(build([(K, KERNEL), (C, CMDLINE), (R, R0), (S, signature_section(pem))], version=3))
    assert v3.is_signed


def test_signed_eif_pcr8() -> None:
    pem, der = make_certificate()
    image = read_eif_bytes(build([*VALID, (S, signature_section(pem))]))
    unsigned = read_eif_bytes(build(VALID)).measure()
    pcrs = image.measure()
    assert pcrs.pcr8 == by_hand(der)
    assert (pcrs.pcr0, pcrs.pcr1, pcrs.pcr2) == (unsigned.pcr0, unsigned.pcr1, unsigned.pcr2)
    described = image.describe()
    assert described["IsSigned"] is True
    assert described["Measurements"]["PCR8"] == by_hand(der).hex()
    assert image.signing_certificate == pem


def test_signature_section_decoder() -> None:
    pem, _ = make_certificate()
    [sig] = parse_signature_section(signature_section(pem, b"\x00\x17\x18\xff"))
    assert (sig.signing_certificate, sig.signature) == (pem, b"\x00\x17\x18\xff")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (cbor2.dumps([]), "empty"),
        (cbor2.dumps({"signing_certificate": [1]}), "major type"),
        (cbor2.dumps([{"signature": [1], "signing_certificate": [1]}]), "first key"),
        (cbor2.dumps([{"signing_certificate": [1], "signature": [1], "x": 1}]), "2 entries"),
        (cbor2.dumps([{"signing_certificate": [256], "signature": [1]}]), "not a byte"),
        (cbor2.dumps([{"signing_certificate": b"bytes", "signature": [1]}]), "major type"),
        (cbor2.dumps([{"signing_certificate": [], "signature": [1]}]), "empty signing certificate"),
        (cbor2.dumps([{"signing_certificate": [1], "signature": [1]}]) + b"\x00", "trailing"),
        (bytes.fromhex("9bffffffffffffffff"), "bytes left"),
        (bytes.fromhex("81a2736967"), "truncated"),
        (bytes.fromhex("9f"), "length encoding"),
    ],
)
def test_signature_section_rejects(payload: bytes, message: str) -> None:
    with pytest.raises(EifError, match=message):
        parse_signature_section(payload)
    with pytest.raises(EifError, match=message):
        read_eif_bytes(build([*VALID, (S, payload)]))


def test_signature_with_bad_certificate() -> None:
    with pytest.raises(EifError, match=r"PEM X\.509"):
        read_eif_bytes(build([*VALID, (S, signature_section(b"not a certificate"))]))


def test_extract_boot_parts(tmp_path: Path) -> None:
    eif = tmp_path / "x.eif"
    eif.write_bytes(build(VALID))
    out = tmp_path / "out"
    out.mkdir()
    image = read_eif(eif)
    kernel, cmdline, ramdisks = image.extract_boot_parts(out)
    assert kernel.read_bytes() == KERNEL
    assert cmdline == CMDLINE.decode()
    assert [p.read_bytes() for p in ramdisks] == [R0, R1]
    with pytest.raises(RuntimeFailure, match="kernel"):
        image.extract_boot_parts(out)


def test_extract_joined_initrd(tmp_path: Path) -> None:
    _, cmdline, ramdisks = read_eif_bytes(build(VALID)).extract_boot_parts(tmp_path, join_ramdisks=True)
    assert [p.name for p in ramdisks] == ["initrd"]
    assert ramdisks[0].read_bytes() == R0 + R1
    assert (tmp_path / "kernel").read_bytes() == KERNEL
    assert cmdline == CMDLINE.decode()


def test_extract_detects_a_swapped_file(tmp_path: Path) -> None:
    eif = tmp_path / "x.eif"
    eif.write_bytes(build(VALID))
    image = read_eif(eif)
    eif.write_bytes(build([(K, KERNEL[::-1]), *VALID[1:]]))  # same sizes, other kernel, valid CRC
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(EifError, match="changed since it was read"):
        image.extract_boot_parts(out)
    assert list(out.iterdir()) == []


def test_read_eif_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b".eif")
    with pytest.raises(EifError, match=r"bad\.eif: truncated"):
        read_eif(bad)
    with pytest.raises(RequestError, match="missing"):
        read_eif(tmp_path / "missing.eif")
    with pytest.raises(RequestError, match="not a regular file"):
        read_eif(tmp_path)


def test_bad_crc_reported_when_not_verified() -> None:
    data = build(VALID, crc=0x12345678)
    with pytest.raises(EifError, match="CRC mismatch"):
        read_eif_bytes(data)
    image = read_eif_bytes(data, verify_crc=False)
    assert not image.crc_ok and image.describe()["CheckCRC"] is False


# --- rejections ------------------------------------------------------------------------------------


def _set(key: str, index: int, value: int) -> Callable[[dict[str, object]], None]:
    def change(h: dict[str, object]) -> None:
        values = list(h[key])  # type: ignore[call-overload]
        values[index] = value
        h[key] = values

    return change


def _all(*changes: Callable[[dict[str, object]], None]) -> Callable[[dict[str, object]], None]:
    def change(h: dict[str, object]) -> None:
        for one in changes:
            one(h)

    return change


def _field(key: str, value: object) -> Callable[[dict[str, object]], None]:
    return lambda h: h.__setitem__(key, value)


VALID_BYTES = build(VALID)
OFF = [548 + sum(12 + len(d) for _, d in VALID[:i]) for i in range(len(VALID))]

REJECTS: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "truncated"),
    "header cut": (VALID_BYTES[:547], "truncated"),
    "section cut": (VALID_BYTES[:-1], "past the end"),
    "bad magic": (build(VALID, fields=_field("magic", b"EIF.")), "magic"),
    "version 1": (build(VALID, version=1), "version 1"),
    "version 5": (build(VALID, version=5), "version 5"),
    "data flipped": (VALID_BYTES[:600] + bytes([VALID_BYTES[600] ^ 1]) + VALID_BYTES[601:], "CRC mismatch"),
    "crc field": (build(VALID, crc=0), "CRC mismatch"),
    "no sections": (build(VALID, fields=_field("num_sections", 0)), "no sections"),
    "33 sections": (build(VALID, fields=_field("num_sections", 33)), "at most 32"),
    "count too small": (build(VALID, fields=_field("num_sections", 4)), "unused section table entry 4"),
    "count too large": (build(VALID, fields=_field("num_sections", 6)), "section 5: offset 0 overlaps"),
    "stray table entry": (build(VALID, fields=_set("sizes", 31, 1)), "unused section table entry 31"),
    "overlap": (build(VALID, fields=_set("offsets", 1, OFF[0])), "section 1: offset 548 overlaps"),
    "out of range": (build(VALID, fields=_set("offsets", 2, 1 << 40)), "out of range"),
    "huge size": (build(VALID, fields=_set("sizes", 4, (1 << 64) - 1)), "past the end"),
    "gap": (build(VALID, fields=_set("offsets", 1, OFF[1] + 1)), "gap"),
    "trailing bytes": (build(VALID, trailing=b"x"), "1 unexpected bytes"),
    "table size differs": (
        # The table stays self-consistent (ramdisk 0 one byte shorter, ramdisk 1 one byte longer).
        build(
            VALID,
            fields=_all(
                _set("sizes", 3, len(R0) - 1),
                _set("offsets", 4, OFF[4] - 1),
                _set("sizes", 4, len(R1) + 1),
            ),
        ),
        "section header says",
    ),
    "section flags": (build(VALID, section_flags={3: 1}), "flags 0x1"),
    "header flags": (build(VALID, flags=2), "reserved flag"),
    "reserved field": (build(VALID, fields=_field("reserved", 1)), "reserved fields"),
    "unused field": (build(VALID, fields=_field("unused", 1)), "reserved fields"),
    "unknown type": (build([*VALID[:4], (6, R1)]), "unknown section type 6"),
    "invalid type": (build([*VALID[:4], (0, R1)]), "section type 0"),
    "two kernels": (build([*VALID, (K, KERNEL)]), "2 kernel sections"),
    "no cmdline": (build([VALID[0], *VALID[2:]]), "0 cmdline sections"),
    "two cmdlines": (build([*VALID, (C, CMDLINE)]), "2 cmdline sections"),
    "no ramdisk": (build(VALID[:3]), "no ramdisk"),
    "ramdisk first": (build([(R, R0), *VALID[:3]]), "before the kernel"),
    "no metadata in v4": (build([VALID[0], VALID[1], VALID[3]]), "0 metadata sections"),
    "two metadata": (build([*VALID, (M, META)]), "2 metadata sections"),
    "metadata in v3": (build(VALID, version=3), "1 metadata sections, expected 0"),
    "signature in v2": (build([*VALID[:2], VALID[3], (S, b"")], version=2), "signature sections"),
    "two signatures": (build([*VALID, (S, b""), (S, b"")]), "2 signature sections"),
    "empty kernel": (build([(K, b""), *VALID[1:]]), "kernel.*empty"),
    "huge cmdline": (build([VALID[0], (C, b"x" * 4097), *VALID[2:]]), "4096-byte limit"),
    "huge signature": (build([*VALID, (S, bytes(32769))]), "32768-byte limit"),
    "NUL in cmdline": (build([VALID[0], (C, b"a\0b"), *VALID[2:]]), "NUL"),
    "cmdline not utf-8": (build([VALID[0], (C, b"\xff"), *VALID[2:]]), "UTF-8"),
    "metadata not JSON": (build([*VALID[:2], (M, b"{"), *VALID[3:]]), "not valid JSON"),
    "metadata NaN": (build([*VALID[:2], (M, b"NaN"), *VALID[3:]]), "not valid JSON"),
    "metadata deep": (build([*VALID[:2], (M, b"[" * 100000), *VALID[3:]]), "not valid JSON"),
    "metadata utf-16": (build([*VALID[:2], (M, "{}".encode("utf-16")), *VALID[3:]]), "not valid JSON"),
    "metadata array": (build([*VALID[:2], (M, b"[]"), *VALID[3:]]), "not a JSON object"),
    "metadata no name": (build([*VALID[:2], (M, b'{"ImageVersion":"1"}'), *VALID[3:]]), "ImageName"),
    "metadata no build": (
        build([*VALID[:2], (M, b'{"ImageName":"a","ImageVersion":"1"}'), *VALID[3:]]),
        "BuildMetadata is missing",
    ),
    "metadata build key": (
        build([*VALID[:2], (M, META.replace(b'"BuildTool"', b'"Tool"')), *VALID[3:]]),
        "BuildMetadata.BuildTool",
    ),
}


@pytest.mark.parametrize("name", list(REJECTS))
def test_rejects(name: str) -> None:
    data, message = REJECTS[name]
    with pytest.raises(EifError, match=message):
        read_eif_bytes(data)


def test_metadata_section_size_limit() -> None:
    big = META[:-1] + b',"pad":"' + b"x" * (1 << 20) + b'"}'
    with pytest.raises(EifError, match=r"metadata.*limit"):
        read_eif_bytes(build([*VALID[:2], (M, big), *VALID[3:]]))


# --- never anything but EifError -------------------------------------------------------------------


def _only_eif_errors(data: bytes, verify_crc: bool = True) -> None:
    try:
        image = read_eif_bytes(data, verify_crc=verify_crc)
    except EifError:
        return
    image.describe()
    with tempfile.TemporaryDirectory() as out:
        image.extract_boot_parts(Path(out))


def _fix_crc(data: bytes) -> bytes:
    if len(data) < 548:
        return data
    return data[:544] + struct.pack(">I", zlib.crc32(data[:544] + data[548:])) + data[548:]


_SIGNED = build([*VALID, (S, signature_section(make_certificate()[0]))])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    _only_eif_errors(data)
    _only_eif_errors(b".eif" + data, verify_crc=False)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([VALID_BYTES, _SIGNED])))
    for _ in range(draw(st.integers(1, 8))):
        action = draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 16))]
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutations_of_valid_files(data: bytes) -> None:
    _only_eif_errors(data)
    _only_eif_errors(data, verify_crc=False)
    _only_eif_errors(_fix_crc(data))


_SIGNED_SECTIONS: Sections = [*VALID, (S, signature_section(make_certificate()[0]))]


@st.composite
def rebuilt(draw: st.DrawFn) -> bytes:
    """A self-consistent file (table, sizes, CRC) whose sections' types and contents are mutated, so the
    section-level checks and the cmdline, metadata JSON and signature CBOR parsers see hostile data."""
    sections = list(draw(st.sampled_from([VALID, _SIGNED_SECTIONS])))
    for _ in range(draw(st.integers(1, 3))):
        index = draw(st.integers(0, len(sections) - 1))
        section_type, data = sections[index]
        action = draw(st.sampled_from(["type", "replace", "flip", "truncate", "drop", "duplicate"]))
        if action == "type":
            sections[index] = (draw(st.integers(0, 7)), data)
        elif action == "replace":
            sections[index] = (section_type, draw(st.binary(max_size=64)))
        elif action == "flip" and data:
            position = draw(st.integers(0, len(data) - 1))
            flipped = data[position] ^ (1 << draw(st.integers(0, 7)))
            sections[index] = (section_type, data[:position] + bytes([flipped]) + data[position + 1 :])
        elif action == "truncate":
            sections[index] = (section_type, data[: draw(st.integers(0, len(data)))])
        elif action == "drop" and len(sections) > 1:
            del sections[index]
        elif action == "duplicate" and len(sections) < 32:
            sections.insert(index, sections[index])
    return build(sections, version=draw(st.sampled_from([2, 3, 4, 4, 4])))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rebuilt())
def test_mutated_sections_of_consistent_files(data: bytes) -> None:
    _only_eif_errors(data)


# --- signature verification (describe-eif's SignatureCheck and SigningCertificate) ---------------------


def _signer() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.COMMON_NAME, "salmiac signer"),
        ]
    )
    start = datetime.datetime(2024, 3, 5, 6, 7, 8, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(9)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _cose_sign1(key: ec.EllipticCurvePrivateKey, pcr0: bytes, *, alg: int = -35, tagged: bool = False) -> bytes:
    """COSE_Sign1 built independently with cbor2, the way nitro-cli's signer lays it out (spec 2.4)."""
    protected = cbor2.dumps({1: alg})
    payload = cbor2.dumps({"register_index": 0, "register_value": list(pcr0)})
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    message = [protected, {}, payload, r.to_bytes(48, "big") + s.to_bytes(48, "big")]
    encoded: bytes = cbor2.dumps(cbor2.CBORTag(18, message) if tagged else message)
    return encoded


def _signed_image(cose: bytes, cert: x509.Certificate) -> EifImage:
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return read_eif_bytes(build([*VALID, (S, signature_section(pem, cose))]))


PCR0 = by_hand(KERNEL + CMDLINE + R0 + R1)


@pytest.mark.parametrize("tagged", [False, True])
def test_signature_check_passes(tagged: bool) -> None:
    key, cert = _signer()
    image = _signed_image(_cose_sign1(key, PCR0, tagged=tagged), cert)
    assert image.measure().pcr0 == PCR0
    described = image.describe()
    assert list(described)[:6] == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "SigningCertificate",
        "CheckCRC",
        "SignatureCheck",
    ]
    assert described["SignatureCheck"] is True
    assert described["SigningCertificate"] == {
        "IssuerName": {"commonName": "salmiac signer", "countryName": "US"},
        "Algorithm": "ecdsa-with-SHA384",
        "NotBefore": "Mar  5 06:07:08 2024 GMT",
        "NotAfter": "Apr  4 06:07:08 2024 GMT",
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }


def test_signature_check_fails() -> None:
    key, cert = _signer()
    other_key, _ = _signer()
    good = _cose_sign1(key, PCR0)
    assert _signed_image(_cose_sign1(key, b"\x01" * 48), cert).signature_check() is False  # other PCR0
    assert _signed_image(_cose_sign1(other_key, PCR0), cert).signature_check() is False  # other key
    assert _signed_image(_cose_sign1(key, PCR0, alg=-7), cert).signature_check() is False  # alg vs curve
    assert _signed_image(good[:-1] + bytes([good[-1] ^ 1]), cert).signature_check() is False  # tampered
    assert _signed_image(b"\x80", cert).signature_check() is False  # not a COSE_Sign1
    assert _signed_image(good, cert).signature_check() is True
    assert read_eif_bytes(VALID_BYTES).signature_check() is None


_GOOD_COSE = _cose_sign1(_signer()[0], PCR0)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=256),
        st.builds(
            lambda d, i, b: d[:i] + bytes([b]) + d[i + 1 :],
            st.just(_GOOD_COSE),
            st.integers(0, len(_GOOD_COSE) - 1),
            st.integers(0, 255),
        ),
    )
)
def test_cose_decoder_only_raises_eif_error(cose: bytes) -> None:
    pem = _signer()[1].public_bytes(serialization.Encoding.PEM)
    try:
        result = verify_pcr0_signature(PcrSignature(signing_certificate=pem, signature=cose), PCR0)
    except EifError:
        return
    assert result in (True, False)
