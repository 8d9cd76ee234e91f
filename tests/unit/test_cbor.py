"""protocol.cbor: RFC 8949 Appendix A vectors, cbor2 as an oracle, and hostile input that must only raise CborError."""

from __future__ import annotations

import contextlib
import math
import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.protocol import cbor
from salmiac.protocol.cbor import MAX_DEPTH, MAX_ITEMS, CborError, Tag

# RFC 8949 Appendix A, the items inside our subset that we also *encode* to the same bytes (floats are always
# encoded as doubles, so only the double-precision float vectors are here).
BOTH_WAYS: list[tuple[Any, str]] = [
    (0, "00"),
    (1, "01"),
    (10, "0a"),
    (23, "17"),
    (24, "1818"),
    (25, "1819"),
    (100, "1864"),
    (1000, "1903e8"),
    (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"),
    (18446744073709551615, "1bffffffffffffffff"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (-1, "20"),
    (-10, "29"),
    (-100, "3863"),
    (-1000, "3903e7"),
    (1.1, "fb3ff199999999999a"),
    (1.0e300, "fb7e37e43c8800759c"),
    (-4.1, "fbc010666666666666"),
    (False, "f4"),
    (True, "f5"),
    (None, "f6"),
    (b"", "40"),
    (b"\x01\x02\x03\x04", "4401020304"),
    ("", "60"),
    ("a", "6161"),
    ("IETF", "6449455446"),
    ('"\\', "62225c"),
    ("\u00fc", "62c3bc"),
    ("\u6c34", "63e6b0b4"),
    ("\U00010151", "64f0908591"),
    ([], "80"),
    ([1, 2, 3], "83010203"),
    ([1, [2, 3], [4, 5]], "8301820203820405"),
    (list(range(1, 26)), "98190102030405060708090a0b0c0d0e0f101112131415161718181819"),
    ({}, "a0"),
    ({1: 2, 3: 4}, "a201020304"),
    ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    (["a", {"b": "c"}], "826161a161626163"),
    ({"a": "A", "b": "B", "c": "C", "d": "D", "e": "E"}, "a56161614161626142616361436164614461656145"),
]

# Decoded by us (half and single precision, infinities) but not produced: we always write doubles.
DECODE_ONLY_FLOATS: list[tuple[float, str]] = [
    (0.0, "f90000"),
    (-0.0, "f98000"),
    (1.0, "f93c00"),
    (1.5, "f93e00"),
    (65504.0, "f97bff"),
    (100000.0, "fa47c35000"),
    (3.4028234663852886e38, "fa7f7fffff"),
    (5.960464477539063e-8, "f90001"),
    (0.00006103515625, "f90400"),
    (-4.0, "f9c400"),
    (math.inf, "f97c00"),
    (-math.inf, "f9fc00"),
    (math.inf, "fa7f800000"),
    (-math.inf, "faff800000"),
    (math.inf, "fb7ff0000000000000"),
    (-math.inf, "fbfff0000000000000"),
]
NANS = ["f97e00", "fa7fc00000", "fb7ff8000000000000"]

# Appendix A tags, accepted only when the caller allows them.
TAGGED: list[tuple[Tag, str]] = [
    (Tag(0, "2013-03-21T20:04:00Z"), "c074323031332d30332d32315432303a30343a30305a"),
    (Tag(1, 1363896240), "c11a514b67b0"),
    (Tag(1, 1363896240.5), "c1fb41d452d9ec200000"),
    (Tag(23, b"\x01\x02\x03\x04"), "d74401020304"),
    (Tag(24, b"dIETF"), "d818456449455446"),
    (Tag(32, "http://www.example.com"), "d82076687474703a2f2f7777772e6578616d706c652e636f6d"),
]

# Appendix A items outside our subset: indefinite lengths, undefined, simple values, bignums (tags 2/3).
REFUSED = [
    "f7",  # undefined
    "f0",  # simple(16)
    "f8ff",  # simple(255)
    "c249010000000000000000",  # bignum 2**64
    "c349010000000000000000",  # bignum -2**64-1
    "5f42010243030405ff",
    "7f657374726561646d696e67ff",
    "9fff",
    "9f018202039f0405ffff",
    "9f01820203820405ff",
    "83018202039f0405ff",
    "83019f0203ff820405",
    "9f0102030405060708090a0b0c0d0e0f101112131415161718181819ff",
    "bf61610161629f0203ffff",
    "826161bf61626163ff",
    "bf6346756ef563416d7421ff",
]


@pytest.mark.parametrize(("value", "hex_"), BOTH_WAYS, ids=[h for _, h in BOTH_WAYS])
def test_appendix_a_both_ways(value: Any, hex_: str) -> None:
    assert cbor.dumps(value) == bytes.fromhex(hex_)
    decoded = cbor.loads(bytes.fromhex(hex_))
    assert decoded == value
    assert type(decoded) is type(value)


@pytest.mark.parametrize(("value", "hex_"), DECODE_ONLY_FLOATS, ids=[h for _, h in DECODE_ONLY_FLOATS])
def test_appendix_a_floats_decode(value: float, hex_: str) -> None:
    decoded = cbor.loads(bytes.fromhex(hex_))
    assert decoded == value
    assert math.copysign(1.0, decoded) == math.copysign(1.0, value)  # -0.0 stays negative
    assert cbor.loads(cbor.dumps(decoded)) == value


@pytest.mark.parametrize("hex_", NANS)
def test_appendix_a_nan_decodes(hex_: str) -> None:
    assert math.isnan(cbor.loads(bytes.fromhex(hex_)))


@pytest.mark.parametrize(("value", "hex_"), TAGGED, ids=[h for _, h in TAGGED])
def test_appendix_a_tags_only_when_allowed(value: Tag, hex_: str) -> None:
    raw = bytes.fromhex(hex_)
    with pytest.raises(CborError, match="tag"):
        cbor.loads(raw)
    assert cbor.loads(raw, allowed_tags={value.tag}) == value
    assert cbor.dumps(value) == raw


@pytest.mark.parametrize("hex_", REFUSED)
def test_appendix_a_outside_subset_refused(hex_: str) -> None:
    with pytest.raises(CborError):
        cbor.loads(bytes.fromhex(hex_))


@pytest.mark.parametrize("hex_", [h for _, h in BOTH_WAYS + TAGGED] + [h for _, h in DECODE_ONLY_FLOATS])
def test_every_truncation_is_an_error(hex_: str) -> None:
    raw = bytes.fromhex(hex_)
    for cut in range(len(raw)):
        with pytest.raises(CborError):
            cbor.loads(raw[:cut], allowed_tags=range(64))


@pytest.mark.parametrize(
    "raw",
    [
        b"\x5b" + (1 << 63).to_bytes(8, "big"),  # byte string of 2**63 bytes
        b"\x5b" + b"\xff" * 8,
        b"\x7b" + (1 << 63).to_bytes(8, "big") + b"abc",  # text string
        b"\x5a\xff\xff\xff\xff",  # 5 bytes declaring a 4 GiB byte string
        b"\x9b" + (1 << 63).to_bytes(8, "big") + b"\x00",  # array of 2**63 items
        b"\xbb" + (1 << 63).to_bytes(8, "big") + b"\x00\x00",  # map of 2**63 pairs
        b"\x9a\xff\xff\xff\xff",
        b"\x81" * 20 + b"\x5b" + b"\xff" * 8,  # nested
    ],
)
def test_huge_declared_lengths_fail_without_allocating(raw: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(CborError):
            cbor.loads(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_item_count_limit() -> None:
    at_limit = b"\x9a" + MAX_ITEMS.to_bytes(4, "big") + b"\x00" * MAX_ITEMS
    assert cbor.loads(at_limit) == [0] * MAX_ITEMS
    over = b"\x9a" + (MAX_ITEMS + 1).to_bytes(4, "big") + b"\x00" * (MAX_ITEMS + 1)
    with pytest.raises(CborError, match="limit"):
        cbor.loads(over)


def test_nesting_limit_both_ways() -> None:
    deepest: Any = 0
    for _ in range(MAX_DEPTH):
        deepest = [deepest]
    raw = b"\x81" * MAX_DEPTH + b"\x00"
    assert cbor.dumps(deepest) == raw
    assert cbor.loads(raw) == deepest
    with pytest.raises(CborError, match="deep"):
        cbor.loads(b"\x81" * (MAX_DEPTH + 1) + b"\x00")
    with pytest.raises(CborError, match="deep"):
        cbor.dumps([deepest])
    # Far beyond Python's recursion limit: still a CborError, found before recursing that far.
    with pytest.raises(CborError, match="deep"):
        cbor.loads(b"\x81" * 100_000 + b"\x00")
    with pytest.raises(CborError, match="deep"):
        cbor.loads(b"\xa1\x00" * (MAX_DEPTH + 1) + b"\x00")


@pytest.mark.parametrize(
    ("hex_", "match"),
    [
        ("a201010102", "duplicate"),  # {1: 1, 1: 2}
        ("a2616101616102", "duplicate"),  # {"a": 1, "a": 2}
        ("a2f500f400a1f501", "trailing"),  # a complete {true: 0, false: 0} then more
        ("a201f5f500", "duplicate"),  # {1: true, true: 0}: equal as Python keys, refused rather than merged
        ("0000", "trailing"),
        ("8100ff", "trailing"),
        ("62c328", "UTF-8"),
        ("61ff", "UTF-8"),
        ("63eda080", "UTF-8"),  # a UTF-16 surrogate
        ("a18000", "scalars"),  # array as key
        ("a1a00000", "scalars"),  # map as key
        ("1c", "reserved"),
        ("1d", "reserved"),
        ("1e", "reserved"),
        ("1f", "indefinite"),
        ("3f", "indefinite"),
        ("5f", "indefinite"),
        ("c0", "tag"),
        ("", "truncated"),
        ("19", "truncated"),
        ("fb00", "truncated"),
    ],
)
def test_hostile_inputs(hex_: str, match: str) -> None:
    with pytest.raises(CborError, match=match):
        cbor.loads(bytes.fromhex(hex_))


def test_tagged_map_key_is_refused_even_when_the_tag_is_allowed() -> None:
    # {18([1]): 1}: a tag wrapping a list is unhashable; it must be a CborError, not a TypeError.
    with pytest.raises(CborError, match="scalars"):
        cbor.loads(bytes.fromhex("a1d2810101"), allowed_tags={18})


def test_allowed_tags_are_exact() -> None:
    cose = bytes.fromhex("d2840000f600")  # 18([0, 0, null, 0])
    assert cbor.loads(cose, allowed_tags={18}) == Tag(18, [0, 0, None, 0])
    with pytest.raises(CborError, match="tag 18"):
        cbor.loads(cose, allowed_tags={17, 19})


@pytest.mark.parametrize(
    "value",
    [1 << 64, -(1 << 64) - 1, {1, 2}, object(), Tag(1 << 64, 0), 1j],
    ids=["2**64", "-2**64-1", "set", "object", "huge-tag", "complex"],
)
def test_encode_refuses(value: Any) -> None:
    with pytest.raises(CborError):
        cbor.dumps(value)


def test_encoding_is_deterministic_and_sorted_bytewise() -> None:
    # RFC 8949 4.2.1: keys sorted by their encoded bytes, whatever the insertion order.
    a = {"b": 1, 10: 2, "a": 3, -1: 4, b"x": 5, 1000: 6}
    b = dict(reversed(list(a.items())))
    assert cbor.dumps(a) == cbor.dumps(b)
    assert cbor.dumps(a) == bytes.fromhex("a6" "0a02" "1903e806" "2004" "417805" "616103" "616201")
    assert cbor.dumps((1, 2)) == cbor.dumps([1, 2])
    assert cbor.dumps(bytearray(b"ab")) == cbor.dumps(memoryview(b"ab")) == b"\x42ab"


# --- hypothesis ---------------------------------------------------------------------------------------------

INT64 = st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1)
CANONICAL_LEAVES = INT64 | st.binary(max_size=300) | st.text(max_size=300)


def _homogeneous_maps(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[Any, Any]]:
    # cbor2's canonical=True orders keys length-first (RFC 7049); RFC 8949 orders bytewise. The two agree when
    # all keys of a map are of one kind and sign, so the oracle is asked only about such maps.
    key_kinds = [
        st.text(max_size=40),
        st.binary(max_size=40),
        st.integers(min_value=0, max_value=(1 << 64) - 1),
        st.integers(min_value=-(1 << 64), max_value=-1),
    ]
    return st.one_of(*(st.dictionaries(k, children, max_size=6) for k in key_kinds))


CANONICAL_VALUES = st.recursive(
    CANONICAL_LEAVES,
    lambda children: st.lists(children, max_size=6) | _homogeneous_maps(children),
    max_leaves=30,
)

ANY_LEAVES = CANONICAL_LEAVES | st.booleans() | st.none() | st.floats(allow_nan=False)
ANY_KEYS = st.text(max_size=20) | st.binary(max_size=20) | INT64 | st.none() | st.floats(allow_nan=False)
ANY_VALUES = st.recursive(
    ANY_LEAVES,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(ANY_KEYS, children, max_size=6),
    max_leaves=30,
)


@given(CANONICAL_VALUES)
@settings(max_examples=200, deadline=None)
def test_cbor2_canonical_is_our_encoding(value: Any) -> None:
    assert cbor.dumps(value) == cbor2.dumps(value, canonical=True)


@given(ANY_VALUES)
@settings(max_examples=200, deadline=None)
def test_round_trip_and_cbor2_agrees(value: Any) -> None:
    raw = cbor.dumps(value)
    assert cbor.loads(raw) == value
    assert cbor2.loads(raw) == value
    # And we read what cbor2 writes (including its shortest-float encodings).
    assert cbor.loads(cbor2.dumps(value, canonical=True)) == value


@given(st.binary(max_size=200))
@settings(max_examples=1000, deadline=None)
def test_arbitrary_bytes_only_raise_cbor_error(raw: bytes) -> None:
    for tags in ((), (18,)):
        with contextlib.suppress(CborError):
            cbor.loads(raw, allowed_tags=tags)


@given(ANY_VALUES, st.data())
@settings(max_examples=200, deadline=None)
def test_mutated_valid_items_only_raise_cbor_error(value: Any, data: st.DataObject) -> None:
    raw = bytearray(cbor.dumps(value))
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        pos = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[pos] = data.draw(st.integers(min_value=0, max_value=255))
    with contextlib.suppress(CborError):
        cbor.loads(bytes(raw))
