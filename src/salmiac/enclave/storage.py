"""Enclave storage: the app's root from a parent-served image checked by dm-verity, and an encrypted RW disk.

    parent: rootfs.img (squashfs + appended hash tree) ──NBD, rootfs port──► /dev/nbd0 (kernel client)
    enclave: /dev/nbd0 ─► dm-verity "salmiac-rootfs" (root hash from the measured app config) ─► squashfs, ro,
             at /mnt/lower ─► overlayfs at /mnt/root: the app's root, writable like a container's, every byte
             read from the parent verified. The upper dir is a tmpfs, or the disk with overlay persistence.
    parent: disk.img in --storage-dir (sparse) ──NBD, disk port──► /dev/nbd1 ─► LUKS2 "salmiac-disk" (key from
             the key provider, never leaves the enclave) ─► ext4 at /mnt/disk: volumes/ (the image's VOLUMEs,
             bind-mounted into the app's root) and overlay/ (the persistent upper dir).

Nothing the parent sends steers activation: the verity parameters and root hash come from the measured
``AppConfig`` (no verity superblock on the device); the NBD export size is only checked to be large enough. A
tampered block makes the read fail with EIO (dm-verity's default; never ``--ignore-corruption``). The kernel's
NBD client needs a socket: on Nitro the vsock socket itself; in emulation the channel is a virtio-serial port,
so a socketpair bridged to it by two threads stands in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable

from salmiac.enclave import channel, kmod, nbd_client, sysutil
from salmiac.enclave.appspec import resolve_in_root
from salmiac.errors import RuntimeFailure
from salmiac.protocol import nbd
from salmiac.protocol.appconfig import KEY_EPHEMERAL, KEY_INSECURE_DEV, ROOTFS_VERITY, AppConfig, RootfsSpec
from salmiac.protocol.channels import NBD_DISK_PORT, NBD_ROOTFS_PORT
from salmiac.rootfs.verity import VerityError, VerityInfo, veritysetup_open_args

ROOTFS_EXPORT = "rootfs"
ROOTFS_NBD = "/dev/nbd0"
VERITY_NAME = "salmiac-rootfs"
LOWER_DIR = "/mnt/lower"
RW_DIR = "/mnt/rw"
ROOT_DIR = "/mnt/root"
MODULES = ("nbd", "dm_mod", "dm_verity", "squashfs", "overlay")
DISK_MODULES = ("nbd", "dm_mod", "dm_crypt", "xts", "overlay")
DISK_EXPORT = "disk"
DISK_NBD = "/dev/nbd1"
DISK_NAME = "salmiac-disk"
DISK_DIR = "/mnt/disk"
VERITYSETUP = "/usr/sbin/veritysetup"
CRYPTSETUP = "/usr/sbin/cryptsetup"
MKFS_EXT4 = "/usr/sbin/mkfs.ext4"
# The key is 32 random bytes (or the public dev key), not a passphrase: a slow PBKDF would add nothing but boot
# time (argon2id's benchmark alone takes ~15 s under TCG). pbkdf2 at cryptsetup's minimum iteration count.
LUKS_FORMAT_OPTIONS = ("--type", "luks2", "--batch-mode", "--cipher", "aes-xts-plain64", "--key-size", "512",
                       "--hash", "sha256", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
DEV_KEY = hashlib.sha256(b"salmiac insecure development key v1").digest()
EXT4_MAGIC_OFFSET = 1080
HEADER_COPY = "/run/salmiac-disk.luks-header"  # in the initramfs: enclave RAM
BRIDGE_CHUNK = 256 * 1024
NBD_DEVICE_WAIT_S = 10.0
# How much of a disk must be zero for it to count as never written: both LUKS2 header copies (16 KiB each with
# cryptsetup's defaults) at the start, or the start of the data area (where mkfs writes the ext4 superblock).
BLANK_PROBE = 64 * 1024


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


STEP_TIMES: dict[str, float] = {}
"""Seconds per storage command of this boot (logged by the init: TCG makes some of them slow)."""


def _run(argv: list[str], what: str, stdin: bytes | None = None) -> bytes:
    """Run a storage tool, timed into STEP_TIMES; its stdout (a failure raises StorageError)."""
    started = time.monotonic()
    proc = sysutil.run_tool(argv, what, StorageError, stdin=stdin)
    STEP_TIMES[what.split(" (")[0]] = round(time.monotonic() - started, 2)
    return proc.stdout


def _attach_nbd(port: int, export_name: str, device: str, transport: str, *, read_only: bool,
                min_size: int = 0) -> nbd_client.KernelNbd:
    """Channel → NBD handshake → ``device`` served by the kernel's NBD client. ``read_only``: the kernel device
    is read-only whatever the parent offered; otherwise a read-only offer is refused. An export smaller than
    ``min_size`` is refused before the kernel sees it."""
    sock = nbd_socket(channel.connect(port, transport))
    export = nbd_client.handshake(sock, export_name)
    if export.size < min_size:
        raise StorageError(f"the parent's {export_name} export has {export.size} bytes, {min_size} are needed")
    if read_only:
        export = dataclasses.replace(export, flags=export.flags | nbd.FLAG_HAS_FLAGS | nbd.FLAG_READ_ONLY)
    elif export.read_only:
        raise StorageError(f"the parent offered the {export_name} export read-only")
    _wait_for(device)
    return nbd_client.KernelNbd.attach(device, sock, export)


def attach_verity_rootfs(spec: RootfsSpec, transport: str) -> str:
    """NBD → dm-verity → squashfs mounted read-only; returns where (the overlay's lower dir)."""
    try:
        info = VerityInfo.from_dict(spec.verity)
    except VerityError as exc:
        raise StorageError(f"rootfs verity parameters: {exc}") from exc
    kmod.load_modules(list(MODULES))
    # Read-only for the kernel whatever the parent offered: nothing of ours ever writes to the rootfs.
    _attach_nbd(NBD_ROOTFS_PORT, ROOTFS_EXPORT, ROOTFS_NBD, transport, read_only=True,
                min_size=max(info.hash_offset + info.hash_size, info.data_size))
    argv = veritysetup_open_args(info, ROOTFS_NBD, VERITY_NAME)
    _run([VERITYSETUP, *argv[1:]], "veritysetup open (rootfs)")
    os.makedirs(LOWER_DIR, exist_ok=True)
    try:
        sysutil.mount(f"/dev/mapper/{VERITY_NAME}", LOWER_DIR, spec.fs, sysutil.MS_RDONLY | sysutil.MS_NODEV)
    except OSError as exc:
        raise StorageError(f"mount the verified rootfs: {exc}") from exc
    return LOWER_DIR


# --- the RW disk ---------------------------------------------------------------------------------------------


LUKS_CIPHER = "aes-xts-plain64"


def check_luks_header(metadata: bytes) -> int:
    """Refuse a LUKS2 header we did not make, before giving it the key; the data segment's offset in bytes.

    The parent can replace the header. A keyslot whose area is not encrypted (``cipher_null``) opens with *any*
    key and would hand us a volume key the parent chose, so our writes would be readable by it; a segment that is
    not our cipher, or an extra keyslot or segment, has no business on this disk either. Checked from
    ``cryptsetup luksDump --dump-json-metadata``; every keyslot, segment and digest must be as luksFormat with
    ``LUKS_FORMAT_OPTIONS`` writes them.
    """
    try:
        doc = json.loads(metadata)
        keyslots, segments, digests = doc["keyslots"], doc["segments"], doc["digests"]
        if not (isinstance(keyslots, dict) and isinstance(segments, dict) and isinstance(digests, dict)):
            raise TypeError("not maps")
        if len(keyslots) != 1 or len(segments) != 1 or len(digests) != 1:
            raise StorageError("the RW disk's LUKS header has other keyslots or segments than ours: refusing it")
        for slot in keyslots.values():
            if slot.get("type") != "luks2" or slot["area"].get("encryption") != LUKS_CIPHER:
                raise StorageError(f"the RW disk's keyslot is encrypted with {slot['area'].get('encryption')!r}, "
                                   f"not {LUKS_CIPHER}: refusing it")
        (seg,) = segments.values()
        if seg.get("type") != "crypt" or seg.get("encryption") != LUKS_CIPHER:
            raise StorageError(f"the RW disk's data segment uses {seg.get('encryption')!r}, not {LUKS_CIPHER}: "
                               "refusing it")
        offset = int(seg["offset"])  # a decimal string in LUKS2's JSON
        if offset < 0:
            raise ValueError(f"data segment offset {offset}")
        return offset
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"the RW disk's LUKS header is malformed: {exc}") from exc


def disk_key(provider: str) -> bytes:
    """The key provider interface. Attestation-based providers (a KMS releasing the key against the enclave's
    PCRs) come with the attestation issue; until then the only persistent provider is the public dev key."""
    if provider == KEY_EPHEMERAL:
        return os.urandom(32)
    if provider == KEY_INSECURE_DEV:
        return DEV_KEY
    raise StorageError(f"unknown key provider {provider!r}")


def _read_at(device: str, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise StorageError(f"{device}: short read at {offset} ({len(data)} of {length} bytes)")
    return data


def _is_zero(device: str, offset: int, length: int) -> bool:
    return not any(_read_at(device, offset, length))


def disk_is_blank(device: str) -> bool:
    """True for a disk never written (the parent makes new ones sparse, all zeros): the only kind formatted.

    A disk with our LUKS2 header is opened; anything else is refused rather than formatted over, so a failed or
    garbled read can never turn into a wiped disk."""
    return _is_zero(device, 0, BLANK_PROBE)


def _has_ext4(device: str) -> bool:
    return _read_at(device, EXT4_MAGIC_OFFSET, 2) == b"\x53\xef"


def _volume_dir(path: str) -> str:
    """Where the volume for the app's ``path`` lives on the disk: one flat, reversible name per path."""
    return os.path.join(DISK_DIR, "volumes", path.replace("%", "%25").replace("/", "%2F"))


@dataclasses.dataclass
class Storage:
    """What ``prepare_root`` set up, undone in reverse by ``close``."""

    root: str
    log: Callable[[str, str], None]
    mounts: list[str] = dataclasses.field(default_factory=list)
    mapped: list[str] = dataclasses.field(default_factory=list)
    devices: list[nbd_client.KernelNbd] = dataclasses.field(default_factory=list)

    def close(self) -> None:
        """Flush, unmount, close LUKS, disconnect NBD. Best effort: each failure is logged, the rest still runs."""
        started = time.monotonic()
        os.sync()
        synced = time.monotonic()
        for target in reversed(self.mounts):
            try:
                sysutil.umount(target)
            except OSError as exc:
                try:
                    sysutil.umount(target, sysutil.MNT_DETACH)
                except OSError:
                    self.log("warning", f"storage: umount {target}: {exc}")
        self.mounts.clear()
        unmounted = time.monotonic()
        for name in reversed(self.mapped):
            try:
                _run([CRYPTSETUP, "close", name], f"cryptsetup close {name}")
            except StorageError as exc:
                self.log("warning", f"storage: {exc}")
        self.mapped.clear()
        for dev in reversed(self.devices):
            try:
                dev.disconnect()
            except nbd_client.NbdClientError as exc:
                self.log("warning", f"storage: {exc}")
        if self.devices:
            self.log("info", f"storage closed: sync {synced - started:.2f}s, unmount {unmounted - synced:.2f}s, "
                             f"total {time.monotonic() - started:.2f}s")
        self.devices.clear()


def attach_disk(app: AppConfig, transport: str, storage: Storage) -> None:
    """NBD → LUKS2 (formatted on first use, or every boot with the ephemeral key) → ext4 at DISK_DIR."""
    kmod.load_modules(list(DISK_MODULES))
    with contextlib.suppress(OSError, RuntimeFailure):
        kmod.load_modules(["aesni_intel"])  # faster AES where the CPU has it; aes-generic otherwise
    storage.devices.append(_attach_nbd(NBD_DISK_PORT, DISK_EXPORT, DISK_NBD, transport, read_only=False))
    key = disk_key(app.key_provider)
    if app.key_provider == KEY_INSECURE_DEV:
        storage.log("warning", "INSECURE: the persistent disk is keyed with the public development key")
    fresh = app.key_provider == KEY_EPHEMERAL or disk_is_blank(DISK_NBD)
    if fresh:
        _run([CRYPTSETUP, "luksFormat", *LUKS_FORMAT_OPTIONS, "--key-file", "-", DISK_NBD], "cryptsetup luksFormat",
             stdin=key)
    # The header is read once into enclave memory, checked there, and that copy is what opens the disk: the parent
    # serves every read of the device and could show the check one header and cryptsetup another.
    header = HEADER_COPY
    with contextlib.suppress(FileNotFoundError):
        os.unlink(header)
    _run([CRYPTSETUP, "luksHeaderBackup", "--header-backup-file", header, DISK_NBD],
         "cryptsetup luksHeaderBackup (the RW disk is neither blank nor LUKS2: not formatting over it)")
    try:
        # Also after our own luksFormat: the parent may have swapped the header since.
        data_offset = check_luks_header(_run([CRYPTSETUP, "luksDump", "--dump-json-metadata", header],
                                             "cryptsetup luksDump"))
        _run([CRYPTSETUP, "open", "--type", "luks2", "--header", header, "--key-file", "-", DISK_NBD, DISK_NAME],
             "cryptsetup open (wrong key, or not this image's disk?)", stdin=key)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(header)
    storage.mapped.append(DISK_NAME)
    mapper = f"/dev/mapper/{DISK_NAME}"
    if not _has_ext4(mapper):
        # Only a data area never written since luksFormat gets a new filesystem (a boot that stopped between
        # luksFormat and mkfs leaves one); anything else may be the app's data behind a damaged superblock.
        if not fresh and not _is_zero(DISK_NBD, data_offset, BLANK_PROBE):
            raise StorageError("the RW disk opened but holds no ext4 filesystem: not formatting over it")
        # Nothing zeroed up front (every byte goes through emulated AES and NBD: 45 s more per 1 GiB under TCG),
        # and noinit_itable at mount keeps the kernel from zeroing inode tables in the background (which would
        # also fill the sparse file). Safe with metadata_csum (Debian's ext4 default): unused inode tables and a
        # never-written journal are recognised by group flags and checksums, not by being zero.
        _run([MKFS_EXT4, "-q", "-F", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1", "-L", "salmiac",
              mapper], "mkfs.ext4")
    os.makedirs(DISK_DIR, exist_ok=True)
    try:
        sysutil.mount(mapper, DISK_DIR, "ext4", sysutil.MS_NODEV | sysutil.MS_NOSUID, "errors=remount-ro,noinit_itable")
    except OSError as exc:
        raise StorageError(f"mount the RW disk: {exc}") from exc
    storage.mounts.append(DISK_DIR)
    for d in ("volumes", "overlay", "overlay/upper", "overlay/work"):
        _plain_dir(os.path.join(DISK_DIR, d))


def _plain_dir(path: str) -> None:
    """Make ``path`` a directory, refusing a symlink there: with the public dev key the parent can write the
    disk's filesystem, and a link must not turn a bind mount or an overlay dir into one of the enclave's own."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{path} on the RW disk is not a directory")


def prepare_root(app: AppConfig, transport: str, log: Callable[[str, str], None]) -> Storage:
    """The app's root directory, with every storage piece the measured config asks for."""
    storage = Storage(root=app.rootfs.path, log=log)
    try:
        lower = app.rootfs.path
        if app.rootfs.type == ROOTFS_VERITY:
            lower = attach_verity_rootfs(app.rootfs, transport)
            storage.mounts.append(lower)
        if app.needs_disk:
            attach_disk(app, transport, storage)
        if app.overlay_persistence:
            upper = os.path.join(DISK_DIR, "overlay")
        elif app.rootfs.type == ROOTFS_VERITY:
            os.makedirs(RW_DIR, exist_ok=True)
            sysutil.mount("tmpfs", RW_DIR, "tmpfs", sysutil.MS_NODEV, "mode=0755")
            storage.mounts.append(RW_DIR)
            for d in ("upper", "work"):
                os.makedirs(os.path.join(RW_DIR, d), exist_ok=True)
            upper = RW_DIR
        else:
            upper = ""  # the initramfs rootfs is writable RAM already
        if upper:
            os.makedirs(ROOT_DIR, exist_ok=True)
            sysutil.mount("overlay", ROOT_DIR, "overlay", 0,
                          f"lowerdir={lower},upperdir={upper}/upper,workdir={upper}/work")
            storage.mounts.append(ROOT_DIR)
            storage.root = ROOT_DIR
        for volume in app.volumes:
            _mount_volume(storage, volume)
        if STEP_TIMES:
            log("info", "storage: " + ", ".join(f"{k} {v}s" for k, v in STEP_TIMES.items()))
    except OSError as exc:
        storage.close()
        raise StorageError(f"storage: {exc}") from exc
    except BaseException:
        storage.close()
        raise
    return storage


def _mount_volume(storage: Storage, volume: str) -> None:
    """Bind the volume's directory on the disk over ``volume`` in the app's root. A new volume starts with what
    the image has at that path, as docker fills a new named volume."""
    target = resolve_in_root(storage.root, volume)  # symlinks in the image resolve inside its root, never out
    source = _volume_dir(volume)
    if os.path.lexists(source):
        _plain_dir(source)
    else:
        staging = source + ".new"
        shutil.rmtree(staging, ignore_errors=True)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.copytree(target, staging, symlinks=True)
        else:
            os.makedirs(staging)
        os.rename(staging, source)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise StorageError(f"volume {volume}: the image has a non-directory there")
    os.makedirs(target, exist_ok=True)
    sysutil.mount(source, target, None, sysutil.MS_BIND)
    storage.mounts.append(target)
