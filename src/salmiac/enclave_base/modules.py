"""Kernel modules for the enclave: find them in the unpacked kernel, follow their dependencies, decompress.

Debian's kernel package has no ``modules.dep`` (depmod runs when the package is installed), so dependencies
come from each module's ``.modinfo`` section (``depends=``, and ``softdep=`` ``pre:`` entries, which the kernel
does not enforce but which modprobe would load first, e.g. crypto helpers). Modules built into the kernel
(listed in ``modules.builtin``) need nothing and are reported as such.

The enclave reads ``MODULES_INDEX`` (JSON, written next to the modules) to load modules in order, see
``salmiac.enclave.kmod``::

    {"kernel": "6.12.118+deb12-cloud-amd64",
     "modules": {"dm_verity": {"path": "kernel/drivers/md/dm-verity.ko", "deps": ["dm_bufio", "dm_mod"]}},
     "builtin": ["ext4", "jbd2"]}
"""

from __future__ import annotations

import json
import lzma
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from salmiac.enclave_base import elf
from salmiac.errors import RequestError, RuntimeFailure

MODULES_INDEX = "salmiac-modules.json"
_MAX_MODULE_BYTES = 64 << 20  # the largest in-tree module is a few MiB decompressed


def normalize(name: str) -> str:
    """Module names treat '-' and '_' alike; the kernel reports them with '_'."""
    return name.replace("-", "_")


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    path: str  # relative to the modules dir, without compression suffix: "kernel/fs/overlayfs/overlay.ko"
    deps: tuple[str, ...]  # hard (depends=) then soft pre-dependencies that exist as modules
    data: bytes  # decompressed .ko


@dataclass(frozen=True, slots=True)
class ModuleSet:
    kernel: str
    modules: tuple[Module, ...]  # in a valid load order: every module after its dependencies
    builtin: tuple[str, ...]  # requested (or depended-on) names that are built into the kernel

    def index_json(self) -> bytes:
        doc = {
            "kernel": self.kernel,
            "modules": {m.name: {"path": m.path, "deps": list(m.deps)} for m in self.modules},
            "order": [m.name for m in self.modules],
            "builtin": list(self.builtin),
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


class ModuleTree:
    """The modules of one unpacked kernel (``KernelBundle.modules_dir``)."""

    def __init__(self, modules_dir: Path, kernel: str) -> None:
        self.modules_dir = modules_dir
        self.kernel = kernel
        self._files: dict[str, Path] = {}
        for path in sorted(modules_dir.glob("kernel/**/*.ko*")):
            self._files[normalize(path.name.split(".ko", 1)[0])] = path
        builtin = modules_dir / "modules.builtin"
        self.builtin: frozenset[str] = frozenset(
            normalize(Path(line.strip()).name.removesuffix(".ko"))
            for line in (builtin.read_text().splitlines() if builtin.exists() else [])
            if line.strip()
        )
        self._cache: dict[str, tuple[str, tuple[str, ...], bytes]] = {}

    def exists(self, name: str) -> bool:
        return normalize(name) in self._files

    def is_builtin(self, name: str) -> bool:
        return normalize(name) in self.builtin

    def resolve(self, names: Iterable[str]) -> ModuleSet:
        """``names`` plus their dependencies, in load order (depth-first, dependencies sorted by name)."""
        order: list[Module] = []
        builtin: set[str] = set()
        done: set[str] = set()
        visiting: list[str] = []

        def visit(raw: str) -> None:
            name = normalize(raw)
            if name in done:
                return
            if name in visiting:
                raise RuntimeFailure(f"module dependency cycle: {' -> '.join([*visiting, name])}")
            if name not in self._files:
                if name in self.builtin:
                    builtin.add(name)
                    done.add(name)
                    return
                raise RequestError(f"kernel module {raw!r} is neither a module nor built into {self.kernel}")
            visiting.append(name)
            path, deps, data = self._load(name)
            for dep in sorted(deps):
                visit(dep)
            visiting.pop()
            done.add(name)
            order.append(Module(name, path, deps, data))

        for raw in names:
            visit(raw)
        return ModuleSet(self.kernel, tuple(order), tuple(sorted(builtin)))

    def _load(self, name: str) -> tuple[str, tuple[str, ...], bytes]:
        if name not in self._cache:
            src = self._files[name]
            raw = src.read_bytes()
            if src.name.endswith(".ko.xz"):
                data = lzma.LZMADecompressor().decompress(raw, max_length=_MAX_MODULE_BYTES)
            elif src.name.endswith(".ko"):
                data = raw
            else:
                raise RuntimeFailure(f"{src.name}: unsupported module compression")
            info = modinfo(data)
            deps = [d for d in info.get("depends", [""])[0].split(",") if d]
            for soft in info.get("softdep", []):
                deps.extend(d for d in _softdep_pre(soft) if normalize(d) in self._files)
            rel = str(src.relative_to(self.modules_dir)).removesuffix(".xz")
            self._cache[name] = (rel, tuple(dict.fromkeys(normalize(d) for d in deps)), data)
        return self._cache[name]


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section, grouped by key."""
    section = elf.section(ko, ".modinfo")
    if section is None:
        raise RuntimeFailure("kernel module without .modinfo section")
    info: dict[str, list[str]] = {}
    for item in section.split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


def _softdep_pre(value: str) -> list[str]:
    """``"pre: crc32c post: foo"`` → ["crc32c"]."""
    out: list[str] = []
    section = ""
    for word in value.split():
        if word.endswith(":"):
            section = word[:-1]
        elif section == "pre":
            out.append(word)
    return out


def check_names(names: Sequence[str]) -> None:
    for name in names:
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise RequestError(f"invalid kernel module name {name!r}")
