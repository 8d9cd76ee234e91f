"""Find the enclave bundle (/opt/salmiac: run.json + enclave.eif) in a converted image.

Used by ``salmiac run IMAGE`` outside a container. Layers are scanned last to first as tar streams; only the two
regular files we wrote are taken, by exact name, with size caps, into a cache directory keyed by the image's
manifest digest (written under a temp name, then renamed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Final

from salmiac.errors import ImageError, SalmiacError
from salmiac.image.cache import BlobCache
from salmiac.image.source import open_image
from salmiac.runconfig import BUNDLE_DIR, EIF_NAME, ROOTFS_IMAGE_NAME, RUN_CONFIG_NAME, RunConfig

MAX_RUN_CONFIG: Final = 1 << 20
MAX_EIF: Final = 16 << 30
MAX_ROOTFS_IMAGE: Final = 1 << 40
REQUIRED: Final = {f"{BUNDLE_DIR}/{RUN_CONFIG_NAME}": MAX_RUN_CONFIG, f"{BUNDLE_DIR}/{EIF_NAME}": MAX_EIF}
WANTED: Final = {**REQUIRED, f"{BUNDLE_DIR}/{ROOTFS_IMAGE_NAME}": MAX_ROOTFS_IMAGE}


def _member_name(name: str) -> str:
    return os.path.normpath("/" + name).lstrip("/")


def _complete(target: Path) -> bool:
    if not all((target / Path(n).name).is_file() for n in REQUIRED):
        return False
    try:
        run = RunConfig.from_json((target / RUN_CONFIG_NAME).read_bytes())
    except (OSError, SalmiacError):
        return False
    return not run.rootfs_image or (target / run.rootfs_image).is_file()


def extract_bundle(image: str, cache_dir: Path, *, tls_verify: bool = True, ca_file: str | None = None) -> Path:
    """Directory holding run.json and enclave.eif of the converted ``image``."""
    source = open_image(image, cache=BlobCache(cache_dir / "blobs"), tls_verify=tls_verify, ca_file=ca_file)
    try:
        digest = source.manifest_digest
        target = cache_dir / "bundles" / digest.replace(":", "-")
        if _complete(target):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=target.parent))
        try:
            found: set[str] = set()
            for desc in reversed(source.layers):
                with contextlib.closing(source.open_layer(desc)) as stream, \
                        tarfile.open(fileobj=stream, mode="r|") as tar:
                    for member in tar:
                        name = _member_name(member.name)
                        if name not in WANTED or name in found:
                            continue
                        if not member.isreg():
                            raise ImageError(f"{image}: /{name} is not a regular file")
                        if member.size > WANTED[name]:
                            raise ImageError(f"{image}: /{name} is larger than {WANTED[name]} bytes")
                        src = tar.extractfile(member)
                        if src is None:
                            raise ImageError(f"{image}: cannot read /{name}")
                        with open(tmp / Path(name).name, "wb") as out:
                            shutil.copyfileobj(src, out, 1 << 20)
                        found.add(name)
                if set(REQUIRED) <= found:
                    break  # the bundle is one layer: what it lacks now, it does not have
            missing = sorted(set(REQUIRED) - found)
            if missing:
                raise ImageError(f"{image}: not a salmiac-converted image (no /{missing[0]})")
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    finally:
        source.close()
