"""The enclave kernel: Debian's 6.12 cloud kernel, a .deb unpacked, never installed on the host.

Why this kernel: it is built for VMs, ships NSM, NBD, dm-crypt/verity/integrity, TUN, vsock, overlay, erofs
and squashfs as modules (ext4, devtmpfs, virtio console/PCI, AF_PACKET built in), and bookworm carries it as
``linux-image-<release>-cloud-amd64-unsigned``. The package has no ``modules.dep`` (depmod runs at install
time), so module dependencies come from each module's own ``.modinfo`` (see ``modules.py``).

Layout of the cache (``cache_dir/kernel``)::

    linux-image-<release>-cloud-amd64-unsigned.lock   the exact .deb (name version arch sha256 filename)
    <uname -r>/vmlinuz  config  modules/               unpacked; ``.complete`` holds the .deb's sha256

A call with a pinned ``release`` whose unpacked copy is complete touches neither apt nor the network. Without
a pin the newest release in the local package lists is chosen (a local lookup, no network).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from salmiac.enclave_base import debs
from salmiac.errors import RequestError, RuntimeFailure

FLAVOUR = "cloud-amd64"
_RELEASE_RE = re.compile(r"^(?P<release>6\.12\.\d+\+deb\d+(?:\.\d+)?)(?:-cloud-amd64)?$")
_PKG_RE = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb\d+(?:\.(\d+))?)-cloud-amd64-unsigned$")
_STAMP = ".complete"


@dataclass(frozen=True, slots=True)
class KernelBundle:
    bzimage: Path
    version: str  # the kernel release, as ``uname -r`` prints it: "6.12.118+deb12-cloud-amd64"
    config: Path
    modules_dir: Path  # the unpacked /lib/modules/<version>
    deb_version: str  # the Debian package version: "6.12.118-1~deb12u1"
    deb_sha256: str

    def config_value(self, option: str) -> str | None:
        """``"y"``, ``"m"``, a value, or None when unset (``CONFIG_`` prefix optional)."""
        return read_config(self.config).get(option if option.startswith("CONFIG_") else "CONFIG_" + option)


def ensure_kernel(cache_dir: Path, release: str | None = None) -> KernelBundle:
    """The unpacked cloud kernel ``release`` ("6.12.118+deb12"), or the newest one apt knows; cached."""
    kernel_dir = cache_dir / "kernel"
    kernel_dir.mkdir(parents=True, exist_ok=True)
    base = newest_release() if release is None else parse_release(release)
    uname = f"{base}-{FLAVOUR}"
    package = f"linux-image-{base}-{FLAVOUR}-unsigned"
    unpacked = kernel_dir / uname
    lock = kernel_dir / f"{package}.lock"
    if (unpacked / _STAMP).exists() and lock.exists():
        (pin,) = debs.read_lock(lock)
        if (unpacked / _STAMP).read_text().strip() == pin.sha256:
            return _bundle(unpacked, uname, pin)
    pin = _pinned_deb(package, lock, kernel_dir)
    _unpack(kernel_dir / pin.filename, uname, unpacked, pin.sha256)
    return _bundle(unpacked, uname, pin)


def parse_release(release: str) -> str:
    m = _RELEASE_RE.match(release)
    if m is None:
        raise RequestError(f"kernel release {release!r} is not a Debian 6.12 release like '6.12.118+deb12'")
    return m.group("release")


def newest_release() -> str:
    """The newest ``6.12.N+debX`` cloud kernel with an installation candidate in the local package lists."""
    out = debs.run_tool(["apt-cache", "pkgnames", "linux-image-6.12."], "list kernel packages")
    found: list[tuple[int, int, str]] = []
    for name in out.split():
        m = _PKG_RE.match(name)
        if m is not None:
            found.append((int(m.group(2)), int(m.group(3) or 0), m.group(1)))
    # pkgnames also lists names only mentioned by other packages: take the newest with a real candidate.
    for _patch, _rebuild, release in sorted(found, reverse=True):
        try:
            debs.candidate(f"linux-image-{release}-{FLAVOUR}-unsigned")
        except RequestError:
            continue
        return release
    raise RuntimeFailure("no linux-image-6.12.*-cloud-amd64-unsigned in the apt lists (bookworm-backports?)")


def read_config(config: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in config.read_text().splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            values[key] = value.strip('"')
    return values


def _pinned_deb(package: str, lock: Path, kernel_dir: Path) -> debs.Pin:
    if lock.exists():
        pins = debs.read_lock(lock)
        if len(pins) != 1 or pins[0].name != package:
            raise RuntimeFailure(f"{lock}: expected exactly one line for {package}")
    else:
        version, arch, index_sha = debs.candidate(package)
        filename = debs.deb_filename(package, version, arch)
        if not (kernel_dir / filename).exists():
            debs.apt_download([(package, version)], [filename], kernel_dir)
        pins = [debs.Pin(package, version, arch, index_sha, filename)]
    debs.fetch_pinned(pins, kernel_dir)  # downloads if absent, checks the sha256 either way
    debs.write_lock(lock, pins)
    return pins[0]


def _unpack(deb: Path, uname: str, unpacked: Path, sha256: str) -> None:
    with tempfile.TemporaryDirectory(prefix=".unpack-", dir=unpacked.parent) as tmp:
        root = Path(tmp) / "root"
        debs.extract_debs([deb], root)
        staged = Path(tmp) / "staged"
        staged.mkdir()
        for src, dst in (
            (root / "boot" / f"vmlinuz-{uname}", staged / "vmlinuz"),
            (root / "boot" / f"config-{uname}", staged / "config"),
            (root / "lib" / "modules" / uname, staged / "modules"),
        ):
            if not src.exists():
                raise RuntimeFailure(f"{deb.name} has no {src.relative_to(root)}")
            os.replace(src, dst)
        (staged / _STAMP).write_text(sha256 + "\n")
        if unpacked.exists():
            shutil.rmtree(unpacked)
        os.replace(staged, unpacked)


def _bundle(unpacked: Path, uname: str, pin: debs.Pin) -> KernelBundle:
    return KernelBundle(
        bzimage=unpacked / "vmlinuz",
        version=uname,
        config=unpacked / "config",
        modules_dir=unpacked / "modules",
        deb_version=pin.version,
        deb_sha256=pin.sha256,
    )


def kernel_release_of(bzimage: Path) -> str:
    """The release string embedded in a bzImage (``file`` shows it; parsed here from the setup header)."""
    data = bzimage.read_bytes()
    if len(data) < 0x210 or data[0x202:0x206] != b"HdrS":
        raise RuntimeFailure(f"{bzimage}: not a bzImage")
    offset = int.from_bytes(data[0x20E:0x210], "little") + 0x200
    end = data.find(b"\0", offset)
    return data[offset:end].decode(errors="replace").split(" ", 1)[0]


__all__ = ["KernelBundle", "ensure_kernel", "kernel_release_of", "newest_release", "read_config"]
