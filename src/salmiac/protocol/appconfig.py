"""The app's configuration, written by the converter into the measured initramfs, read by the enclave init.

It is measured (it lives in ramdisk[1], covered by PCR0/PCR2), so it is trusted; it is still parsed strictly so
that a converter bug cannot turn into undefined behaviour in PID 1. JSON, not CBOR: it is small, read once, and
humans inspect it. Serialisation is deterministic (sorted keys, compact) because its bytes feed the PCRs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Final

APP_CONFIG_PATH: Final = "salmiac/app.json"  # inside the initramfs, relative to its root
APP_CONFIG_VERSION: Final = 1
ROOTFS_IN_INITRAMFS: Final = "initramfs"
ROOTFS_VERITY: Final = "verity"  # a squashfs image served by the parent over NBD, checked by dm-verity
ROOTFS_TYPES: Final = (ROOTFS_IN_INITRAMFS, ROOTFS_VERITY)
ROOTFS_FILESYSTEMS: Final = ("squashfs",)
ROOTFS_DIR: Final = "rootfs"  # where ramdisk[1] carries the app's files, relative to the initramfs root
DEFAULT_STOP_TIMEOUT: Final = 10  # seconds between the stop signal and SIGKILL, as `docker stop`
MAX_LIST: Final = 4096
MAX_VOLUMES: Final = 64
KEY_EPHEMERAL: Final = "ephemeral"
"""The RW disk's key is random, made in the enclave at each boot: encrypted scratch space, nothing persists."""
KEY_INSECURE_DEV: Final = "insecure-dev-key"
"""A fixed, public key: data persists across runs but anyone with the disk file can read it. Development only."""
KEY_PROVIDERS: Final = (KEY_EPHEMERAL, KEY_INSECURE_DEV)


class AppConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class RootfsSpec:
    """Where the app's root filesystem comes from.

    ``initramfs``: the files are in ramdisk[1] under ``path``. ``verity``: a read-only ``fs`` image that the
    parent serves over NBD; ``verity`` holds the dm-verity parameters (``rootfs.verity.VerityInfo.to_dict``),
    root hash included. Being measured, that root hash makes the PCRs cover every byte of the image.
    """

    type: str = ROOTFS_IN_INITRAMFS
    path: str = "/" + ROOTFS_DIR
    fs: str = ""
    verity: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AppConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = "/"
    user: str = ""
    stop_signal: int = 15
    stop_timeout: int = DEFAULT_STOP_TIMEOUT
    exposed_ports: list[str] = field(default_factory=list)
    overlay_persistence: bool = False
    volumes: list[str] = field(default_factory=list)  # the image's VOLUMEs: on the RW disk, persistent
    key_provider: str = KEY_EPHEMERAL
    allow_cmdline_args: bool = True  # may the parent replace CMD and add env at run time
    rootfs: RootfsSpec = field(default_factory=RootfsSpec)
    image_name: str = ""
    image_digest: str = ""
    version: int = APP_CONFIG_VERSION

    @property
    def needs_disk(self) -> bool:
        """Whether the enclave attaches the RW disk: something must live on it."""
        return bool(self.volumes) or self.overlay_persistence

    def to_json(self) -> bytes:
        data = asdict(self)
        # Keys at their defaults that older configs did not have stay out, so those configs keep their bytes.
        if data["rootfs"]["type"] == ROOTFS_IN_INITRAMFS:
            del data["rootfs"]["fs"], data["rootfs"]["verity"]
        if not data["volumes"]:
            del data["volumes"]
        if data["key_provider"] == KEY_EPHEMERAL:
            del data["key_provider"]
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AppConfig:
        try:
            data = json.loads(raw, object_pairs_hook=_no_duplicates)
        except AppConfigError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: "[[[[..." nesting
            raise AppConfigError(f"app config is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise AppConfigError("app config is not an object")
        # `true == 1` in Python: check the type, or {"version": true} passes for version 1.
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version != APP_CONFIG_VERSION:
            raise AppConfigError(f"unsupported app config version {data.get('version')!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise AppConfigError(f"unknown app config field {sorted(unknown)[0]!r}")
        for name in ("entrypoint", "cmd", "env", "exposed_ports", "volumes"):
            _check_str_list(name, data.get(name, []))
        volumes = data.get("volumes", [])
        if len(volumes) > MAX_VOLUMES or any(not v.startswith("/") or v.rstrip("/") == "" for v in volumes):
            raise AppConfigError("app config volumes must be absolute paths other than /, at most 64")
        if data.get("key_provider", KEY_EPHEMERAL) not in KEY_PROVIDERS:
            raise AppConfigError(f"app config key_provider {data.get('key_provider')!r} is unknown")
        for name in ("working_dir", "user", "image_name", "image_digest"):
            if not isinstance(data.get(name, ""), str):
                raise AppConfigError(f"app config {name} must be a string")
        for name in ("stop_signal", "stop_timeout"):
            value = data.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 3600:
                raise AppConfigError(f"app config {name} out of range")
        if not 1 <= data.get("stop_signal", 15) <= 64:
            raise AppConfigError("app config stop_signal out of range")
        for name in ("overlay_persistence", "allow_cmdline_args"):
            if not isinstance(data.get(name, False), bool):
                raise AppConfigError(f"app config {name} must be a boolean")
        rootfs = data.pop("rootfs", {})
        if not isinstance(rootfs, dict) or set(rootfs) - {"type", "path", "fs", "verity"}:
            raise AppConfigError("app config rootfs is malformed")
        if not all(isinstance(rootfs.get(k, ""), str) for k in ("type", "path", "fs")):
            raise AppConfigError("app config rootfs type, path and fs must be strings")
        if rootfs.get("type", ROOTFS_IN_INITRAMFS) not in ROOTFS_TYPES:
            raise AppConfigError(f"app config rootfs type {rootfs.get('type')!r} is unknown")
        if rootfs.get("type") == ROOTFS_VERITY and (
            not isinstance(rootfs.get("verity"), dict) or rootfs.get("fs") not in ROOTFS_FILESYSTEMS
        ):
            raise AppConfigError("app config rootfs: a verity rootfs needs verity parameters and a known fs")
        if not str(data.get("working_dir", "/")).startswith("/"):
            raise AppConfigError("app config working_dir must be absolute")
        return cls(rootfs=RootfsSpec(**rootfs), **data)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's default keeps the last of two equal keys; a config with two meanings is a converter bug."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise AppConfigError(f"duplicate app config key {key!r}")
        result[key] = value
    return result


def _check_str_list(name: str, value: Any) -> None:
    if not isinstance(value, list) or len(value) > MAX_LIST or not all(isinstance(v, str) for v in value):
        raise AppConfigError(f"app config {name} must be a list of strings")
    if any("\0" in v for v in value):
        raise AppConfigError(f"app config {name} contains NUL")
