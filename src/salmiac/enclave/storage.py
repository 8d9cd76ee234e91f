"""Enclave storage: the app's root filesystem from a parent-served NBD export, checked block by block by dm-verity.

    parent: rootfs.img (squashfs + appended hash tree) ──NBD over the rootfs port──► /dev/nbd0 (kernel client)
    enclave: /dev/nbd0 ─► dm-verity "salmiac-rootfs" (root hash from the measured app config) ─► squashfs, ro,
             at /mnt/lower ─► overlayfs with a tmpfs upper at /mnt/root: the app's root, writable like a
             container's, every byte read from the parent verified.

Nothing the parent sends steers activation: the verity parameters and root hash come from the measured
``AppConfig`` (no verity superblock on the device); the NBD export size is only checked to be large enough. A
tampered block makes the read fail with EIO (dm-verity's default; never ``--ignore-corruption``). The kernel's
NBD client needs a socket: on Nitro the vsock socket itself; in emulation the channel is a virtio-serial port,
so a socketpair bridged to it by two threads stands in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable

from salmiac.enclave import channel, kmod, nbd_client, sysutil
from salmiac.errors import RuntimeFailure
from salmiac.protocol import nbd
from salmiac.protocol.appconfig import RootfsSpec
from salmiac.protocol.channels import NBD_ROOTFS_PORT
from salmiac.rootfs.verity import VerityError, VerityInfo, veritysetup_open_args

ROOTFS_EXPORT = "rootfs"
ROOTFS_NBD = "/dev/nbd0"
VERITY_NAME = "salmiac-rootfs"
LOWER_DIR = "/mnt/lower"
RW_DIR = "/mnt/rw"
ROOT_DIR = "/mnt/root"
MODULES = ("nbd", "dm_mod", "dm_verity", "squashfs", "overlay")
VERITYSETUP = "/usr/sbin/veritysetup"
BRIDGE_CHUNK = 256 * 1024
NBD_DEVICE_WAIT_S = 10.0


class StorageError(RuntimeFailure):
    """The enclave could not attach, verify or mount its storage."""


def _copy(read: int, write_all: Callable[[bytes], None], name: str) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(read, BRIDGE_CHUNK):
                write_all(data)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


def nbd_socket(ch: channel.Channel) -> socket.socket:
    """A socket carrying the channel's bytes: the vsock itself, or a socketpair bridged to a serial port."""
    stream = ch.stream()
    if isinstance(stream, socket.socket):
        return stream
    kernel_end, bridge_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    _copy(ch.fileno(), bridge_end.sendall, "nbd-bridge-in")
    _copy(bridge_end.fileno(), ch.write_all, "nbd-bridge-out")
    return kernel_end


def _wait_for(path: str) -> None:
    for _ in range(int(NBD_DEVICE_WAIT_S / 0.02)):
        if os.path.exists(path):
            return
        time.sleep(0.02)
    raise StorageError(f"{path} did not appear")


def _run(argv: list[str], what: str) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin", "DM_DISABLE_UDEV": "1", "LC_ALL": "C"}  # no udev in the enclave
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StorageError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise StorageError(f"{what}: {detail}")


def attach_verity_rootfs(spec: RootfsSpec, transport: str) -> str:
    """NBD → dm-verity → squashfs → overlay; returns the app's root directory."""
    try:
        info = VerityInfo.from_dict(spec.verity)
    except VerityError as exc:
        raise StorageError(f"rootfs verity parameters: {exc}") from exc
    kmod.load_modules(list(MODULES))
    ch = channel.connect(NBD_ROOTFS_PORT, transport)
    sock = nbd_socket(ch)
    export = nbd_client.handshake(sock, ROOTFS_EXPORT)
    needed = info.hash_offset + info.hash_size
    if export.size < needed or export.size < info.data_size:
        raise StorageError(f"the parent's rootfs export has {export.size} bytes, the measured image {needed}")
    # Read-only for the kernel whatever the parent offered: nothing of ours ever writes to the rootfs.
    export = dataclasses.replace(export, flags=export.flags | nbd.FLAG_HAS_FLAGS | nbd.FLAG_READ_ONLY)
    _wait_for(ROOTFS_NBD)
    nbd_client.KernelNbd.attach(ROOTFS_NBD, sock, export)
    argv = veritysetup_open_args(info, ROOTFS_NBD, VERITY_NAME)
    _run([VERITYSETUP, *argv[1:]], "veritysetup open (rootfs)")
    for d in (LOWER_DIR, RW_DIR, ROOT_DIR):
        os.makedirs(d, exist_ok=True)
    try:
        sysutil.mount(f"/dev/mapper/{VERITY_NAME}", LOWER_DIR, spec.fs, sysutil.MS_RDONLY | sysutil.MS_NODEV)
        sysutil.mount("tmpfs", RW_DIR, "tmpfs", sysutil.MS_NODEV, "mode=0755")
        for d in ("upper", "work"):
            os.makedirs(os.path.join(RW_DIR, d), exist_ok=True)
        sysutil.mount("overlay", ROOT_DIR, "overlay", 0,
                      f"lowerdir={LOWER_DIR},upperdir={RW_DIR}/upper,workdir={RW_DIR}/work")
    except OSError as exc:
        raise StorageError(f"mount the verified rootfs: {exc}") from exc
    return ROOT_DIR
