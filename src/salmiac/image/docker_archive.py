"""``docker save`` tarballs (``docker-archive:FILE[:REF|:@N]``): read and write.

Reading: ``manifest.json`` (bounded) picks the image — by ``REF`` among ``RepoTags``, by ``@N``, or the only
one. The config and every layer are copied into the blob cache, which computes their digests (the archive
names them but does not carry descriptors), and an OCI manifest is synthesised from those digests, so the
rest of the converter sees the same ``Manifest`` as for any other transport. Uncompressed layers must hash
to the config's ``diff_ids``. Member names are only lookup keys (see ``archive.ArchiveFiles``).

Writing produces what ``docker load`` and ``skopeo`` read: ``<config hex>.json``, ``<diff_id hex>.tar``
uncompressed layers, ``manifest.json`` and (with a name) ``repositories``, deterministically, into
``FILE.tmp`` renamed to ``FILE``. No legacy v1 ``<id>/layer.tar`` directories are written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from salmiac.errors import ImageError, RequestError
from salmiac.image.archive import ArchiveFiles
from salmiac.image.cache import BlobCache
from salmiac.image.compression import decompressed, sniff
from salmiac.image.models import (
    MAX_CONFIG_SIZE,
    MAX_LAYERS,
    MAX_MANIFEST_SIZE,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    Compression,
    Descriptor,
    LayerBlob,
    Manifest,
    digest_hasher,
    layer_compression,
    manifest_bytes,
    parse_config,
    parse_manifest,
    sha256_digest,
)
from salmiac.image.oci_layout import DeterministicTar, atomic_output
from salmiac.image.reference import DockerName, parse_docker_name

MANIFEST_FILE = "manifest.json"
REPOSITORIES_FILE = "repositories"
MAX_ARCHIVE_IMAGES = 1000
_MEDIA_BY_COMPRESSION = {
    Compression.NONE: OCI_LAYER,
    Compression.GZIP: OCI_LAYER_GZIP,
    Compression.ZSTD: OCI_LAYER_ZSTD,
}
_HEX_NAME = re.compile(r"(?:^|/)(?:sha256[:/])?([a-f0-9]{64})(?:\.json)?$")


@dataclass(frozen=True, slots=True)
class ArchiveImage:
    manifest: Manifest
    manifest_digest: str


@dataclass(frozen=True, slots=True)
class _Entry:
    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def _parse_entries(data: bytes, what: str) -> list[_Entry]:
    if len(data) > MAX_MANIFEST_SIZE:
        raise ImageError(f"{what}: manifest.json exceeds {MAX_MANIFEST_SIZE} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what}: manifest.json is not valid JSON: {exc}") from exc
    if not isinstance(doc, list) or not doc:
        raise ImageError(f"{what}: manifest.json must be a non-empty list")
    if len(doc) > MAX_ARCHIVE_IMAGES:
        raise ImageError(f"{what}: manifest.json lists more than {MAX_ARCHIVE_IMAGES} images")
    entries = []
    for i, item in enumerate(doc):
        where = f"{what}: manifest.json[{i}]"
        if not isinstance(item, dict):
            raise ImageError(f"{where}: must be an object")
        config, tags, layers = item.get("Config"), item.get("RepoTags") or [], item.get("Layers")
        if not isinstance(config, str) or not config:
            raise ImageError(f"{where}: Config must be a file name")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ImageError(f"{where}: RepoTags must be a list of strings")
        if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
            raise ImageError(f"{where}: Layers must be a list of file names")
        if len(layers) > MAX_LAYERS:
            raise ImageError(f"{where}: more than {MAX_LAYERS} layers")
        entries.append(_Entry(config, tuple(tags), tuple(layers)))
    return entries


def _same_name(tag: str, wanted: DockerName) -> bool:
    try:
        name = parse_docker_name(tag)
    except RequestError:
        return False
    return (name.registry, name.repository, name.tag) == (wanted.registry, wanted.repository, wanted.tag)


def _select(entries: list[_Entry], name: DockerName | None, index: int | None, what: str) -> _Entry:
    if index is not None:
        if index >= len(entries):
            raise ImageError(f"{what}: no image @{index} (the archive holds {len(entries)})")
        return entries[index]
    if name is not None:
        for entry in entries:
            if any(_same_name(tag, name) for tag in entry.repo_tags):
                return entry
        listed = ", ".join(t for e in entries for t in e.repo_tags) or "none"
        raise ImageError(f"{what}: no image named {name.familiar()} (tags: {listed})")
    if len(entries) > 1:
        listed = ", ".join(t for e in entries for t in e.repo_tags) or "untagged"
        raise ImageError(f"{what}: holds {len(entries)} images; pick one with :NAME:TAG or :@N ({listed})")
    return entries[0]


def read_docker_archive(
    files: ArchiveFiles, name: DockerName | None, index: int | None, cache: BlobCache, what: str
) -> ArchiveImage:
    """Select an image, move its config and layers into ``cache``, return a synthesised OCI manifest."""
    entry = _select(_parse_entries(files.read(MANIFEST_FILE, MAX_MANIFEST_SIZE), what), name, index, what)
    config_bytes = files.read(entry.config, MAX_CONFIG_SIZE)
    config_digest = sha256_digest(config_bytes)
    named = _HEX_NAME.search(entry.config)
    if named and f"sha256:{named.group(1)}" != config_digest:
        raise ImageError(f"{what}: config {entry.config}: digest mismatch (content is {config_digest})")
    config = parse_config(config_bytes, f"{what}: config")
    if len(config.diff_ids) != len(entry.layers):
        raise ImageError(
            f"{what}: config lists {len(config.diff_ids)} diff_ids but the archive has {len(entry.layers)} layers"
        )
    config_desc = Descriptor(OCI_CONFIG, config_digest, len(config_bytes))
    cache.put_bytes(config_bytes, config_desc, "config")
    layers: list[Descriptor] = []
    seen: dict[str, Descriptor] = {}
    for position, layer_name in enumerate(entry.layers):
        desc = seen.get(layer_name)
        if desc is None:
            cache.check_size(Descriptor(OCI_LAYER, config_digest, files.size(layer_name)), "layer")
            with files.open(layer_name) as member:
                digest, size = cache.ingest(member, what=f"{what}: layer {layer_name}")
            with cache.open(digest) as cached:
                compression = sniff(cached.read(4))
            desc = Descriptor(_MEDIA_BY_COMPRESSION[compression], digest, size)
            seen[layer_name] = desc
        if desc.media_type == OCI_LAYER and desc.digest != config.diff_ids[position]:
            raise ImageError(
                f"{what}: layer {layer_name}: content {desc.digest} does not match diff_id "
                f"{config.diff_ids[position]}"
            )
        layers.append(desc)
    raw = manifest_bytes(config_desc, layers, None)
    return ArchiveImage(parse_manifest(raw, what=f"{what}: manifest"), sha256_digest(raw))


# Writing -------------------------------------------------------------------------------------------------


def chain_id(diff_ids: Sequence[str]) -> str:
    """The OCI ChainID of a layer stack (identifies the top layer in ``repositories``)."""
    chain = diff_ids[0]
    for diff_id in diff_ids[1:]:
        chain = "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def _uncompressed_copy(layer: LayerBlob, temp_dir: str | None) -> BinaryIO:
    """Decompress a layer into a temp file, checking both its digest and its diff_id."""
    compression = layer_compression(layer.media_type)
    out = tempfile.TemporaryFile(dir=temp_dir)  # noqa: SIM115 - returned to the caller
    blob_hasher = digest_hasher(layer.digest)
    diff_hasher = digest_hasher(layer.diff_id)

    class _Tee:
        def __init__(self, src: BinaryIO) -> None:
            self.src = src

        def read(self, n: int = -1) -> bytes:
            chunk = self.src.read(n)
            blob_hasher.update(chunk)
            return chunk

        def readinto(self, buffer: Any) -> int:
            chunk = self.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    try:
        with open(layer.path, "rb") as src:
            stream = decompressed(cast(BinaryIO, _Tee(src)), compression)
            while chunk := stream.read(1 << 20):
                diff_hasher.update(chunk)
                out.write(chunk)
            blob_hasher.update(src.read())  # trailing bytes after the compressed stream count too
    except BaseException:
        out.close()
        raise
    for wanted, hasher, label in ((layer.digest, blob_hasher, "digest"), (layer.diff_id, diff_hasher, "diff_id")):
        actual = f"{wanted.split(':', 1)[0]}:{hasher.hexdigest()}"
        if actual != wanted:
            out.close()
            raise ImageError(f"layer {layer.path}: {label} mismatch (expected {wanted}, content is {actual})")
    out.flush()
    out.seek(0)
    return out


def write_docker_archive(
    path: str,
    name: DockerName | None,
    *,
    config: bytes,
    layers: Sequence[LayerBlob],
    temp_dir: str | None = None,
) -> None:
    """Write a ``docker save`` tarball of one image (replacing ``path``)."""
    config_hex = hashlib.sha256(config).hexdigest()
    parsed = parse_config(config, "output config")
    diff_ids = [layer.diff_id for layer in layers]
    if list(parsed.diff_ids) != diff_ids:
        raise ImageError("output config: rootfs.diff_ids do not match the layers being written")
    repo_tags: list[str] = []
    if name is not None:
        if name.digest is not None or not name.tag:
            raise RequestError(f"docker-archive:{path}: the image name needs a tag and no digest")
        repo_tags.append(name.familiar())
    layer_names = [layer.diff_id.split(":", 1)[1] + ".tar" for layer in layers]
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": repo_tags, "Layers": layer_names}]
    with atomic_output(path) as handle:
        tar = DeterministicTar(handle)
        tar.add_bytes(f"{config_hex}.json", config)
        written: set[str] = set()
        for layer, member in zip(layers, layer_names, strict=True):
            if member in written:
                continue
            written.add(member)
            if layer_compression(layer.media_type) is Compression.NONE:
                if layer.digest != layer.diff_id:
                    raise ImageError(f"layer {layer.path}: uncompressed but digest differs from diff_id")
                tar.add_file(member, layer.path, layer.size, layer.digest)
                continue
            with _uncompressed_copy(layer, temp_dir or os.path.dirname(os.path.abspath(path))) as plain:
                size = os.fstat(plain.fileno()).st_size
                tar.add_stream(member, plain, size)
        tar.add_bytes(MANIFEST_FILE, json.dumps(manifest, separators=(",", ":")).encode())
        if name is not None and layers:
            familiar_repo = name.familiar().rsplit(":", 1)[0]
            top = chain_id(diff_ids).split(":", 1)[1]
            repositories = {familiar_repo: {name.tag: top}}
            tar.add_bytes(REPOSITORIES_FILE, json.dumps(repositories, separators=(",", ":")).encode())
        tar.close()
