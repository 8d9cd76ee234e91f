"""salmiac.enclave.nbd_client: ioctl numbers against the kernel's own header, and the checks made before
any device is touched (the ioctls themselves run in the QEMU guest)."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest

from salmiac.enclave import nbd_client
from salmiac.enclave.nbd_client import KernelNbd, NbdClientError, NbdExport

HEADER = Path("/usr/include/linux/nbd.h")


@pytest.mark.skipif(not HEADER.exists(), reason="linux-libc-dev headers not installed")
def test_ioctl_numbers_match_linux_header() -> None:
    found = {name: (int(kind, 0) << 8) | int(nr, 0) for name, kind, nr in re.findall(
        r"#define\s+(NBD_\w+)\s+_IO\(\s*(0x[0-9a-fA-F]+)\s*,\s*(\d+)\s*\)", HEADER.read_text())}
    ours = {name: getattr(nbd_client, name) for name in found if hasattr(nbd_client, name)}
    assert set(ours) >= {"NBD_SET_SOCK", "NBD_SET_BLKSIZE", "NBD_SET_SIZE", "NBD_DO_IT", "NBD_CLEAR_SOCK",
                         "NBD_SET_SIZE_BLOCKS", "NBD_DISCONNECT", "NBD_SET_TIMEOUT", "NBD_SET_FLAGS"}
    assert ours == {name: found[name] for name in ours}


@pytest.mark.skipif(not Path("/usr/include/linux/fs.h").exists(), reason="linux-libc-dev headers not installed")
def test_blkgetsize64_matches_linux_header() -> None:
    found = re.search(r"#define\s+BLKGETSIZE64\s+_IOR\(\s*(0x[0-9a-fA-F]+)\s*,\s*(\d+)\s*,\s*size_t\s*\)",
                      Path("/usr/include/linux/fs.h").read_text())
    assert found
    read, size_t = 2, 8  # asm-generic/ioctl.h on x86-64
    expected = read << 30 | size_t << 16 | int(found.group(1), 0) << 8 | int(found.group(2))
    ours = nbd_client.BLKGETSIZE64
    assert ours == expected


@pytest.mark.parametrize(("export", "match"), [
    (NbdExport("x", 4096 * 3 + 1, 1, 1, 4096, 1 << 25), "not a multiple"),
    (NbdExport("x", 65536, 1, 65536, 65536, 1 << 25), "needs blocks of 65536"),
    (NbdExport("x", 4096 << 31, 1, 1, 4096, 1 << 25), "too large"),
])
def test_attach_refuses_exports_the_kernel_cannot_represent(export: NbdExport, match: str,
                                                            tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(NbdClientError, match=match):
        KernelNbd.attach(str(tmp_path / "never-opened"), a, export)


def test_attach_names_a_missing_device(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(NbdClientError, match=r"cannot open .*nbd9"):
        KernelNbd.attach(str(tmp_path / "nbd9"), a, NbdExport("x", 1 << 20, 1, 1, 4096, 1 << 25))
