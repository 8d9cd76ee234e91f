"""The EIF Signature section (project spec 2.4), decoded strictly and without a general CBOR library.

nitro-cli writes ``serde_cbor`` of ``Vec<PcrSignature>``: a CBOR array of maps
``{"signing_certificate": [u8...], "signature": [u8...]}`` where each byte array is a CBOR *array of
unsigned integers* (one item per byte), the certificate is the PEM file's bytes and the signature is an
untagged COSE_Sign1 over ``PcrInfo{register_index: 0, register_value: PCR0}``.

The section is hostile input: a general CBOR decoder accepts tags, shared references (cycles) and
bignums we have no use for, so this decodes exactly that shape, definite lengths only, every length
checked against the bytes left before anything is allocated, and no trailing bytes.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from salmiac.eif.format import SIGNATURE_MAX_SIZE, EifError

_MAJOR_UINT = 0
_MAJOR_TEXT = 3
_MAJOR_ARRAY = 4
_MAJOR_MAP = 5
_CERT_KEY = "signing_certificate"
_SIGNATURE_KEY = "signature"


@dataclass(frozen=True, slots=True)
class PcrSignature:
    signing_certificate: bytes  # PEM
    signature: bytes  # COSE_Sign1, untagged


class _Decoder:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def _take(self, n: int) -> bytes:
        if n > self.remaining:
            raise EifError("signature section: truncated CBOR")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def head(self, expected_major: int, what: str) -> int:
        """Read an item head of the expected major type; return its (definite) argument."""
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if major != expected_major:
            raise EifError(f"signature section: {what}: CBOR major type {major}, expected {expected_major}")
        if info < 24:
            return info
        if info > 27:  # 28..30 reserved, 31 indefinite length: serde_cbor never writes either
            raise EifError(f"signature section: {what}: unsupported CBOR length encoding {info}")
        return int.from_bytes(self._take(1 << (info - 24)), "big")

    def byte_array(self, what: str) -> bytes:
        count = self.head(_MAJOR_ARRAY, what)
        if count > self.remaining:  # every item takes at least one byte
            raise EifError(f"signature section: {what}: {count} items but {self.remaining} bytes left")
        out = bytearray()
        for _ in range(count):
            value = self.head(_MAJOR_UINT, what)
            if value > 0xFF:
                raise EifError(f"signature section: {what}: item {value} is not a byte")
            out.append(value)
        return bytes(out)

    def text(self, what: str) -> str:
        length = self.head(_MAJOR_TEXT, what)
        try:
            return self._take(length).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EifError(f"signature section: {what}: invalid UTF-8") from exc


def parse_signature_section(data: bytes) -> list[PcrSignature]:
    """Decode a Signature section; raises ``EifError`` unless it is exactly the shape nitro-cli writes."""
    if len(data) > SIGNATURE_MAX_SIZE:
        raise EifError(f"signature section: {len(data)} bytes, over the {SIGNATURE_MAX_SIZE}-byte limit")
    dec = _Decoder(data)
    count = dec.head(_MAJOR_ARRAY, "signature list")
    if count == 0:
        raise EifError("signature section: empty signature list")
    if count > dec.remaining:
        raise EifError(f"signature section: {count} signatures but {dec.remaining} bytes left")
    signatures = []
    for index in range(count):
        what = f"signature {index}"
        if dec.head(_MAJOR_MAP, what) != 2:
            raise EifError(f"signature section: {what}: expected a map of 2 entries")
        if dec.text(what) != _CERT_KEY:
            raise EifError(f"signature section: {what}: first key must be {_CERT_KEY!r}")
        certificate = dec.byte_array(f"{what} certificate")
        if dec.text(what) != _SIGNATURE_KEY:
            raise EifError(f"signature section: {what}: second key must be {_SIGNATURE_KEY!r}")
        signature = dec.byte_array(f"{what} COSE_Sign1")
        if not certificate:
            raise EifError(f"signature section: {what}: empty signing certificate")
        signatures.append(PcrSignature(signing_certificate=certificate, signature=signature))
    if dec.remaining:
        raise EifError(f"signature section: {dec.remaining} trailing bytes")
    return signatures


# --- verification (what `nitro-cli describe-eif` reports as SignatureCheck) --------------------------------

_MAJOR_BYTES = 2
_MAJOR_NEGATIVE = 1
_COSE_SIGN1_TAG = 18
_MAX_DEPTH = 8
#: COSE algorithm ids nitro-cli's signer picks by curve, with the hash each one uses.
_COSE_ALGORITHMS: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    -7: ("secp256r1", hashes.SHA256),
    -35: ("secp384r1", hashes.SHA384),
    -36: ("secp521r1", hashes.SHA512),
}

CborValue = int | bytes | str | list["CborValue"] | dict["int | bytes | str", "CborValue"]


class _ItemDecoder(_Decoder):
    """Definite-length CBOR limited to what COSE_Sign1 needs: ints, byte/text strings, arrays, maps."""

    def item(self, depth: int = 0) -> CborValue:
        if depth > _MAX_DEPTH:
            raise EifError("signature section: COSE: nesting too deep")
        if self.remaining == 0:
            raise EifError("signature section: truncated CBOR")
        major = self._data[self._pos] >> 5
        if major == _MAJOR_UINT:
            return self.head(_MAJOR_UINT, "COSE")
        if major == _MAJOR_NEGATIVE:
            return -1 - self.head(_MAJOR_NEGATIVE, "COSE")
        if major == _MAJOR_BYTES:
            return self._take(self.head(_MAJOR_BYTES, "COSE"))
        if major == _MAJOR_TEXT:
            return self.text("COSE")
        if major == _MAJOR_ARRAY:
            count = self.head(_MAJOR_ARRAY, "COSE")
            if count > self.remaining:
                raise EifError("signature section: COSE: array longer than its data")
            return [self.item(depth + 1) for _ in range(count)]
        if major == _MAJOR_MAP:
            count = self.head(_MAJOR_MAP, "COSE")
            if count * 2 > self.remaining:
                raise EifError("signature section: COSE: map longer than its data")
            out: dict[int | bytes | str, CborValue] = {}
            for _ in range(count):
                key = self.item(depth + 1)
                if not isinstance(key, int | bytes | str):
                    raise EifError("signature section: COSE: map key is not a scalar")
                out[key] = self.item(depth + 1)
            return out
        if major == 6 and depth == 0 and self._data[self._pos] == 0xC0 | _COSE_SIGN1_TAG:
            self._pos += 1  # COSE_Sign1 may be tagged; nitro-cli writes it untagged
            return self.item(depth)
        raise EifError(f"signature section: COSE: unsupported CBOR major type {major}")


def _head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([major << 5 | info]) + value.to_bytes(size, "big")
    raise ValueError(f"CBOR argument {value} too large")


def _bstr(data: bytes) -> bytes:
    return _head(_MAJOR_BYTES, len(data)) + data


def _tstr(text: str) -> bytes:
    data = text.encode("utf-8")
    return _head(_MAJOR_TEXT, len(data)) + data


def encode_pcr_info(register_index: int, register_value: bytes) -> bytes:
    """serde_cbor of upstream's ``PcrInfo``: the COSE payload nitro-cli signs (spec 2.4)."""
    return (
        _head(_MAJOR_MAP, 2)
        + _tstr("register_index")
        + _head(_MAJOR_UINT, register_index)
        + _tstr("register_value")
        + _head(_MAJOR_ARRAY, len(register_value))
        + b"".join(_head(_MAJOR_UINT, b) for b in register_value)
    )


def sig1_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 8152 Sig_structure for COSE_Sign1 with empty external AAD: what the signature covers."""
    return _head(_MAJOR_ARRAY, 4) + _tstr("Signature1") + _bstr(protected) + _bstr(b"") + _bstr(payload)


def verify_pcr0_signature(signature: PcrSignature, pcr0: bytes) -> bool:
    """nitro-cli's ``SignatureCheck``: the COSE_Sign1 verifies with the signing certificate's EC key and its
    payload is ``PcrInfo{register_index: 0, register_value: PCR0}``. False for any mismatch or bad signature;
    ``EifError`` only if the COSE structure itself cannot be decoded."""
    dec = _ItemDecoder(signature.signature)
    cose = dec.item()
    if dec.remaining or not isinstance(cose, list) or len(cose) != 4:
        raise EifError("signature section: COSE_Sign1 is not an array of 4 items")
    protected, _unprotected, payload, raw_signature = cose
    if not (isinstance(protected, bytes) and isinstance(payload, bytes) and isinstance(raw_signature, bytes)):
        raise EifError("signature section: COSE_Sign1 fields have the wrong types")
    header_dec = _ItemDecoder(protected)
    header = header_dec.item() if protected else {}
    if header_dec.remaining or not isinstance(header, dict):
        raise EifError("signature section: COSE protected header is not a map")
    algorithm = _COSE_ALGORITHMS.get(header.get(1))  # type: ignore[arg-type]
    try:
        cert = x509.load_pem_x509_certificate(signature.signing_certificate)
        key = cert.public_key()  # parsed lazily: a mangled key OID raises UnsupportedAlgorithm only here
    except (ValueError, UnsupportedAlgorithm):
        return False
    if algorithm is None or not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != algorithm[0]:
        return False
    half = (key.curve.key_size + 7) // 8
    if len(raw_signature) != 2 * half:
        return False
    der = encode_dss_signature(
        int.from_bytes(raw_signature[:half], "big"), int.from_bytes(raw_signature[half:], "big")
    )
    try:
        key.verify(der, sig1_structure(protected, payload), ec.ECDSA(algorithm[1]()))
    except InvalidSignature:
        return False
    return payload == encode_pcr_info(0, pcr0)


def certificate_info(pem: bytes) -> dict[str, object]:
    """``SigningCertificate`` of ``nitro-cli describe-eif``: issuer (OpenSSL long names, sorted),
    signature algorithm, validity in OpenSSL's ``ASN1_TIME_print`` form, signature as XX:XX hex."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise EifError("signature section: the signing certificate is not a PEM X.509 certificate") from exc
    # cryptography's OID names are OpenSSL's long names ("commonName", "ecdsa-with-SHA384").
    issuer = {attr.oid._name: _attribute_text(attr.value) for attr in cert.issuer}
    return {
        "IssuerName": dict(sorted(issuer.items())),
        "Algorithm": cert.signature_algorithm_oid._name,
        "NotBefore": _asn1_time(cert.not_valid_before_utc),
        "NotAfter": _asn1_time(cert.not_valid_after_utc),
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }


def _attribute_text(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _asn1_time(when: datetime.datetime) -> str:
    return f"{when:%b} {when.day:2d} {when:%H:%M:%S} {when.year} GMT"
