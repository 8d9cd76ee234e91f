"""The enclave's check of a LUKS2 header the parent serves, against headers made by the real cryptsetup.

A header whose keyslot is not encrypted (cipher_null) opens with any key and would give the enclave a volume key
the parent chose; extra keyslots or another data cipher are refused as well. Our own luksFormat passes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from salmiac.enclave.storage import LUKS_FORMAT_OPTIONS, StorageError, check_luks_header

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


def test_our_own_format_passes(tmp_path: Path) -> None:
    check_luks_header(_format(tmp_path / "ours.img", *LUKS_FORMAT_OPTIONS))


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
