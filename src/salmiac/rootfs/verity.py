"""dm-verity hash trees, computed in Python, bit-compatible with ``veritysetup format --no-superblock``.

Stdlib only: the enclave side (``veritysetup_open_args``, ``dm_table``, ``VerityInfo.from_dict``) imports this
module too.

Format (what the kernel's dm-verity and cryptsetup's ``lib/verity/verity_hash.c`` expect, version 1):

- The data is ``data_blocks`` blocks of 4096 bytes. Each block's digest is ``sha256(salt || block)`` (version 1
  puts the salt first; version 0 put it last). The digests of one level are packed into 4096-byte hash blocks,
  128 per block (a sha256 digest is 32 bytes, already a power of two, so no per-digest padding), and the last
  block of a level is zero-padded.
- The next level hashes the previous level's blocks the same way, until one level fits in one block. The
  number of levels is the smallest ``n`` with ``(data_blocks - 1) >> (7 * n) == 0``; one data block means zero
  levels (no hash blocks at all, the root hash is the data block's digest).
- In the hash area the top level (one block) comes first, then the levels below it, level 0 (digests of the
  data blocks) last. The root hash is ``sha256(salt || top block)``.

Choices:

- **No verity superblock** (``--no-superblock``). Everything the kernel needs (salt, sizes, block count,
  algorithm, offset) is in ``VerityInfo``, which lives in the measured initramfs config. A superblock would be a
  copy of those parameters on the parent-served (untrusted) NBD device that ``veritysetup`` would parse and that
  we would then have to re-check against the measured values; without one, nothing read from the untrusted
  device steers activation, and the dm table can be built directly (``dm_table``).
- **Padding**: the data is zero-padded in place to a whole number of 4096-byte blocks. ``veritysetup`` counts
  only whole blocks (``floor(size / 4096)``), so an unpadded tail would be readable but unverified.
- **One file**: by default the hash tree is appended to the data file at ``hash_offset`` = padded data size, so
  the parent serves one NBD export and the enclave maps data and hash from the same device.
- **Salt**: when none is given it is derived from the content, ``sha256(SALT_CONTEXT || padded data)``. The salt
  in dm-verity is not a secret: it separates hash trees so that precomputation or multi-target work against
  one image does not carry over to another. A content-derived salt is different for every different image, is
  fixed before anyone can see the tree, and keeps conversion reproducible (same image → same root hash → same
  PCRs). An attacker who could choose data to exploit a known salt would need a second preimage of sha256
  anyway, which the salt does not protect against and does not need to. It costs one extra read of the data.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

VERITY_VERSION: Final = 1
BLOCK_SIZE: Final = 4096
HASH_ALGORITHM: Final = "sha256"
DIGEST_SIZE: Final = 32
HASHES_PER_BLOCK: Final = BLOCK_SIZE // DIGEST_SIZE
_HASH_PER_BLOCK_BITS: Final = HASHES_PER_BLOCK.bit_length() - 1
MAX_SALT_SIZE: Final = 256  # cryptsetup's VERITY_MAX_SALT_SIZE
MAX_LEVELS: Final = 63  # cryptsetup's VERITY_MAX_LEVELS
SALT_CONTEXT: Final = b"salmiac dm-verity salt v1\0"
_CHUNK_BLOCKS: Final = 256  # 1 MiB reads


class VerityError(ValueError):
    """Bad parameters for a hash tree (empty data, bad salt or offset) or a malformed ``VerityInfo``."""


@dataclass(frozen=True, slots=True)
class VerityInfo:
    """Everything needed to activate the device; carried in the measured config."""

    root_hash: str  # hex
    salt: str  # hex
    data_blocks: int
    data_block_size: int = BLOCK_SIZE
    hash_block_size: int = BLOCK_SIZE
    hash_algorithm: str = HASH_ALGORITHM
    hash_offset: int = 0  # bytes, in the hash device (= data device when appended)
    hash_size: int = 0  # bytes of hash blocks starting at hash_offset
    version: int = VERITY_VERSION

    def __post_init__(self) -> None:
        _check_hex("root_hash", self.root_hash, DIGEST_SIZE, DIGEST_SIZE)
        _check_hex("salt", self.salt, 0, MAX_SALT_SIZE)
        if (self.version, self.hash_algorithm, self.data_block_size, self.hash_block_size) != (
                VERITY_VERSION, HASH_ALGORITHM, BLOCK_SIZE, BLOCK_SIZE):
            raise VerityError(f"unsupported verity parameters: version {self.version}, {self.hash_algorithm}, "
                              f"blocks {self.data_block_size}/{self.hash_block_size}")
        for name in ("data_blocks", "hash_offset", "hash_size"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 1 << 62:
                raise VerityError(f"verity {name} out of range: {value!r}")
        if self.data_blocks < 1:
            raise VerityError("verity data_blocks must be at least 1")
        if self.hash_offset % BLOCK_SIZE:
            raise VerityError(f"verity hash_offset {self.hash_offset} is not a multiple of {BLOCK_SIZE}")
        if self.hash_size != hash_tree_size(self.data_blocks):
            raise VerityError(f"verity hash_size {self.hash_size} does not match {self.data_blocks} data blocks")

    @property
    def data_size(self) -> int:
        return self.data_blocks * self.data_block_size

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, raw: object) -> VerityInfo:
        """Strict: exactly the known keys, each of the right type (then ``__post_init__`` checks values)."""
        if not isinstance(raw, dict):
            raise VerityError("verity info must be a mapping")
        fields = cls.__dataclass_fields__
        unknown = sorted(set(raw) - set(fields), key=str)
        if unknown:
            raise VerityError(f"unknown verity info key: {unknown[0]!r}")
        missing = [name for name in ("root_hash", "salt", "data_blocks") if name not in raw]
        if missing:
            raise VerityError(f"verity info lacks {missing[0]!r}")
        for name, value in raw.items():
            expected = str if name in ("root_hash", "salt", "hash_algorithm") else int
            if type(value) is not expected:
                raise VerityError(f"verity info {name!r} must be {expected.__name__}")
        return cls(**raw)


def _check_hex(name: str, value: object, min_bytes: int, max_bytes: int) -> None:
    if not isinstance(value, str) or len(value) % 2 or not min_bytes * 2 <= len(value) <= max_bytes * 2:
        raise VerityError(f"verity {name} must be {min_bytes}..{max_bytes} bytes of hex")
    try:
        bytes.fromhex(value)
    except ValueError as exc:
        raise VerityError(f"verity {name} is not hex") from exc
    if value != value.lower():
        raise VerityError(f"verity {name} must be lower-case hex")


def level_sizes(data_blocks: int) -> list[int]:
    """Hash blocks per level, level 0 (digests of data blocks) first; empty for one data block."""
    if data_blocks < 1:
        raise VerityError("no data blocks to hash")
    levels = 0
    while _HASH_PER_BLOCK_BITS * levels < 64 and (data_blocks - 1) >> (_HASH_PER_BLOCK_BITS * levels):
        levels += 1
    if levels > MAX_LEVELS:
        raise VerityError(f"too many hash levels: {levels}")
    return [-(-data_blocks // (1 << (_HASH_PER_BLOCK_BITS * (i + 1)))) for i in range(levels)]


def hash_tree_size(data_blocks: int) -> int:
    return sum(level_sizes(data_blocks)) * BLOCK_SIZE


def derive_salt(data: Path) -> bytes:
    """The content-derived salt (see the module doc): sha256 over a context string and the data."""
    digest = hashlib.sha256(SALT_CONTEXT)
    with open(data, "rb") as src:
        while chunk := src.read(_CHUNK_BLOCKS * BLOCK_SIZE):
            digest.update(chunk)
    return digest.digest()


def format_verity(data: Path, hash_out: Path | None = None, *, salt: bytes | None = None,
                  hash_offset: int | None = None) -> VerityInfo:
    """Zero-pad ``data`` to whole blocks, compute its hash tree, and write it.

    ``hash_out=None`` appends the tree to ``data`` itself at ``hash_offset`` (default and minimum: the padded
    data size); otherwise the tree goes into ``hash_out`` (created or truncated) at ``hash_offset`` (default 0).
    ``salt=None`` derives it from the content. On failure an appended tree is cut off again (the padding stays).
    """
    size = data.stat().st_size
    if size == 0:
        raise VerityError(f"{data}: empty, nothing to protect")
    data_blocks = -(-size // BLOCK_SIZE)
    data_size = data_blocks * BLOCK_SIZE
    if size != data_size:
        with open(data, "r+b") as fh:
            fh.truncate(data_size)  # zero fill
    if salt is None:
        salt = derive_salt(data)
    if len(salt) > MAX_SALT_SIZE:
        raise VerityError(f"verity salt longer than {MAX_SALT_SIZE} bytes")
    if hash_offset is None:
        hash_offset = data_size if hash_out is None else 0
    if hash_offset < 0 or hash_offset % BLOCK_SIZE:
        raise VerityError(f"hash offset {hash_offset} is not a non-negative multiple of {BLOCK_SIZE}")
    if hash_out is None and hash_offset < data_size:
        raise VerityError(f"hash offset {hash_offset} overlaps the {data_size} bytes of data")
    target = data if hash_out is None else hash_out
    try:
        with open(data, "rb") as src, open(target, "r+b" if hash_out is None else "w+b") as dst:
            root = _write_tree(src, dst, data_blocks, salt, hash_offset)
            dst.truncate(hash_offset + hash_tree_size(data_blocks))
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        if hash_out is None:
            os.truncate(data, data_size)
        raise
    return VerityInfo(root_hash=root.hex(), salt=salt.hex(), data_blocks=data_blocks, hash_offset=hash_offset,
                      hash_size=hash_tree_size(data_blocks))


def _write_tree(src: Any, dst: Any, data_blocks: int, salt: bytes, hash_offset: int) -> bytes:
    sizes = level_sizes(data_blocks)
    # Top level first in the file: level i starts after all levels above it.
    starts = [hash_offset + sum(sizes[i + 1:]) * BLOCK_SIZE for i in range(len(sizes))]
    salted = hashlib.sha256(salt)
    reader, count, reader_offset = src, data_blocks, 0
    for level, start in enumerate(starts):
        written = _hash_blocks(reader, reader_offset, count, salted, dst, start)
        padding = -written % BLOCK_SIZE
        dst.seek(start + written)
        dst.write(b"\0" * padding)
        if (written + padding) // BLOCK_SIZE != sizes[level]:
            raise AssertionError("hash level size mismatch")  # our arithmetic, not input
        dst.flush()
        reader, count, reader_offset = dst, sizes[level], start
    top = _read_exact(reader, reader_offset, BLOCK_SIZE)
    root = salted.copy()
    root.update(top)
    return root.digest()


def _hash_blocks(reader: Any, offset: int, count: int, salted: Any, dst: Any, dst_offset: int) -> int:
    """Write ``sha256(salt || block)`` for ``count`` blocks read at ``offset`` to ``dst_offset``; returns bytes
    written. ``reader`` may be ``dst`` (upper levels read the level below), so every access seeks first."""
    buf = bytearray(_CHUNK_BLOCKS * BLOCK_SIZE)
    view = memoryview(buf)
    written = 0
    done = 0
    while done < count:
        n = min(_CHUNK_BLOCKS, count - done)
        reader.seek(offset + done * BLOCK_SIZE)
        _readinto_exact(reader, view[: n * BLOCK_SIZE])
        out = bytearray()
        for i in range(n):
            h = salted.copy()
            h.update(view[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE])
            out += h.digest()
        dst.seek(dst_offset + written)
        dst.write(out)
        written += len(out)
        done += n
    return written


def _readinto_exact(reader: Any, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = reader.readinto(view[got:])
        if not n:
            raise EOFError("short read while hashing")
        got += n


def _read_exact(reader: Any, offset: int, size: int) -> bytes:
    reader.seek(offset)
    out = bytearray(size)
    _readinto_exact(reader, memoryview(out))
    return bytes(out)


# --- enclave side: activation -------------------------------------------------------------------------------

def veritysetup_open_args(info: VerityInfo, data_device: str, name: str, hash_device: str | None = None,
                          ) -> list[str]:
    """argv for ``veritysetup open`` with every parameter from ``info`` (nothing read from the device).

    Example (one NBD export carrying data and tree)::

        veritysetup open --no-superblock --format=1 --hash=sha256 --data-block-size=4096
            --hash-block-size=4096 --data-blocks=N --hash-offset=OFF --salt=HEX
            /dev/nbd0 rootfs /dev/nbd0 ROOTHASH

    Corruption makes reads fail with EIO (the default); we never pass ``--ignore-corruption`` or
    ``--check-at-most-once`` (the latter would trust re-reads of already checked blocks from the parent).
    """
    _check_name(name)
    return [
        "veritysetup", "open", "--no-superblock", f"--format={info.version}", f"--hash={info.hash_algorithm}",
        f"--data-block-size={info.data_block_size}", f"--hash-block-size={info.hash_block_size}",
        f"--data-blocks={info.data_blocks}", f"--hash-offset={info.hash_offset}",
        f"--salt={info.salt or '-'}",
        data_device, name, hash_device or data_device, info.root_hash,
    ]


def dm_table(info: VerityInfo, data_device: str, hash_device: str | None = None) -> str:
    """The device-mapper table line for dmsetup-free activation (DM_TABLE_LOAD of target type ``verity``).

    ``<start> <sectors> verity <version> <data_dev> <hash_dev> <data_block_size> <hash_block_size>
    <num_data_blocks> <hash_start_block> <algorithm> <root_hash> <salt>``, where ``hash_start_block`` counts
    hash blocks from the start of ``hash_dev`` and ``-`` stands for an empty salt. Devices may be paths or
    ``major:minor``. Same as ``dmsetup create NAME --readonly --table "<line>"``.
    """
    for dev in (data_device, hash_device or data_device):
        if not dev or any(c.isspace() for c in dev):
            raise VerityError(f"bad device name for a dm table: {dev!r}")
    sectors = info.data_size // 512
    return (f"0 {sectors} verity {info.version} {data_device} {hash_device or data_device} "
            f"{info.data_block_size} {info.hash_block_size} {info.data_blocks} "
            f"{info.hash_offset // info.hash_block_size} {info.hash_algorithm} {info.root_hash} {info.salt or '-'}")


def _check_name(name: str) -> None:
    if not name or len(name) > 127 or "/" in name or any(c.isspace() for c in name) or name in (".", ".."):
        raise VerityError(f"bad device-mapper name: {name!r}")
