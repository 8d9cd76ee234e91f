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

from dataclasses import dataclass

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
