"""Conversion requests and responses, compatible with Fortanix Salmiac's converter JSON.

Validated once, at the edge: ``ConversionRequest.from_json`` rejects unknown fields (naming them with their JSON
path), wrong types and bad sizes with a ``RequestError`` (exit 2). Inner code gets frozen dataclasses.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from salmiac.errors import RequestError
from salmiac.runconfig import MAX_CPUS, MIN_MEMORY_MIB, parse_size_mib

DEFAULT_CPU_COUNT: Final = 2
DEFAULT_MEM_SIZE: Final = "2048M"
MAX_REQUEST_BYTES: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class Auth:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class ImageSpec:
    name: str
    auth: Auth | None = None


ROOTFS_MODES: Final = ("auto", "initramfs", "verity")


@dataclass(frozen=True, slots=True)
class ConverterOptions:
    push_converted_image: bool = False
    enable_overlay_filesystem_persistence: bool = False
    env_vars: tuple[str, ...] = ()
    # Whether the (untrusted) parent may replace CMD and add environment variables at run time. Measured: it is
    # part of the app config in the initramfs, so a verifier knows which policy a PCR0 stands for.
    allow_cmdline_args: bool = True
    debug: bool = False
    entry_point: tuple[str, ...] | None = None  # replaces the image's ENTRYPOINT when given
    entry_point_args: tuple[str, ...] | None = None  # replaces the image's CMD when given
    # Where the app's files travel (our extension): "initramfs" (in the measured ramdisk, held in enclave RAM),
    # "verity" (a squashfs image the parent serves over NBD, checked by dm-verity against the measured root
    # hash: images larger than enclave memory), "auto" (verity above ROOTFS_AUTO_VERITY_BYTES).
    rootfs: str = "auto"
    # Set only by `salmiac convert --insecure-dev-key`, never from the request: persistent storage under a fixed,
    # public key. Measured (the app config records the key provider), so a verifier sees it in the PCRs.
    insecure_dev_key: bool = False
    # The RW disk's size when the enclave first creates it (our extension; RW_STORAGE_SIZE overrides at run time).
    rw_storage_size_mib: int | None = None


@dataclass(frozen=True, slots=True)
class NitroEnclavesOptions:
    cpu_count: int = DEFAULT_CPU_COUNT
    mem_size_mib: int = 2048


@dataclass(frozen=True, slots=True)
class ConversionRequest:
    input_image: ImageSpec
    output_image: ImageSpec
    converter_options: ConverterOptions = field(default_factory=ConverterOptions)
    nitro_enclaves_options: NitroEnclavesOptions = field(default_factory=NitroEnclavesOptions)

    @classmethod
    def from_json(cls, raw: bytes | str) -> ConversionRequest:
        if len(raw) > MAX_REQUEST_BYTES:
            raise RequestError(f"request: larger than {MAX_REQUEST_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"request: not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> ConversionRequest:
        obj = _object(data, "request", required={"input_image", "output_image"},
                      optional={"converter_options", "nitro_enclaves_options"})
        conv = _object(obj.get("converter_options", {}), "converter_options", optional={
            "push_converted_image", "enable_overlay_filesystem_persistence", "env_vars", "allow_cmdline_args",
            "debug", "entry_point", "entry_point_args", "rootfs", "rw_storage_size",
        })
        rw_size = conv.get("rw_storage_size")
        rw_mib = None
        if rw_size is not None:
            if not isinstance(rw_size, str):
                raise RequestError('converter_options.rw_storage_size: must be a string like "2G"')
            rw_mib = parse_size_mib(rw_size, "converter_options.rw_storage_size")
        rootfs = conv.get("rootfs", "auto")
        if rootfs not in ROOTFS_MODES:
            raise RequestError(f"converter_options.rootfs: {rootfs!r} is not one of {', '.join(ROOTFS_MODES)}")
        nitro = _object(obj.get("nitro_enclaves_options", {}), "nitro_enclaves_options",
                        optional={"cpu_count", "mem_size"})
        cpu = nitro.get("cpu_count", DEFAULT_CPU_COUNT)
        if not isinstance(cpu, int) or isinstance(cpu, bool) or not 1 <= cpu <= MAX_CPUS:
            raise RequestError(f"nitro_enclaves_options.cpu_count: {cpu!r} is not a whole number in 1..{MAX_CPUS}")
        mem = nitro.get("mem_size", DEFAULT_MEM_SIZE)
        if not isinstance(mem, str | int) or isinstance(mem, bool):
            raise RequestError("nitro_enclaves_options.mem_size: must be a string like \"4096M\"")
        mem_mib = parse_size_mib(str(mem) if isinstance(mem, str) else f"{mem}M", "nitro_enclaves_options.mem_size")
        if mem_mib < MIN_MEMORY_MIB:
            raise RequestError(f"nitro_enclaves_options.mem_size: {mem!r} is below {MIN_MEMORY_MIB} MiB")
        env_vars = _str_list(conv.get("env_vars", []), "converter_options.env_vars")
        for entry in env_vars:
            if "=" not in entry or entry.startswith("="):
                raise RequestError(f"converter_options.env_vars: {entry!r} is not KEY=VALUE")
        return cls(
            input_image=_image(obj["input_image"], "input_image"),
            output_image=_image(obj["output_image"], "output_image"),
            converter_options=ConverterOptions(
                push_converted_image=_bool(conv, "push_converted_image", "converter_options", False),
                enable_overlay_filesystem_persistence=_bool(
                    conv, "enable_overlay_filesystem_persistence", "converter_options", False),
                env_vars=tuple(env_vars),
                allow_cmdline_args=_bool(conv, "allow_cmdline_args", "converter_options", True),
                debug=_bool(conv, "debug", "converter_options", False),
                entry_point=_opt_list(conv, "entry_point"),
                entry_point_args=_opt_list(conv, "entry_point_args"),
                rootfs=rootfs,
                rw_storage_size_mib=rw_mib,
            ),
            nitro_enclaves_options=NitroEnclavesOptions(cpu_count=cpu, mem_size_mib=mem_mib),
        )


def _object(value: Any, where: str, *, required: set[str] = frozenset(),  # type: ignore[assignment]
            optional: set[str] = frozenset()) -> Mapping[str, Any]:  # type: ignore[assignment]
    if not isinstance(value, dict):
        raise RequestError(f"{where}: expected a JSON object")
    for key in sorted(required):
        if key not in value:
            raise RequestError(f"{where}.{key}: missing" if where != "request" else f"{key}: missing")
    for key in value:
        if key not in required and key not in optional:
            prefix = "" if where == "request" else where + "."
            raise RequestError(f"{prefix}{key}: unknown field")
    return value


def _bool(obj: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{where}: expected a list of strings")
    return list(value)


def _opt_list(obj: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    if obj.get(key) is None:
        return None
    return tuple(_str_list(obj[key], f"converter_options.{key}"))


def _image(value: Any, where: str) -> ImageSpec:
    obj = _object(value, where, required={"name"}, optional={"auth"})
    name = obj["name"]
    if not isinstance(name, str) or not name.strip():
        raise RequestError(f"{where}.name: expected a non-empty string")
    auth = None
    if obj.get("auth") is not None:
        a = _object(obj["auth"], f"{where}.auth", required={"username", "password"})
        if not isinstance(a["username"], str) or not isinstance(a["password"], str):
            raise RequestError(f"{where}.auth: username and password must be strings")
        auth = Auth(a["username"], a["password"])
    return ImageSpec(name=name.strip(), auth=auth)


@dataclass(frozen=True, slots=True)
class ConversionResponse:
    output_image: str
    output_digest: str
    pcrs: dict[str, str]
    eif_size: int
    eif_sha256: str
    memory_needed_mib: int
    mem_size_mib: int
    cpu_count: int
    pushed: bool

    def to_json(self) -> str:
        body = {
            "converted_image": {"name": self.output_image, "digest": self.output_digest, "pushed": self.pushed},
            "measurements": self.pcrs,
            "eif": {"size": self.eif_size, "sha256": self.eif_sha256},
            "nitro_enclaves_options": {"cpu_count": self.cpu_count, "mem_size": f"{self.mem_size_mib}M"},
            "memory_needed_mib": self.memory_needed_mib,
        }
        return json.dumps(body, indent=2)
