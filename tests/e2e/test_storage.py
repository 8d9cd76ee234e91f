"""Issue 4, read-write half: the encrypted RW disk (NBD → LUKS2 → ext4) behind the image's VOLUMEs and, with
overlay persistence, behind the whole rootfs. The disk file lives in --storage-dir on the host.

The image: busybox + Debian's sqlite3 CLI, ``VOLUME /data`` (with a file the image ships there).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.images import OciImage
from helpers.cli import SALMIAC, salmiac

pytestmark = pytest.mark.e2e

MARKER = b"marker-PLAINTEXT-7c1e"


def _convert(tmp: Path, image: OciImage, name: str, *flags: str, **options: Any) -> str:
    out = f"oci:{tmp / name}:s"
    req = tmp / f"{name}.json"
    req.write_text(json.dumps({
        "input_image": {"name": image.ref}, "output_image": {"name": out},
        "converter_options": options, "nitro_enclaves_options": {"cpu_count": 1, "mem_size": "512M"},
    }))
    proc = salmiac("convert", "--quiet", *flags, str(req))
    assert proc.returncode == 0, proc.stderr.decode()
    return out


@pytest.fixture(scope="module")
def dev_key_image(sqlite_image: OciImage, tmp_path_factory: pytest.TempPathFactory) -> str:
    return _convert(tmp_path_factory.mktemp("storage"), sqlite_image, "devkey", "--insecure-dev-key",
                    rw_storage_size="256M")


def run(image: str, storage: Path, script: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return salmiac("run", "--emulate", "--network", "none", "--storage-dir", str(storage), *extra, image,
                   "sh", "-c", script)


def test_dev_key_image_needs_the_flag_to_run(dev_key_image: str, tmp_path: Path) -> None:
    proc = run(dev_key_image, tmp_path, "true")
    assert proc.returncode == 2
    assert b"--insecure-dev-key" in proc.stderr
    assert not (tmp_path / "disk.img").exists(), "nothing written before refusing"


def _contains(path: Path, needle: bytes) -> bool:
    with path.open("rb") as f:
        tail = b""
        while chunk := f.read(1 << 20):
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle):]
    return False


def test_volume_and_sqlite_persist_encrypted(dev_key_image: str, tmp_path: Path) -> None:
    first = run(dev_key_image, tmp_path, f"cat /data/seed.txt; echo {MARKER.decode()} > /data/file.txt; "
                "sqlite3 /data/db.sqlite 'create table t(x); insert into t values (42), (43);' && echo sql-ok",
                "--insecure-dev-key")
    assert first.returncode == 0, first.stderr.decode()
    assert b"from the image" in first.stdout, "a new volume starts with the image's files"
    assert b"sql-ok" in first.stdout
    assert b"INSECURE" in first.stderr, "the dev key is announced loudly"
    disk = tmp_path / "disk.img"
    assert disk.stat().st_size == 256 << 20, "converter_options.rw_storage_size sizes the new disk"
    assert disk.stat().st_blocks * 512 < disk.stat().st_size, "and it is sparse"
    dump = subprocess.run(["cryptsetup", "luksDump", str(disk)], capture_output=True, text=True, check=True).stdout
    assert dump.startswith("LUKS header information") and re.search(r"^Version:\s+2$", dump, re.M), dump
    assert not _contains(disk, MARKER), "the host never sees the plaintext"
    assert not _contains(disk, b"SQLite format 3"), "nor the database"

    second = run(dev_key_image, tmp_path, "cat /data/file.txt; sqlite3 /data/db.sqlite 'select sum(x) from t'",
                 "--insecure-dev-key")
    assert second.returncode == 0, second.stderr.decode()
    assert MARKER in second.stdout
    assert b"85" in second.stdout.split()


def test_overlay_persistence_keeps_etc(sqlite_image: OciImage, tmp_path: Path) -> None:
    image = _convert(tmp_path, sqlite_image, "overlay", "--insecure-dev-key",
                     enable_overlay_filesystem_persistence=True)
    storage = tmp_path / "store"
    first = run(image, storage, "echo kept-in-etc > /etc/salmiac-test && echo wrote", "--insecure-dev-key")
    assert first.returncode == 0 and b"wrote" in first.stdout, first.stderr.decode()
    second = run(image, storage, "cat /etc/salmiac-test", "--insecure-dev-key")
    assert second.returncode == 0, second.stderr.decode()
    assert b"kept-in-etc" in second.stdout


def test_ephemeral_key_keeps_nothing(sqlite_image: OciImage, tmp_path: Path) -> None:
    image = _convert(tmp_path, sqlite_image, "ephemeral")
    storage = tmp_path / "store"
    first = run(image, storage, "echo gone > /data/x && cat /data/x")
    assert first.returncode == 0 and b"gone" in first.stdout, first.stderr.decode()
    second = run(image, storage, "ls /data")
    assert second.returncode == 0, second.stderr.decode()
    assert second.stdout.split() == [b"seed.txt"], "a fresh key each boot: the old disk is unreadable, refilled"


def test_fsynced_records_survive_sigkill_of_the_parent(dev_key_image: str, tmp_path: Path) -> None:
    loop = ("i=0; while true; do i=$((i+1)); echo record-$i >> /data/log.txt && sync /data/log.txt "
            "&& echo fsynced $i; done")
    console = tmp_path / "console.log"
    proc = subprocess.Popen([*SALMIAC, "run", "--emulate", "--network", "none", "--storage-dir", str(tmp_path),
                             "--insecure-dev-key", "--console-log", str(console), dev_key_image, "sh", "-c", loop],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    last = 0
    deadline = time.monotonic() + 300
    os.set_blocking(proc.stdout.fileno(), True)
    while last < 30 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(b"fsynced "):
            last = int(line.split()[1])
    assert last >= 30, "the app got going"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # QEMU dies with its parent (PR_SET_PDEATHSIG): nothing keeps the disk open.
    for _ in range(100):
        if subprocess.run(["pgrep", "-f", str(console)], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("QEMU outlived the killed parent")
    after = run(dev_key_image, tmp_path, "cat /data/log.txt", "--insecure-dev-key")
    assert after.returncode == 0, after.stderr.decode()
    records = set(after.stdout.decode().split())
    missing = [i for i in range(1, last + 1) if f"record-{i}" not in records]
    assert not missing, f"fsync'd records lost: {missing[:10]}"


def test_a_disk_that_is_neither_blank_nor_ours_is_never_formatted(dev_key_image: str, tmp_path: Path) -> None:
    """Formatting is for never-written disks only: a disk the enclave cannot read as LUKS2 (another tool's, a
    damaged one, a parent's trick) stays as it is, and the run fails saying why."""
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(256 << 20)
        f.seek(4096)
        f.write(b"someone else's data" * 100)
    before = disk.read_bytes()
    proc = run(dev_key_image, tmp_path, "echo app-ran", "--insecure-dev-key")
    assert proc.returncode != 0
    assert b"app-ran" not in proc.stdout
    assert b"neither blank nor LUKS2" in proc.stderr, proc.stderr.decode()
    assert disk.read_bytes() == before, "not one byte written"
