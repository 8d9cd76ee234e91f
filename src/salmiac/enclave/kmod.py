"""Load kernel modules inside the enclave: dependencies first, through finit_module(2). Stdlib only.

The base (``salmiac.enclave_base``) ships decompressed ``.ko`` files and an index, ``salmiac-modules.json``,
next to them: ``{"modules": {name: {"path": ..., "deps": [...]}}, "builtin": [...]}``. There is no
modprobe, no modules.dep and no udev. A module already loaded (EEXIST) counts as loaded; a name built into the
kernel needs nothing. The index comes from the measured initramfs, so it is trusted, but it is still bounded.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
from collections.abc import Iterable

INDEX_NAME = "salmiac-modules.json"
SYS_FINIT_MODULE = 313  # x86_64
_MAX_INDEX_BYTES = 1 << 20
_MAX_DEPTH = 32


class ModuleLoadError(RuntimeError):
    pass


def default_root() -> str:
    return f"/lib/modules/{os.uname().release}"


def load_modules(names: Iterable[str], root: str | None = None) -> list[str]:
    """Load ``names`` and their dependencies in order; return the modules this call inserted."""
    base = root if root is not None else default_root()
    modules, builtin = _read_index(os.path.join(base, INDEX_NAME))
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, depth: int) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if depth > _MAX_DEPTH:
            raise ModuleLoadError(f"module dependencies of {name} nest too deep")
        entry = modules.get(name)
        if entry is None:
            raise ModuleLoadError(f"kernel module {name} is not in {base}/{INDEX_NAME}")
        seen.add(name)
        for dep in entry[1]:
            visit(dep, depth + 1)
        order.append(name)

    for name in names:
        visit(name, 0)
    inserted: list[str] = []
    for name in order:
        path = os.path.join(base, modules[name][0])
        if finit_module(path):
            inserted.append(name)
    return inserted


def finit_module(path: str, params: str = "") -> bool:
    """Insert one module file; False when it was already loaded (EEXIST)."""
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ret = syscall(
            ctypes.c_long(SYS_FINIT_MODULE), ctypes.c_int(fd), ctypes.c_char_p(params.encode()), ctypes.c_int(0)
        )
    finally:
        os.close(fd)
    if ret == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    raise ModuleLoadError(f"loading {os.path.basename(path)}: {os.strerror(err)}")


def _read_index(path: str) -> tuple[dict[str, tuple[str, list[str]]], set[str]]:
    """name → (relative path, deps), and the built-in names."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_INDEX_BYTES + 1)
    except OSError as exc:
        raise ModuleLoadError(f"cannot read module index {path}: {exc.strerror}") from exc
    if len(raw) > _MAX_INDEX_BYTES:
        raise ModuleLoadError(f"module index {path} is too large")
    try:
        doc = json.loads(raw)
        modules = {
            str(name): (str(entry["path"]), [str(d) for d in entry["deps"]]) for name, entry in doc["modules"].items()
        }
        builtin = {str(name) for name in doc["builtin"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModuleLoadError(f"module index {path} is malformed: {exc}") from exc
    for rel, _deps in modules.values():
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ModuleLoadError(f"module index {path}: path {rel!r} leaves the modules directory")
    return modules, builtin
