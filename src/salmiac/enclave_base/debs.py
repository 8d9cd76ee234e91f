"""Fetch Debian packages for the enclave base, reproducibly, without installing anything on the host.

The dependency closure is resolved by the host's apt (its configured sources and already-updated package
lists) as if *nothing* were installed: apt runs with a private, empty dpkg status file and its own
``Dir::Cache``/``Dir::State``, ``--no-install-recommends``, and only prints what it would fetch. Packages
named in ``exclude`` are written into that private status as installed, so apt treats them (and everything
only they would pull in) as already satisfied.

Every resolution is recorded in a *lock* file: one line per package ``name version arch sha256 filename``.
While a lock exists it is the truth: builds download exactly those versions (``apt-get download
name:arch=version``) and refuse a file whose sha256 differs. The default lock lives in ``cache_dir`` and is
keyed by the request (packages + exclude + architecture), so a second call with the same request touches
neither apt nor the network when the .debs are already cached. Pass ``lock=`` to keep a lock elsewhere (e.g.
checked in).

Fragile by nature: the Debian archive drops superseded versions (point releases, security updates), so an old
lock can become undownloadable; resolve again (delete the lock) and review the diff of the lock file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from salmiac.errors import RequestError, RuntimeFailure

ARCH = "amd64"
LOCK_HEADER = "# salmiac deb lock v1: name version arch sha256 filename"

# Debian policy: package names are [a-z0-9][a-z0-9+.-]+; versions [epoch:]upstream[-revision].
_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9-]+)?(=[A-Za-z0-9.+~:-]+)?$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9.+~:-]+$")
_URI_LINE_RE = re.compile(r"^'(?P<uri>[^']+)' (?P<filename>\S+\.deb) (?P<size>\d+)(?: \S*)?$")
_APT_TIMEOUT_S = 1800


@dataclass(frozen=True, slots=True)
class Pin:
    """One exact package file: what a lock line records."""

    name: str
    version: str
    arch: str
    sha256: str
    filename: str

    def line(self) -> str:
        return f"{self.name} {self.version} {self.arch} {self.sha256} {self.filename}"


def download_closure(
    packages: Sequence[str],
    cache_dir: Path,
    *,
    exclude: Sequence[str] = (),
    lock: Path | None = None,
) -> list[Path]:
    """Download the dependency closure of ``packages`` into ``cache_dir``; return the .deb paths, sorted.

    ``packages`` may carry ``=version`` or ``:arch``. Uses (and on first use writes) a lock: see the module
    doc.
    """
    _check_names(packages, "package")
    _check_names(exclude, "excluded package")
    if not packages:
        raise RequestError("download_closure: no package given")
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = lock if lock is not None else cache_dir / f"closure-{request_key(packages, exclude)}.lock"
    if lock_path.exists():
        pins = read_lock(lock_path)
        return fetch_pinned(pins, cache_dir)
    pins = resolve_and_fetch(packages, cache_dir, exclude=exclude)
    write_lock(lock_path, pins)
    return sorted(cache_dir / p.filename for p in pins)


def extract_debs(debs: Sequence[Path], dest: Path) -> None:
    """Unpack each .deb's data into ``dest`` (``dpkg-deb -x``), in the order given; later files win."""
    dest.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        run_tool(["dpkg-deb", "-x", str(deb), str(dest)], f"extract {deb.name}")


def request_key(packages: Sequence[str], exclude: Sequence[str]) -> str:
    blob = json.dumps({"packages": sorted(packages), "exclude": sorted(exclude), "arch": ARCH})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_and_fetch(packages: Sequence[str], cache_dir: Path, *, exclude: Sequence[str] = ()) -> list[Pin]:
    """Resolve the closure with the current package lists, download what is missing, return exact pins."""
    wanted = resolve(packages, exclude=exclude)
    fetched: list[Pin] = []
    missing = [(n, v, f) for n, v, f in wanted if not (cache_dir / f).exists()]
    if missing:
        apt_download([(n, v) for n, v, _ in missing], [f for _, _, f in missing], cache_dir)
    for name, version, filename in wanted:
        arch = parse_deb_filename(filename)[2]
        fetched.append(Pin(name, version, arch, sha256_file(cache_dir / filename), filename))
    return sorted(fetched, key=lambda p: p.name)


def resolve(packages: Sequence[str], *, exclude: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """(name, version, filename) for every package apt would fetch onto an empty system, sorted by name."""
    with tempfile.TemporaryDirectory(prefix="salmiac-apt-") as tmp:
        root = Path(tmp)
        opts = _private_apt_options(root)
        status = root / "state" / "status"
        status.write_text(_fake_status(exclude, opts))
        try:
            cmd = ["apt-get", *opts, "--no-install-recommends", "--print-uris", "-qq", "-y", "install"]
            out = run_tool([*cmd, *packages], "resolve " + " ".join(packages))
        except RuntimeFailure as exc:
            if "Unable to locate package" in str(exc) or "has no installation candidate" in str(exc):
                raise RequestError(str(exc)) from exc
            raise
    found: list[tuple[str, str, str]] = []
    for line in out.splitlines():
        m = _URI_LINE_RE.match(line.strip())
        if m is None:
            continue
        filename = m.group("filename")
        name, version, _arch = parse_deb_filename(filename)
        found.append((name, version, filename))
    if not found:
        raise RuntimeFailure(f"apt resolved nothing for {' '.join(packages)} (package lists updated?)")
    return sorted(found)


def fetch_pinned(pins: Sequence[Pin], cache_dir: Path) -> list[Path]:
    """Ensure each pinned file is in ``cache_dir`` with its recorded sha256; download only what is missing."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if not (cache_dir / p.filename).exists()]
    if missing:
        apt_download([(p.name, p.version) for p in missing], [p.filename for p in missing], cache_dir)
    for pin in pins:
        got = sha256_file(cache_dir / pin.filename)
        if got != pin.sha256:
            raise RuntimeFailure(f"{pin.filename}: sha256 {got} differs from the lock ({pin.sha256})")
    return sorted(cache_dir / p.filename for p in pins)


def read_lock(path: Path) -> list[Pin]:
    pins: list[Pin] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 5:
            raise RequestError(f"{path}:{lineno}: expected 'name version arch sha256 filename'")
        name, version, arch, sha, filename = fields
        if (
            not _NAME_RE.match(name)
            or not _VERSION_RE.match(version)
            or not re.fullmatch(r"[0-9a-f]{64}", sha)
            or "/" in filename
            or not filename.endswith(".deb")
        ):
            raise RequestError(f"{path}:{lineno}: malformed lock line")
        pins.append(Pin(name, version, arch, sha, filename))
    return pins


def write_lock(path: Path, pins: Sequence[Pin]) -> None:
    text = "\n".join([LOCK_HEADER, *(p.line() for p in sorted(pins, key=lambda p: p.name))]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_deb_filename(filename: str) -> tuple[str, str, str]:
    """``zlib1g_1%3a1.2.13_amd64.deb`` → ("zlib1g", "1:1.2.13", "amd64"); apt escapes the epoch colon."""
    stem = filename.removesuffix(".deb")
    parts = stem.split("_")
    if len(parts) != 3:
        raise RuntimeFailure(f"unexpected .deb file name from apt: {filename}")
    return parts[0], parts[1].replace("%3a", ":").replace("%3A", ":"), parts[2]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_names(names: Sequence[str], what: str) -> None:
    if isinstance(names, str):
        raise TypeError(f"{what}s must be a sequence of names, not a string")
    for name in names:
        if not _PKG_RE.match(name):
            raise RequestError(f"invalid {what} name: {name!r}")


def _private_apt_options(root: Path) -> list[str]:
    """apt options for a private, empty system that still reads the host's sources and package lists."""
    (root / "state").mkdir()
    (root / "cache" / "archives" / "partial").mkdir(parents=True)
    return [
        "-o", f"Dir::State={root / 'state'}",
        "-o", f"Dir::State::status={root / 'state' / 'status'}",
        "-o", "Dir::State::Lists=/var/lib/apt/lists",
        "-o", f"Dir::Cache={root / 'cache'}",
        "-o", "Debug::NoLocking=1",
        "-o", f"APT::Architecture={ARCH}",
        "-o", "APT::Architectures::=" + ARCH,
        "-o", "APT::Install-Suggests=0",
    ]  # fmt: skip


def _fake_status(exclude: Sequence[str], opts: list[str]) -> str:
    """A dpkg status declaring the excluded packages installed (candidate version, no dependencies)."""
    stanzas: list[str] = []
    for name in sorted(set(exclude)):
        cmd = ["apt-cache", *opts, "show", "--no-all-versions", name]
        out = run_tool(cmd, f"look up excluded package {name}")
        fields = dict(ln.split(": ", 1) for ln in out.splitlines() if ": " in ln and not ln.startswith(" "))
        if "Version" not in fields:
            raise RequestError(f"excluded package {name} is not known to apt")
        stanzas.append(
            f"Package: {name}\nStatus: install ok installed\nVersion: {fields['Version']}\n"
            f"Architecture: {fields.get('Architecture', ARCH)}\n"
        )
    return "\n".join(stanzas)


def apt_download(items: Sequence[tuple[str, str]], filenames: Sequence[str], cache_dir: Path) -> None:
    """``apt-get download name:arch=version...`` into a temp dir, then move each file in (atomic per file)."""
    with tempfile.TemporaryDirectory(prefix=".dl-", dir=cache_dir) as tmp:
        run_tool(
            [
                "apt-get", "-o", "APT::Sandbox::User=root", "-qq", "download",
                *(f"{n}:{ARCH}={v}" for n, v in items),
            ],
            "download " + " ".join(n for n, _ in items),
            cwd=Path(tmp),
        )  # fmt: skip
        for filename in filenames:
            src = Path(tmp) / filename
            if not src.exists():
                got = ", ".join(sorted(os.listdir(tmp)))
                raise RuntimeFailure(f"apt-get download did not produce {filename} (got: {got})")
            os.replace(src, cache_dir / filename)


def run_tool(cmd: list[str], what: str, *, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise RuntimeFailure(f"{what}: {cmd[0]} not found (install it)")
    env = {**os.environ, "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=_APT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"{what}: {cmd[0]} timed out") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        detail = next((ln for ln in lines if ln.startswith("E:")), lines[-1] if lines else "")
        raise RuntimeFailure(f"{what}: {cmd[0]} failed ({proc.returncode}): {detail}")
    return proc.stdout


def candidate(name: str) -> tuple[str, str, str]:
    """(version, arch, sha256 from the index) of apt's candidate for ``name``; RequestError when none."""
    _check_names([name], "package")
    try:
        out = run_tool(["apt-cache", "show", "--no-all-versions", name], f"look up {name}")
    except RuntimeFailure as exc:
        raise RequestError(f"package {name} is not known to apt") from exc
    fields = dict(ln.split(": ", 1) for ln in out.splitlines() if ": " in ln and not ln.startswith(" "))
    if "Version" not in fields or "SHA256" not in fields:
        raise RequestError(f"package {name} has no installation candidate")
    return fields["Version"], fields.get("Architecture", ARCH), fields["SHA256"]


def deb_filename(name: str, version: str, arch: str) -> str:
    """The file name apt gives a downloaded package (epoch colon escaped)."""
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"
