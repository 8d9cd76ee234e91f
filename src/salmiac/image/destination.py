"""Write an image (config + layer files) as an OCI image manifest to any supported destination.

The manifest is built here, once, canonically (``models.manifest_bytes``): same config and layers → same
bytes → same digest, whichever destination receives it. Layer files are re-hashed while they are copied or
uploaded, so a layer that changed on disk after it was described is an error, not a corrupt image.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from salmiac.errors import ImageError, RequestError
from salmiac.image.auth import Credentials, resolve_credentials
from salmiac.image.docker_archive import write_docker_archive
from salmiac.image.models import (
    MAX_CONFIG_SIZE,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    LayerBlob,
    layer_compression,
    manifest_bytes,
    parse_config,
    sha256_digest,
    validate_digest,
)
from salmiac.image.oci_layout import write_layout, write_layout_archive
from salmiac.image.reference import (
    DaemonReference,
    DockerArchiveReference,
    ImageReference,
    LayoutReference,
    RegistryReference,
    as_reference,
)
from salmiac.image.registry import RegistryClient, file_opener

__all__ = ["LayerBlob", "WrittenImage", "build_manifest", "write_image"]


@dataclass(frozen=True, slots=True)
class WrittenImage:
    reference: str
    manifest_digest: str
    manifest_bytes: bytes


def build_manifest(
    config: bytes, layers: Sequence[LayerBlob], annotations: Mapping[str, str] | None = None
) -> tuple[bytes, str, str]:
    """Validate the parts and return ``(manifest bytes, manifest digest, config digest)``."""
    if len(config) > MAX_CONFIG_SIZE:
        raise ImageError(f"output config: {len(config)} bytes exceeds the {MAX_CONFIG_SIZE}-byte limit")
    parsed = parse_config(config, "output config")
    if list(parsed.diff_ids) != [layer.diff_id for layer in layers]:
        raise ImageError("output config: rootfs.diff_ids do not match the layers being written")
    for layer in layers:
        validate_digest(layer.digest, f"layer {layer.path} digest")
        validate_digest(layer.diff_id, f"layer {layer.path} diff_id")
        layer_compression(layer.media_type)
    config_digest = sha256_digest(config)
    config_desc = Descriptor(OCI_CONFIG, config_digest, len(config))
    raw = manifest_bytes(config_desc, [layer.descriptor() for layer in layers], annotations)
    return raw, sha256_digest(raw), config_digest


def write_image(
    dest: str | ImageReference,
    *,
    config: bytes,
    layers: Sequence[LayerBlob],
    credentials: Credentials | None = None,
    tls_verify: bool = True,
    ca_file: str | None = None,
    annotations: Mapping[str, str] | None = None,
) -> WrittenImage:
    reference = as_reference(dest)
    manifest, digest, config_digest = build_manifest(config, layers, annotations)
    if isinstance(reference, LayoutReference):
        writer = write_layout_archive if reference.archive else write_layout
        writer(reference.path, reference.tag, manifest=manifest, manifest_digest=digest, config=config,
               config_digest=config_digest, layers=layers)
    elif isinstance(reference, DockerArchiveReference):
        if reference.index is not None:
            raise RequestError(f"{reference}: @N selects an image to read; to write, give NAME:TAG or nothing")
        write_docker_archive(reference.path, reference.name, config=config, layers=layers)
    elif isinstance(reference, RegistryReference):
        _push(reference, manifest, digest, config, config_digest, layers, credentials, tls_verify, ca_file)
    elif isinstance(reference, DaemonReference):
        raise RequestError(f"{reference}: writing to the docker engine is not supported; "
                           "write a docker-archive: and `docker load` it")
    return WrittenImage(str(reference), digest, manifest)


def _push(
    ref: RegistryReference,
    manifest: bytes,
    digest: str,
    config: bytes,
    config_digest: str,
    layers: Sequence[LayerBlob],
    credentials: Credentials | None,
    tls_verify: bool,
    ca_file: str | None,
) -> None:
    name = ref.name
    if name.digest is not None and name.digest != digest:
        raise RequestError(f"{ref}: pushing by digest, but the image's digest is {digest}")
    creds = resolve_credentials(name.registry, name.repository, credentials)
    client = RegistryClient(name.endpoint, credentials=creds, tls_verify=tls_verify, ca_file=ca_file,
                            name=name.registry)
    for layer in layers:
        client.push_blob(name.repository, layer.descriptor(), file_opener(layer.path))
    config_desc = Descriptor(OCI_CONFIG, config_digest, len(config))
    client.push_blob(name.repository, config_desc, lambda: io.BytesIO(config))
    client.put_manifest(name.repository, name.tag or digest, manifest, OCI_MANIFEST)

