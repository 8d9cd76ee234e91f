"""Our own code inside the enclave: the salmiac modules the init needs and the /init entry point.

Only ``salmiac/__init__.py``, ``errors.py``, ``framepump.py`` (shared with the parent's relay), ``rootfs/verity.py``
(dm-verity parameters and activation), ``salmiac/protocol/``
and ``salmiac/enclave/`` ship (the enclave never imports the parent or converter side; a test checks that every
``salmiac`` import of the shipped modules resolves inside this set).
Sources travel with pre-compiled, unchecked-hash .pyc files so the guest never compiles
at boot (slow under TCG) and the bytes do not depend on file mtimes.
"""

from __future__ import annotations

import importlib.util
import io
import marshal
import sys
from pathlib import Path
from typing import Final

import salmiac
from salmiac.rootfs.cpio import CpioWriter

ENCLAVE_PACKAGES: Final = ("protocol", "enclave")
ENCLAVE_MODULES: Final = ("__init__.py", "errors.py", "framepump.py", "rootfs/__init__.py", "rootfs/verity.py")
LIB_DIR: Final = "salmiac/lib"  # in the initramfs; /init puts it on sys.path
PYTHON: Final = "/usr/bin/python3.11"
INIT_SCRIPT: Final = f"""#!{PYTHON} -IS
# salmiac enclave init: PID 1. Everything it runs is measured (PCR1: kernel, cmdline, this ramdisk).
import sys
sys.path.insert(0, "/{LIB_DIR}")
from salmiac.enclave.init import main
main()
""".encode()


def _package_root() -> Path:
    return Path(salmiac.__file__).parent


def enclave_sources() -> list[tuple[str, Path]]:
    """(archive path relative to LIB_DIR, host path), sorted."""
    root = _package_root()
    files = [(f"salmiac/{name}", root / name) for name in ENCLAVE_MODULES]
    for pkg in ENCLAVE_PACKAGES:
        for path in sorted((root / pkg).glob("*.py")):
            files.append((f"salmiac/{pkg}/{path.name}", path))
    return sorted(files)


def _pyc(source: bytes, name: str) -> bytes:
    """An unchecked-hash pyc (PEP 552): flags=0b01, then the source hash; independent of mtimes."""
    code = compile(source, name, "exec", dont_inherit=True, optimize=0)
    source_hash = importlib.util.source_hash(source)
    return importlib.util.MAGIC_NUMBER + (1).to_bytes(4, "little") + source_hash + marshal.dumps(code)


def write_package(writer: CpioWriter) -> None:
    """Add /init and our modules (with their pycs) to an open cpio archive."""
    writer.add_file("init", INIT_SCRIPT, mode=0o755)
    dirs: set[str] = set()
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    for rel, host in enclave_sources():
        arc = f"{LIB_DIR}/{rel}"
        parts = arc.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                writer.add_dir(d, mode=0o755)
        source = host.read_bytes()
        writer.add_file(arc, source, mode=0o644)
        cache_dir = "/".join(parts[:-1]) + "/__pycache__"
        if cache_dir not in dirs:
            dirs.add(cache_dir)
            writer.add_dir(cache_dir, mode=0o755)
        stem = parts[-1][:-3]
        writer.add_file(f"{cache_dir}/{stem}.{tag}.pyc", _pyc(source, f"/{arc}"), mode=0o644)


def package_cpio() -> bytes:
    buf = io.BytesIO()
    writer = CpioWriter(buf)
    write_package(writer)
    writer.finish()
    return buf.getvalue()
