"""The enclave's check of a LUKS2 header the parent serves, against headers made by the real cryptsetup.

A header whose keyslot is not encrypted (cipher_null) opens with any key and would give the enclave a volume key
the parent chose; extra keyslots or another data cipher are refused as well. Our own luksFormat passes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from salmiac.enclave.storage import BLANK_PROBE, LUKS_FORMAT_OPTIONS, StorageError, check_luks_header, disk_is_blank

pytestmark = pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="needs cryptsetup")


def _format(path: Path, *options: str) -> bytes:
    path.write_bytes(b"")
    subprocess.run(["truncate", "-s", "32M", str(path)], check=True)
    key = path.with_suffix(".key")
    key.write_bytes(b"k" * 32)
    subprocess.run(["cryptsetup", "luksFormat", *options, "--key-file", str(key), str(path)], check=True,
                   capture_output=True)
    return subprocess.run(["cryptsetup", "luksDump", "--dump-json-metadata", str(path)], check=True,
                          capture_output=True).stdout


def test_our_own_format_passes_and_names_the_data_offset(tmp_path: Path) -> None:
    disk = tmp_path / "ours.img"
    offset = check_luks_header(_format(disk, *LUKS_FORMAT_OPTIONS))
    dump = subprocess.run(["cryptsetup", "luksDump", str(disk)], check=True, capture_output=True, text=True).stdout
    found = re.search(r"^\s*offset:\s+(\d+) \[bytes\]", dump.split("Data segments:")[1], re.M)
    assert found and offset == int(found.group(1)) == 16 << 20, dump


def test_only_a_never_written_disk_counts_as_blank(tmp_path: Path) -> None:
    """A new sparse disk is formatted; a formatted one, or one holding anything else, never is."""
    new = tmp_path / "new.img"
    subprocess.run(["truncate", "-s", "32M", str(new)], check=True)
    assert disk_is_blank(str(new))
    formatted = tmp_path / "ours.img"
    _format(formatted, *LUKS_FORMAT_OPTIONS)
    assert not disk_is_blank(str(formatted))
    garbled = tmp_path / "garbled.img"
    subprocess.run(["truncate", "-s", "32M", str(garbled)], check=True)
    with garbled.open("r+b") as f:
        f.seek(BLANK_PROBE - 1)
        f.write(b"\x01")
    assert not disk_is_blank(str(garbled)), "one byte anywhere in the header area is not blank"
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(bytes(4096))
    with pytest.raises(StorageError, match="short read"):
        disk_is_blank(str(tiny))


def test_other_ciphers_and_extra_slots_are_refused(tmp_path: Path) -> None:
    ours = json.loads(_format(tmp_path / "ours.img", *LUKS_FORMAT_OPTIONS))
    null_slot = json.loads(json.dumps(ours))
    null_slot["keyslots"]["0"]["area"]["encryption"] = "cipher_null-ecb"
    other_segment = json.loads(json.dumps(ours))
    other_segment["segments"]["0"]["encryption"] = "cipher_null-ecb"
    two_slots = json.loads(json.dumps(ours))
    two_slots["keyslots"]["1"] = two_slots["keyslots"]["0"]
    for doc, named in ((null_slot, "keyslot"), (other_segment, "segment"), (two_slots, "other keyslots")):
        with pytest.raises(StorageError, match=named):
            check_luks_header(json.dumps(doc).encode())
    for raw in (b"", b"[]", b'{"keyslots": 1, "segments": {}, "digests": {}}', b'{"keyslots": {}}'):
        with pytest.raises(StorageError):
            check_luks_header(raw)


def test_a_real_header_with_another_cipher_is_refused(tmp_path: Path) -> None:
    metadata = _format(tmp_path / "cbc.img", "--type", "luks2", "--batch-mode", "--cipher", "aes-cbc-essiv:sha256",
                       "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
    with pytest.raises(StorageError):
        check_luks_header(metadata)
