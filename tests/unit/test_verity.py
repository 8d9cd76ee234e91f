"""rootfs.verity: byte-exact hash trees recomputed here with hashlib, layout, validation, activation args."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.rootfs.verity import (
    SALT_CONTEXT,
    VerityError,
    VerityInfo,
    dm_table,
    format_verity,
    hash_tree_size,
    level_sizes,
    veritysetup_open_args,
)

SALT = bytes.fromhex("5a17")
B = 4096


def h(data: bytes) -> bytes:
    """Version 1: salt first."""
    return hashlib.sha256(SALT + data).digest()


def block(data: bytes) -> bytes:
    assert len(data) <= B
    return data + bytes(B - len(data))


def pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 4096) % 251 for i in range(n))


def test_one_block_has_no_hash_blocks_and_the_root_is_the_block_digest(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"hello")
    info = format_verity(data, tmp_path / "h", salt=SALT)
    assert data.read_bytes() == block(b"hello")  # zero padded in place
    assert info.root_hash == h(block(b"hello")).hex()
    assert (info.data_blocks, info.hash_size, info.hash_offset) == (1, 0, 0)
    assert (tmp_path / "h").read_bytes() == b""


def test_two_blocks_non_aligned_one_level(tmp_path: Path) -> None:
    payload = pattern(5000)
    data = tmp_path / "d"
    data.write_bytes(payload)
    info = format_verity(data, tmp_path / "h", salt=SALT)
    b0, b1 = payload[:B], block(payload[B:])
    level0 = block(h(b0) + h(b1))
    assert (tmp_path / "h").read_bytes() == level0
    assert info.root_hash == h(level0).hex()
    assert (info.data_blocks, info.hash_size, info.salt) == (2, B, SALT.hex())


def test_129_blocks_two_levels_top_level_first(tmp_path: Path) -> None:
    payload = pattern(129 * B)
    data = tmp_path / "d"
    data.write_bytes(payload)
    info = format_verity(data, tmp_path / "h", salt=SALT)
    digests = [h(payload[i * B:(i + 1) * B]) for i in range(129)]
    level0 = [b"".join(digests[:128]), block(digests[128])]
    level1 = block(h(level0[0]) + h(level0[1]))
    assert (tmp_path / "h").read_bytes() == level1 + level0[0] + level0[1]
    assert info.root_hash == h(level1).hex()
    assert info.hash_size == 3 * B


def test_appended_tree_and_explicit_offset(tmp_path: Path) -> None:
    payload = pattern(5000)
    data = tmp_path / "d"
    data.write_bytes(payload)
    info = format_verity(data, salt=SALT, hash_offset=4 * B)
    level0 = block(h(payload[:B]) + h(block(payload[B:])))
    assert data.read_bytes() == block(payload[:B]) + block(payload[B:]) + bytes(2 * B) + level0
    assert (info.hash_offset, info.hash_size, info.root_hash) == (4 * B, B, h(level0).hex())
    # Default offset: right after the padded data.
    again = tmp_path / "e"
    again.write_bytes(payload)
    assert format_verity(again, salt=SALT).hash_offset == 2 * B
    assert again.read_bytes() == block(payload[:B]) + block(payload[B:]) + level0


def test_derived_salt_is_sha256_of_context_and_padded_data(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"abc")
    info = format_verity(data, tmp_path / "h")
    assert info.salt == hashlib.sha256(SALT_CONTEXT + block(b"abc")).hexdigest()
    other = tmp_path / "o"
    other.write_bytes(b"abd")
    assert format_verity(other, tmp_path / "h2").salt != info.salt


def test_empty_salt(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"x")
    info = format_verity(data, tmp_path / "h", salt=b"")
    assert info.root_hash == hashlib.sha256(block(b"x")).hexdigest()
    assert dm_table(info, "/dev/nbd0").endswith(" -")


@pytest.mark.parametrize(("blocks", "sizes"), [
    (1, []), (2, [1]), (128, [1]), (129, [2, 1]), (128 * 128, [128, 1]), (128 * 128 + 1, [129, 2, 1]),
    (2**40, [2**33, 2**26, 2**19, 2**12, 2**5, 1]),
])
def test_level_sizes(blocks: int, sizes: list[int]) -> None:
    assert level_sizes(blocks) == sizes
    assert hash_tree_size(blocks) == sum(sizes) * B


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"salt": bytes(257)}, "salt longer"),
    ({"hash_offset": 100}, "not a non-negative multiple"),
    ({"hash_offset": 0}, "overlaps"),
])
def test_bad_parameters(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    data = tmp_path / "d"
    data.write_bytes(pattern(5000))
    with pytest.raises(VerityError, match=message):
        format_verity(data, **kwargs)
    assert data.stat().st_size == 2 * B  # padded, nothing appended


def test_empty_data_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.write_bytes(b"")
    with pytest.raises(VerityError, match="empty"):
        format_verity(data)


INFO = VerityInfo(root_hash="ab" * 32, salt="0102", data_blocks=17090, hash_offset=17090 * B,
                  hash_size=137 * B)


def test_veritysetup_open_args() -> None:
    assert veritysetup_open_args(INFO, "/dev/nbd0", "rootfs") == [
        "veritysetup", "open", "--no-superblock", "--format=1", "--hash=sha256", "--data-block-size=4096",
        "--hash-block-size=4096", "--data-blocks=17090", f"--hash-offset={17090 * B}", "--salt=0102",
        "/dev/nbd0", "rootfs", "/dev/nbd0", "ab" * 32,
    ]
    with pytest.raises(VerityError, match="device-mapper name"):
        veritysetup_open_args(INFO, "/dev/nbd0", "a/b")


def test_dm_table() -> None:
    assert dm_table(INFO, "43:0") == f"0 {17090 * 8} verity 1 43:0 43:0 4096 4096 17090 17090 sha256 {'ab' * 32} 0102"
    assert dm_table(INFO, "/dev/nbd0", "/dev/nbd1").split()[4:6] == ["/dev/nbd0", "/dev/nbd1"]
    with pytest.raises(VerityError, match="bad device"):
        dm_table(INFO, "/dev/nbd0 x")


def test_info_round_trip_and_strict_decoding() -> None:
    assert VerityInfo.from_dict(INFO.to_dict()) == INFO
    good = INFO.to_dict()
    for bad, message in [
        ({**good, "extra": 1}, "unknown verity info key"),
        ({k: v for k, v in good.items() if k != "salt"}, "lacks 'salt'"),
        ({**good, "data_blocks": "17090"}, "must be int"),
        ({**good, "data_blocks": True}, "must be int"),
        ({**good, "root_hash": "ab" * 31}, "root_hash must be"),
        ({**good, "root_hash": "AB" * 32}, "lower-case"),
        ({**good, "salt": "zz"}, "not hex"),
        ({**good, "hash_size": 136 * B}, "does not match"),
        ({**good, "hash_offset": 5}, "not a multiple"),
        ({**good, "hash_algorithm": "sha1"}, "unsupported"),
        ({**good, "data_blocks": 0}, "at least 1"),
        ({**good, "data_blocks": -1}, "out of range"),
    ]:
        with pytest.raises(VerityError, match=message):
            VerityInfo.from_dict(bad)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*INFO.to_dict(), "x"]),
                       st.one_of(st.integers(-2, 2**64), st.text(max_size=70), st.none(), st.booleans())))
def test_from_dict_only_raises_verity_error(raw: dict[str, object]) -> None:
    try:
        info = VerityInfo.from_dict({**INFO.to_dict(), **raw})
    except VerityError:
        return
    assert info.hash_size == hash_tree_size(info.data_blocks)
