"""Issue 4, read-only half: the app's rootfs as a squashfs + dm-verity image served by the parent over NBD.

The converter puts the files in ``rootfs.img`` beside the EIF and the root hash in the measured app config; the
enclave attaches the NBD export, opens dm-verity with the measured parameters and runs the app on it. A byte
changed in the image on the host makes the app's read of that file fail with EIO, while other files still read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from fixtures.images import OciImage, copy_image
from helpers.cli import convert, salmiac

pytestmark = pytest.mark.e2e

# Incompressible, so squashfs stores it as is and the test can find its bytes in the image.
PAYLOAD = random.Random(4).randbytes(256 * 1024)


def _add_layer(image: OciImage, tmp: Path) -> None:
    layer = tmp / "data.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("data/random.bin", PAYLOAD), ("data/note.txt", b"untouched\n")):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    subprocess.run(["umoci", "raw", "add-layer", "--no-history", "--image", image.ref.removeprefix("oci:"), str(layer)],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def verity_image(busybox_image: OciImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("verity-rootfs")
    image = copy_image(busybox_image, tmp / "in")
    _add_layer(image, tmp)
    out = f"oci:{tmp / 'out'}:v"
    response = convert(tmp, image.ref, out, converter_options={"rootfs": "verity"})
    return out, response


SCRIPT = "cat /data/note.txt; md5sum /data/random.bin; echo md5-status=$?; mount | grep ' / '"


def test_app_runs_on_the_verified_image(verity_image: tuple[str, dict[str, Any]]) -> None:
    image, _ = verity_image
    proc = salmiac("run", "--emulate", "--network", "none", image, "sh", "-c", SCRIPT)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "untouched" in out
    assert f"{hashlib.md5(PAYLOAD).hexdigest()}  /data/random.bin" in out
    assert "md5-status=0" in out
    assert "overlay on / type overlay" in out and "lowerdir=/mnt/lower" in out


def test_pcrs_cover_the_rootfs_image(verity_image: tuple[str, dict[str, Any]], busybox_image: OciImage,
                                     tmp_path: Path) -> None:
    """The rootfs is outside the EIF, but its root hash is in the measured initramfs: other content, other PCRs."""
    _, response = verity_image
    image = copy_image(busybox_image, tmp_path / "in")
    _add_layer(image, tmp_path)
    again = convert(tmp_path, image.ref, f"oci:{tmp_path / 'again'}:v", converter_options={"rootfs": "verity"})
    assert again["measurements"] == response["measurements"], "same input, same PCRs"
    plain = convert(tmp_path, image.ref, f"oci:{tmp_path / 'plain'}:v", converter_options={"rootfs": "initramfs"})
    assert plain["measurements"]["PCR2"] != response["measurements"]["PCR2"]
    assert plain["memory_needed_mib"] > response["memory_needed_mib"], "files outside the initramfs need less RAM"


def test_tampered_block_is_an_io_error(verity_image: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    from salmiac.parent.bundle import extract_bundle

    image, _ = verity_image
    cached = extract_bundle(image, Path(os.environ["SALMIAC_CACHE_DIR"]))
    bundle = tmp_path / "bundle"
    shutil.copytree(cached, bundle)
    rootfs = bundle / json.loads((bundle / "run.json").read_text())["rootfs_image"]
    rootfs.chmod(0o644)
    data = rootfs.read_bytes()
    at = data.find(PAYLOAD[100_000:100_064])
    assert at > 0, "the payload is stored uncompressed in the squashfs"
    with open(rootfs, "r+b") as f:  # one byte, in the middle of the file's data
        f.seek(at + 10)
        f.write(bytes([data[at + 10] ^ 0x01]))
    proc = salmiac("run", "--emulate", "--network", "none", "--bundle", str(bundle), "sh", "-c", SCRIPT)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert "untouched" in out, "blocks that were not changed still read"
    assert "Input/output error" in out + err, out + err
    assert "md5-status=0" not in out and "md5-status=1" in out
    assert hashlib.md5(PAYLOAD).hexdigest() not in out, "never wrong data"
