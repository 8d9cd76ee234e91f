"""Open an image from any supported transport: manifest, config and verified blobs.

``open_image()`` resolves the reference down to one linux/amd64 (or the requested platform) image manifest,
checks it, loads and parses its config, and returns an ``ImageSource``. Blobs are always served from the
content-addressed ``BlobCache``: a blob is copied there (size and digest verified) the first time it is
opened, so ``open_blob()`` returns a file whose every byte has already been checked — the caller does not
have to read to EOF for verification to happen, and the bytes cannot change under it afterwards.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO, cast

from salmiac.errors import ImageError
from salmiac.image.archive import ArchiveFiles
from salmiac.image.auth import Credentials, resolve_credentials
from salmiac.image.cache import BlobCache
from salmiac.image.compression import decompressed, sniff
from salmiac.image.daemon import save_image
from salmiac.image.docker_archive import read_docker_archive
from salmiac.image.models import (
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    layer_compression,
    parse_config,
    parse_manifest_or_index,
)
from salmiac.image.oci_layout import OciLayout, open_layout
from salmiac.image.reference import (
    DaemonReference,
    DockerArchiveReference,
    ImageReference,
    LayoutReference,
    RegistryReference,
    as_reference,
)
from salmiac.image.registry import RegistryClient

log = logging.getLogger(__name__)

#: An index may point at another index; real images nest at most once.
MAX_INDEX_DEPTH = 3

Fetcher = Callable[[Descriptor, str], None]


class ImageSource:
    """One resolved image. Use as a context manager or call ``close()``."""

    def __init__(
        self,
        reference: ImageReference,
        *,
        manifest: Manifest,
        manifest_digest: str,
        cache: BlobCache,
        fetch: Fetcher,
        platform: Platform,
        index: Index | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.reference = reference
        self.manifest = manifest
        self.manifest_digest = manifest_digest
        self.index = index
        self.layers: list[Descriptor] = list(manifest.layers)
        self._cache = cache
        self._fetch = fetch
        self._on_close = on_close
        try:
            self.config: ImageConfig = self._load_config(platform)
        except BaseException:
            self.close()
            raise

    def _load_config(self, platform: Platform) -> ImageConfig:
        desc = self.manifest.config
        if desc.size > MAX_CONFIG_SIZE:
            raise ImageError(f"config {desc.digest}: size {desc.size} exceeds the {MAX_CONFIG_SIZE}-byte limit")
        with self.open_blob(desc) as handle:
            data = handle.read(MAX_CONFIG_SIZE + 1)
        config = parse_config(data, f"config {desc.digest}")
        if len(config.diff_ids) != len(self.layers):
            raise ImageError(
                f"config {desc.digest}: {len(config.diff_ids)} diff_ids for {len(self.layers)} layers"
            )
        if config.os and config.architecture and not platform.matches(config.platform):
            raise ImageError(f"image {self.reference} is {config.platform}, not {platform}")
        return config

    def _what(self, desc: Descriptor) -> str:
        if desc.digest == self.manifest.config.digest:
            return "config"
        return "layer" if any(layer.digest == desc.digest for layer in self.layers) else "blob"

    def open_blob(self, desc: Descriptor) -> BinaryIO:
        """The blob's bytes, verified against ``desc`` (digest and size) before this returns."""
        what = self._what(desc)
        self._cache.check_size(desc, what)
        if not self._cache.has(desc.digest):
            self._fetch(desc, what)
        return self._cache.open(desc.digest, desc.size, what)

    def open_layer(self, desc: Descriptor) -> BinaryIO:
        """The layer's uncompressed tar stream (the blob itself is verified; the diff_id is not).

        The compression is taken from the blob's magic bytes, not its media type: skopeo 1.9 writes
        uncompressed layers labelled ``+gzip`` when copying with ``--dest-oci-accept-uncompressed-layers``,
        and containers/image itself sniffs. The media type must still name a tar layer.
        """
        layer_compression(desc.media_type)
        blob = self.open_blob(desc)
        compression = sniff(blob.read(4))
        blob.seek(0)
        return decompressed(blob, compression, owns_source=True)

    def close(self) -> None:
        if self._on_close is not None:
            on_close, self._on_close = self._on_close, None
            on_close()

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _resolve(
    load: Callable[[Descriptor | None], tuple[bytes, str | None, str]], platform: Platform, what: str
) -> tuple[Manifest, str, Index | None]:
    """Follow index → manifest. ``load(None)`` fetches the top document, ``load(desc)`` a child."""
    data, hint, digest = load(None)
    top_index: Index | None = None
    for _depth in range(MAX_INDEX_DEPTH + 1):
        parsed = parse_manifest_or_index(data, hint, f"{what}: manifest {digest}")
        if isinstance(parsed, Manifest):
            return parsed, digest, top_index
        top_index = top_index or parsed
        chosen = parsed.select(platform)
        data, _hint, digest = load(chosen)
        hint = chosen.media_type
        if len(data) != chosen.size:
            raise ImageError(f"{what}: manifest {digest}: size mismatch (index says {chosen.size})")
    raise ImageError(f"{what}: indexes nested deeper than {MAX_INDEX_DEPTH}")


def _open_registry(
    ref: RegistryReference,
    *,
    credentials: Credentials | None,
    cache: BlobCache,
    platform: Platform,
    tls_verify: bool,
    ca_file: str | None,
) -> ImageSource:
    name = ref.name
    creds = resolve_credentials(name.registry, name.repository, credentials)
    client = RegistryClient(
        name.endpoint, credentials=creds, tls_verify=tls_verify, ca_file=ca_file, name=name.registry
    )

    def load(desc: Descriptor | None) -> tuple[bytes, str | None, str]:
        data, media_type, digest = client.get_manifest(name.repository, desc.digest if desc else name.reference)
        return data, media_type or None, digest

    manifest, digest, index = _resolve(load, platform, str(ref))

    def fetch(desc: Descriptor, what: str) -> None:
        client.fetch_blob(name.repository, desc, cache, what)

    return ImageSource(ref, manifest=manifest, manifest_digest=digest, cache=cache, fetch=fetch,
                       platform=platform, index=index)


def _open_layout(layout: OciLayout, ref: ImageReference, tag: str | None, cache: BlobCache,
                 platform: Platform) -> ImageSource:
    def load(desc: Descriptor | None) -> tuple[bytes, str | None, str]:
        target = desc if desc is not None else layout.resolve(tag)
        return layout.read_blob(target, MAX_MANIFEST_SIZE, "manifest"), target.media_type, target.digest

    def fetch(desc: Descriptor, what: str) -> None:
        with layout.open_blob(desc) as src:
            cache.put(src, desc, what)

    try:
        manifest, digest, index = _resolve(load, platform, str(ref))
    except BaseException:
        layout.close()
        raise
    return ImageSource(ref, manifest=manifest, manifest_digest=digest, cache=cache, fetch=fetch,
                       platform=platform, index=index, on_close=layout.close)


def _no_fetch(desc: Descriptor, what: str) -> None:
    raise ImageError(f"{what} {desc.digest}: not part of the archive")


def _open_docker_archive(path: str, ref: ImageReference, archive_ref: DockerArchiveReference | None,
                         cache: BlobCache, platform: Platform) -> ImageSource:
    what = str(ref)
    files = ArchiveFiles(path, what=what, temp_dir=_temp_dir(cache))
    try:
        image = read_docker_archive(
            files,
            archive_ref.name if archive_ref else None,
            archive_ref.index if archive_ref else None,
            cache,
            what,
        )
    finally:
        files.close()  # everything the image needs is in the cache now
    return ImageSource(ref, manifest=image.manifest, manifest_digest=image.manifest_digest, cache=cache,
                       fetch=_no_fetch, platform=platform)


def _temp_dir(cache: BlobCache) -> str:
    path = cache.root / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _open_daemon(ref: DaemonReference, cache: BlobCache, platform: Platform) -> ImageSource:
    with tempfile.NamedTemporaryFile(dir=_temp_dir(cache), prefix="daemon-", suffix=".tar") as tmp:
        save_image(ref.api_name, cast(BinaryIO, tmp))
        tmp.flush()
        # The engine's archive holds exactly the image asked for (plus perhaps other tags of it).
        return _open_docker_archive(tmp.name, ref, DockerArchiveReference(tmp.name, index=0), cache, platform)


def open_image(
    ref: str | ImageReference,
    *,
    credentials: Credentials | None = None,
    cache: BlobCache,
    platform: str = "linux/amd64",
    tls_verify: bool = True,
    ca_file: str | None = None,
) -> ImageSource:
    """Resolve ``ref`` to one image for ``platform``; RequestError/ImageError/RegistryError otherwise."""
    reference = as_reference(ref)
    wanted = Platform.parse(platform)
    if isinstance(reference, RegistryReference):
        return _open_registry(reference, credentials=credentials, cache=cache, platform=wanted,
                              tls_verify=tls_verify, ca_file=ca_file)
    if isinstance(reference, LayoutReference):
        layout = open_layout(reference.path, reference.archive, temp_dir=_temp_dir(cache))
        return _open_layout(layout, reference, reference.tag, cache, wanted)
    if isinstance(reference, DockerArchiveReference):
        if not os.path.exists(reference.path):
            raise ImageError(f"{reference}: no such file")
        return _open_docker_archive(reference.path, reference, reference, cache, wanted)
    return _open_daemon(reference, cache, wanted)
