"""The converted image's run configuration (``/opt/salmiac/run.json``), read by ``salmiac run``.

Written by the converter, read by the parent. The parent is outside the trust boundary, so nothing here is
security-relevant for the enclave: it says how to launch (resources, file names) and what the measurements should
be (for display and for a verifier). Environment overrides follow Fortanix Salmiac's names: CPU_COUNT, MEM_SIZE,
RW_STORAGE_SIZE, ENCLAVEOS_DEBUG; ``with_env_overrides`` returns a new, validated object.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from salmiac.errors import RequestError

BUNDLE_DIR: Final = "opt/salmiac"  # inside the converted image
RUN_CONFIG_NAME: Final = "run.json"
EIF_NAME: Final = "enclave.eif"
ROOTFS_IMAGE_NAME: Final = "rootfs.img"  # the verity rootfs (squashfs + appended hash tree), when there is one
RUN_CONFIG_VERSION: Final = 1
MIN_MEMORY_MIB: Final = 64  # NE_ERR_ENCLAVE_MEM_MIN_SIZE
DEFAULT_RW_STORAGE_MIB: Final = 1024  # the RW disk's size on first use, unless RW_STORAGE_SIZE says otherwise
MAX_CPUS: Final = 128

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B?)?\s*$", re.IGNORECASE)
_UNIT_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024, "": 1 / (1024 * 1024)}


def parse_size_mib(text: str, what: str) -> int:
    """'4096M', '2G', '512MiB', '1048576K' → MiB. A bare number is bytes, as in Salmiac's mem_size."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise RequestError(f"{what}: {text!r} is not a size like 4096M or 2G")
    value = int(m.group(1)) * _UNIT_MIB[m.group(2).upper()]
    mib = int(value)
    if mib != value or mib <= 0:
        raise RequestError(f"{what}: {text!r} must be a positive whole number of MiB")
    return mib


@dataclass(frozen=True, slots=True)
class RunConfig:
    cpu_count: int
    memory_mib: int
    eif: str = EIF_NAME
    eif_sha256: str = ""
    pcrs: dict[str, str] = field(default_factory=dict)
    debug: bool = False
    rw_storage_mib: int = 0
    image_name: str = ""
    rootfs_image: str = ""  # file name in the bundle of the verity rootfs the parent serves over NBD
    disk: bool = False  # the enclave attaches the RW disk (the image has VOLUMEs, or overlay persistence)
    key_provider: str = ""  # what keys that disk (copied from the measured app config, for the parent's checks)
    version: int = RUN_CONFIG_VERSION

    def __post_init__(self) -> None:
        if not 1 <= self.cpu_count <= MAX_CPUS:
            raise RequestError(f"cpu_count: {self.cpu_count} is outside 1..{MAX_CPUS}")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise RequestError(f"mem_size: {self.memory_mib} MiB is below the {MIN_MEMORY_MIB} MiB minimum")
        if "/" in self.eif or self.eif in ("", ".", ".."):
            raise RequestError(f"run config eif: {self.eif!r} must be a plain file name")
        if "/" in self.rootfs_image or self.rootfs_image in (".", ".."):
            raise RequestError(f"run config rootfs_image: {self.rootfs_image!r} must be a plain file name")

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> RunConfig:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RequestError(f"run config is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != RUN_CONFIG_VERSION:
            raise RequestError("run config: unsupported version")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise RequestError(f"run config: unknown field {sorted(unknown)[0]!r}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise RequestError(f"run config: {exc}") from exc

    def with_env_overrides(self, env: Mapping[str, str]) -> RunConfig:
        changes: dict[str, Any] = {}
        if env.get("CPU_COUNT"):
            try:
                changes["cpu_count"] = int(env["CPU_COUNT"])
            except ValueError:
                raise RequestError(f"CPU_COUNT: {env['CPU_COUNT']!r} is not a whole number") from None
        if env.get("MEM_SIZE"):
            changes["memory_mib"] = parse_size_mib(env["MEM_SIZE"], "MEM_SIZE")
        if env.get("RW_STORAGE_SIZE"):
            changes["rw_storage_mib"] = parse_size_mib(env["RW_STORAGE_SIZE"], "RW_STORAGE_SIZE")
        if env.get("ENCLAVEOS_DEBUG"):
            changes["debug"] = env["ENCLAVEOS_DEBUG"].lower() in ("1", "true", "yes", "debug")
        return dataclasses.replace(self, **changes)
