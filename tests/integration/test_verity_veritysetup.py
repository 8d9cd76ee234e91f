"""rootfs.verity against cryptsetup's veritysetup (userspace format/verify, no device-mapper needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from salmiac.rootfs.verity import BLOCK_SIZE, VerityInfo, format_verity, level_sizes

pytestmark = pytest.mark.skipif(shutil.which("veritysetup") is None, reason="needs veritysetup (cryptsetup-bin)")

SALT = bytes.fromhex("0123456789abcdef" * 4)


def _make(path: Path, size: int) -> bytes:
    """Random head and tail, zeros between (sparse, fast for big sizes)."""
    head = os.urandom(min(size, 3 * BLOCK_SIZE + 11))
    tail = os.urandom(min(size - len(head), 5000))
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size - len(tail))
        fh.seek(size - len(tail))
        fh.write(tail)
    return head


def _verify(data: Path, hash_dev: Path, info: VerityInfo,
            root_hash: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["veritysetup", "verify", "--no-superblock", f"--salt={info.salt or '-'}",
         f"--data-blocks={info.data_blocks}", f"--hash-offset={info.hash_offset}",
         str(data), str(hash_dev), root_hash or info.root_hash],
        capture_output=True, text=True, check=False)


def _veritysetup_format(data: Path, hash_dev: Path, salt: bytes, data_blocks: int) -> str:
    out = subprocess.run(["veritysetup", "format", "--no-superblock", f"--salt={salt.hex()}",
                          f"--data-blocks={data_blocks}", str(data), str(hash_dev)],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"^Root hash:\s+([0-9a-f]{64})$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


SIZES = {
    "one-byte": 1,
    "one-block": BLOCK_SIZE,
    "non-aligned": 5 * BLOCK_SIZE + 123,
    "two-levels": 129 * BLOCK_SIZE + 1,
    "three-levels": 128 * 128 * BLOCK_SIZE + 77,
}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_separate_hash_file_matches_veritysetup(tmp_path: Path, size: int) -> None:
    data, ours, theirs = tmp_path / "data", tmp_path / "hash.ours", tmp_path / "hash.theirs"
    _make(data, size)
    info = format_verity(data, ours, salt=SALT)
    assert info.data_blocks == -(-size // BLOCK_SIZE) and data.stat().st_size == info.data_blocks * BLOCK_SIZE
    assert len(level_sizes(info.data_blocks)) == {1: 0, 2: 1, 6: 1, 130: 2, 16385: 3}[info.data_blocks]
    assert _verify(data, ours, info).returncode == 0
    assert _veritysetup_format(data, theirs, SALT, info.data_blocks) == info.root_hash
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_appended_tree_verifies_and_detects_flips(tmp_path: Path, size: int) -> None:
    data = tmp_path / "image"
    _make(data, size)
    info = format_verity(data, salt=SALT)
    assert data.stat().st_size == info.hash_offset + info.hash_size
    ok = _verify(data, data, info)
    assert ok.returncode == 0, ok.stderr

    _flip(data, size - 1)  # last real data byte (inside the last, padded block)
    assert _verify(data, data, info).returncode != 0
    _flip(data, size - 1)
    assert _verify(data, data, info).returncode == 0
    if info.hash_size:
        for offset in (info.hash_offset, info.hash_offset + info.hash_size - BLOCK_SIZE):  # top and level 0
            _flip(data, offset)
            assert _verify(data, data, info).returncode != 0
            _flip(data, offset)
    wrong_root = format(int(info.root_hash, 16) ^ 1, "064x")
    assert _verify(data, data, info, wrong_root).returncode != 0


def test_content_derived_salt_is_accepted_and_reproducible(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    head = _make(a, 200_000)
    shutil.copyfile(a, b)
    info_a, info_b = format_verity(a), format_verity(b)
    assert info_a == info_b and len(info_a.salt) == 64
    assert _verify(a, a, info_a).returncode == 0
    assert head  # data was random: a constant salt would not survive the next line
    c = tmp_path / "c"
    _make(c, 200_000)
    assert format_verity(c).salt != info_a.salt
