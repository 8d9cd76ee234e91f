"""Turn the measured AppConfig plus the parent's runtime overrides into the exact process to exec.

Docker's semantics, which users expect from an unmodified image:
- argv = ENTRYPOINT + CMD; run-time ARGS replace CMD (not ENTRYPOINT).
- ENV from the image, then run-time ``-e`` overrides; PATH defaults to docker's when the image sets none;
  HOSTNAME and HOME are set (HOME from the user's passwd entry, "/" when unknown) unless given.
- USER: "name", "uid", "name:group", "uid:gid"; a name must exist in the rootfs's /etc/passwd (group names in
  /etc/group); a numeric uid absent from passwd runs with gid 0; supplementary groups come from /etc/group.
- WORKDIR is created if missing; a relative argv[0] containing "/" resolves against it; a bare name is searched
  in the *app's* PATH inside the rootfs, never the init's.
Everything is read relative to ``rootfs`` (a host path to the app's root); paths inside it are resolved without
following symlinks out of it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_SYMLINKS = 40


class AppSpecError(Exception):
    """The app cannot be started as configured; ``status`` is the shell-like exit status to report."""

    def __init__(self, message: str, status: int = 125) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    path: str  # executable, absolute inside the rootfs
    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]


def merge_env(*layers: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for layer in layers:
        for entry in layer:
            key, sep, value = entry.partition("=")
            if not sep or not key:
                continue
            env[key] = value
    return env


def resolve_in_root(rootfs: str, path: str) -> str:
    """Host path of ``path`` inside ``rootfs``, following symlinks as the app would see them (chrooted)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(rootfs, *resolved, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise AppSpecError(f"too many levels of symbolic links in {path}", 127)
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(rootfs, *resolved)


def _read_db(rootfs: str, name: str) -> list[list[str]]:
    try:
        with open(resolve_in_root(rootfs, f"/etc/{name}"), encoding="utf-8", errors="replace") as f:
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return []


def _is_number(text: str) -> bool:
    # str.isdigit() is true for "²" and other non-ASCII digits that int() refuses or reads differently.
    return text.isascii() and text.isdigit()


def _clean_abs(path: str) -> str:
    """Absolute form of an in-root path without empty or "." parts.

    Not posixpath.normpath: it keeps exactly two leading slashes ("//app"), and it folds ".." lexically, which
    differs from the kernel when the part before ".." is a symlink (resolve_in_root follows the kernel).
    """
    return "/" + "/".join(p for p in path.split("/") if p not in ("", "."))


def resolve_user(rootfs: str, user: str) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary groups, home) for a docker USER string."""
    name, _, group = (user or "0").partition(":")
    # Entries with non-numeric ids are malformed: skip them rather than fail on int().
    passwd = [e for e in _read_db(rootfs, "passwd") if len(e) >= 7 and _is_number(e[2])]
    groups_db = [e for e in _read_db(rootfs, "group") if len(e) >= 3 and _is_number(e[2])]
    entry = None
    if _is_number(name):
        uid = int(name)
        entry = next((e for e in passwd if e[2] == name), None)
    else:
        entry = next((e for e in passwd if e[0] == name), None)
        if entry is None:
            raise AppSpecError(f"unable to find user {name}: no matching entries in passwd file")
        uid = int(entry[2])
    gid = int(entry[3]) if entry is not None and _is_number(entry[3]) else 0
    home = entry[5] if entry is not None and entry[5] else "/"
    if group:
        if _is_number(group):
            gid = int(group)
        else:
            g = next((e for e in groups_db if e[0] == group), None)
            if g is None:
                raise AppSpecError(f"unable to find group {group}: no matching entries in group file")
            gid = int(g[2])
    supplementary = [gid]
    if entry is not None and not group:
        for g in groups_db:
            members = g[3].split(",") if len(g) > 3 else []
            if entry[0] in members and int(g[2]) not in supplementary:
                supplementary.append(int(g[2]))
    if not 0 <= uid < 2**32 - 1 or not 0 <= gid < 2**32 - 1:
        raise AppSpecError(f"user {user!r} is out of range")
    return uid, gid, supplementary, home


def find_executable(rootfs: str, name: str, cwd: str, path_env: str) -> str:
    """Absolute in-rootfs path of the program, as execvp inside the chroot would find it."""
    if "/" in name:
        candidate = _clean_abs(name if name.startswith("/") else os.path.join(cwd, name))
        _check_executable(rootfs, candidate, name)
        return candidate
    for directory in path_env.split(":"):
        if not directory:
            directory = cwd
        candidate = _clean_abs(os.path.join(cwd, directory, name))
        host = resolve_in_root(rootfs, candidate)
        if os.path.isfile(host) and os.stat(host).st_mode & 0o111:
            return candidate
    raise AppSpecError(f'exec: "{name}": executable file not found in $PATH', 127)


def _check_executable(rootfs: str, candidate: str, shown: str) -> None:
    host = resolve_in_root(rootfs, candidate)
    try:
        st = os.stat(host)
    except OSError:
        raise AppSpecError(f"exec: {shown}: no such file or directory", 127) from None
    if stat.S_ISDIR(st.st_mode):
        raise AppSpecError(f"exec: {shown}: is a directory", 126)
    if not st.st_mode & 0o111:
        raise AppSpecError(f"exec: {shown}: permission denied", 126)


def build_process_spec(
    rootfs: str,
    *,
    entrypoint: list[str],
    cmd: list[str],
    image_env: list[str],
    working_dir: str,
    user: str,
    args: list[str] | None,
    runtime_env: list[str],
    hostname: str,
) -> ProcessSpec:
    argv = list(entrypoint) + (list(args) if args is not None else list(cmd))
    if not argv:
        raise AppSpecError("no command specified: the image has neither ENTRYPOINT nor CMD", 125)
    uid, gid, groups, home = resolve_user(rootfs, user)
    env = merge_env(image_env, runtime_env)
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    env.setdefault("HOME", home)
    cwd = _clean_abs(working_dir)
    path = find_executable(rootfs, argv[0], cwd, env["PATH"])
    return ProcessSpec(path=path, argv=argv, env=env, cwd=cwd, uid=uid, gid=gid, groups=groups)
