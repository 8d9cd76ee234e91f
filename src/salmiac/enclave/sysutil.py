"""Thin wrappers over the few system calls Python's stdlib lacks (mount, umount, reboot), via libc, and the one way
the init runs a system tool (``run_tool``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Final

MS_RDONLY: Final = 1
MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_REMOUNT: Final = 32
MS_BIND: Final = 4096
MS_MOVE: Final = 8192
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2

RB_AUTOBOOT: Final = 0x01234567
RB_POWER_OFF: Final = 0x4321FEDC

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.reboot.argtypes = [ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def reboot(cmd: int) -> None:
    _check(_libc.reboot(cmd), "reboot")


def mounted(target: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target for line in f if len(line.split()) > 1)
    except OSError:
        return False


TOOL_ENV: Final = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DM_DISABLE_UDEV": "1", "LC_ALL": "C"}
"""PID 1 starts with no PATH; there is no udev in the enclave for device-mapper tools to wait for."""


def run_tool(
    argv: Sequence[str],
    what: str,
    error: Callable[[str], Exception],
    *,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = TOOL_ENV,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool (argv, never a shell); a failure (it cannot start, times out, or exits non-zero) raises
    ``error("WHAT: last stderr line")``."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, input=stdin, env=env, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        text = proc.stderr.decode(errors="replace").strip()
        raise error(f"{what}: {(text.splitlines() or [f'exit status {proc.returncode}'])[-1]}")
    return proc
