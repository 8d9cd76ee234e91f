"""OCI and Docker schema2 manifests, indexes and image configs: parsed once, validated at the edge.

Everything here is pure: bytes in, frozen dataclasses out, ``ImageError`` naming the bad field otherwise.
Sizes are checked before ``json.loads`` and counts after, so a hostile registry or archive cannot make us
allocate more than ``MAX_MANIFEST_SIZE``/``MAX_CONFIG_SIZE`` bytes of JSON.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from salmiac.errors import ImageError, RequestError

# Media types ---------------------------------------------------------------------------------------------

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
#: What a registry client sends in ``Accept`` when pulling a manifest.
ACCEPTED_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

# Bounds on untrusted input -------------------------------------------------------------------------------

#: The distribution registry refuses manifests over 4 MiB; so do we (manifest, index, index.json).
MAX_MANIFEST_SIZE = 4 << 20
#: Image configs carry history and env; real ones are a few KiB, big ones under 1 MiB.
MAX_CONFIG_SIZE = 8 << 20
MAX_LAYERS = 500
MAX_INDEX_ENTRIES = 1000
MAX_ANNOTATIONS = 256
MAX_STRING = 64 << 10
MAX_MEDIA_TYPE = 255
#: JSON nesting in the documents we accept is shallow; anything deeper is refused before json.loads.
MAX_JSON_DEPTH = 64

_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


_LAYER_COMPRESSION: dict[str, Compression] = {
    OCI_LAYER: Compression.NONE,
    OCI_LAYER_GZIP: Compression.GZIP,
    OCI_LAYER_ZSTD: Compression.ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": Compression.NONE,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": Compression.GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": Compression.ZSTD,
    DOCKER_LAYER_GZIP: Compression.GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": Compression.GZIP,
}


def layer_compression(media_type: str) -> Compression:
    """Compression of a layer blob from its media type; ImageError for anything that is not a tar layer."""
    try:
        return _LAYER_COMPRESSION[media_type]
    except KeyError:
        raise ImageError(f"unsupported layer media type {media_type!r}") from None


# Digests -------------------------------------------------------------------------------------------------


def validate_digest(unsafe: object, what: str = "digest") -> str:
    if not isinstance(unsafe, str) or not _DIGEST_RE.match(unsafe):
        raise ImageError(f"invalid {what} {_show(unsafe)}: expected sha256:<64 hex> or sha512:<128 hex>")
    return unsafe


def is_digest(text: str) -> bool:
    return bool(_DIGEST_RE.match(text))


def digest_hasher(digest: str) -> hashlib._Hash:
    algorithm = digest.split(":", 1)[0]
    return hashlib.sha512() if algorithm == "sha512" else hashlib.sha256()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def verify_bytes(data: bytes, digest: str, what: str) -> None:
    """ImageError unless ``data`` hashes to ``digest``."""
    hasher = digest_hasher(digest)
    hasher.update(data)
    actual = f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
    if actual != digest:
        raise ImageError(f"{what} {digest}: digest mismatch (content is {actual})")


# Descriptors ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]`` as docker's ``--platform``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise RequestError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    def matches(self, other: Platform) -> bool:
        """Does ``other`` (an index entry) satisfy this request? A missing requested variant matches any."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        return not self.variant or self.variant == other.variant


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            out["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform is not None:
            plat: dict[str, str] = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                plat["variant"] = self.platform.variant
            out["platform"] = plat
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes


@dataclass(frozen=True, slots=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str]
    raw: bytes

    def select(self, platform: Platform) -> Descriptor:
        """The first entry for ``platform``; ImageError listing what is available otherwise."""
        for entry in self.manifests:
            if entry.platform is not None and platform.matches(entry.platform):
                return entry
        available = sorted({str(e.platform) for e in self.manifests if e.platform is not None})
        listed = ", ".join(available) if available else "none declared"
        raise ImageError(f"no {platform} image in the index (available platforms: {listed})")


# Parsing -------------------------------------------------------------------------------------------------


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_depth(data: bytes, what: str) -> None:
    """Refuse deeply nested JSON before json.loads recurses into it (RecursionError is not a clean error)."""
    depth = 0
    in_string = False
    escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ImageError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def load_json(data: bytes, what: str, limit: int) -> dict[str, Any]:
    """Bounded, strict JSON object parse."""
    if len(data) > limit:
        raise ImageError(f"{what}: {len(data)} bytes exceeds the {limit}-byte limit")
    _check_depth(data, what)
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImageError(f"{what}: invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _opt_str(doc: Mapping[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_STRING:
        raise ImageError(f"{what}: {key} must be a string, got {_show(value)}")
    return value


def _str_map(value: object, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ImageError(f"{what} must be an object of strings")
    if len(value) > MAX_ANNOTATIONS:
        raise ImageError(f"{what}: more than {MAX_ANNOTATIONS} entries")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > MAX_STRING or len(item) > MAX_STRING:
            raise ImageError(f"{what}: {_show(key)} must map to a string")
    return dict(value)


def parse_platform(value: object, what: str) -> Platform | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ImageError(f"{what}: platform must be an object")
    os_name = _opt_str(value, "os", what)
    arch = _opt_str(value, "architecture", what)
    if not os_name or not arch:
        raise ImageError(f"{what}: platform needs os and architecture")
    return Platform(os_name, arch, _opt_str(value, "variant", what))


def parse_descriptor(value: object, what: str) -> Descriptor:
    if not isinstance(value, dict):
        raise ImageError(f"{what}: descriptor must be an object")
    media_type = value.get("mediaType")
    if not isinstance(media_type, str) or not media_type or len(media_type) > MAX_MEDIA_TYPE:
        raise ImageError(f"{what}: invalid mediaType {_show(media_type)}")
    digest = validate_digest(value.get("digest"), f"{what} digest")
    size = value.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{what}: invalid size {_show(size)}")
    annotations = _str_map(value.get("annotations"), f"{what} annotations")
    platform = parse_platform(value.get("platform"), what)
    return Descriptor(media_type, digest, size, annotations, platform)


def _document_type(doc: Mapping[str, Any], hint: str | None, what: str) -> str:
    """The media type of a manifest/index: its own ``mediaType`` field, else the transport's hint."""
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ImageError(f"{what}: mediaType must be a string")
    if doc.get("schemaVersion") == 1 or declared in DOCKER_SCHEMA1 or hint in DOCKER_SCHEMA1:
        raise ImageError(f"{what}: Docker schema 1 manifests are not supported; re-push the image")
    if doc.get("schemaVersion") != 2:
        raise ImageError(f"{what}: unsupported schemaVersion {_show(doc.get('schemaVersion'))}")
    if declared:
        return declared
    if hint:
        return hint
    # OCI allows omitting mediaType: an index has "manifests", an image manifest has "config".
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    raise ImageError(f"{what}: cannot tell manifest from index (no mediaType)")


def parse_manifest_or_index(data: bytes, media_type_hint: str | None = None, what: str = "manifest") -> (
    Manifest | Index
):
    """Parse an image manifest or an index/manifest list."""
    doc = load_json(data, what, MAX_MANIFEST_SIZE)
    kind = _document_type(doc, media_type_hint, what)
    if kind in INDEX_TYPES:
        return _parse_index(doc, kind, data, what)
    if kind in MANIFEST_TYPES:
        return _parse_manifest(doc, kind, data, what)
    raise ImageError(f"{what}: unsupported media type {_show(kind)}")


def parse_manifest(data: bytes, media_type_hint: str | None = None, what: str = "manifest") -> Manifest:
    parsed = parse_manifest_or_index(data, media_type_hint, what)
    if not isinstance(parsed, Manifest):
        raise ImageError(f"{what}: expected an image manifest, got an index")
    return parsed


def parse_index(data: bytes, media_type_hint: str | None = None, what: str = "index") -> Index:
    parsed = parse_manifest_or_index(data, media_type_hint or OCI_INDEX, what)
    if not isinstance(parsed, Index):
        raise ImageError(f"{what}: expected an index, got an image manifest")
    return parsed


def _parse_index(doc: Mapping[str, Any], kind: str, raw: bytes, what: str) -> Index:
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise ImageError(f"{what}: manifests must be a list")
    if len(entries) > MAX_INDEX_ENTRIES:
        raise ImageError(f"{what}: more than {MAX_INDEX_ENTRIES} manifests")
    manifests = tuple(parse_descriptor(e, f"{what} manifests[{i}]") for i, e in enumerate(entries))
    return Index(kind, manifests, _str_map(doc.get("annotations"), f"{what} annotations"), raw)


def _parse_manifest(doc: Mapping[str, Any], kind: str, raw: bytes, what: str) -> Manifest:
    config = parse_descriptor(doc.get("config"), f"{what} config")
    if config.media_type not in CONFIG_TYPES:
        raise ImageError(f"{what}: unsupported config media type {_show(config.media_type)} (not an image)")
    if config.size > MAX_CONFIG_SIZE:
        raise ImageError(f"{what}: config of {config.size} bytes exceeds the {MAX_CONFIG_SIZE}-byte limit")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ImageError(f"{what}: layers must be a list")
    if len(raw_layers) > MAX_LAYERS:
        raise ImageError(f"{what}: {len(raw_layers)} layers exceeds the limit of {MAX_LAYERS}")
    layers = tuple(parse_descriptor(e, f"{what} layers[{i}]") for i, e in enumerate(raw_layers))
    for i, layer in enumerate(layers):
        try:
            layer_compression(layer.media_type)
        except ImageError as exc:
            raise ImageError(f"{what} layers[{i}]: {exc}") from exc
    return Manifest(kind, config, layers, _str_map(doc.get("annotations"), f"{what} annotations"), raw)


# Image config --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """What the converter needs from an image config; ``raw``/``doc`` keep the rest."""

    architecture: str
    os: str
    entrypoint: tuple[str, ...] | None
    cmd: tuple[str, ...] | None
    env: tuple[str, ...]
    working_dir: str
    user: str
    exposed_ports: tuple[str, ...]
    labels: Mapping[str, str]
    stop_signal: str
    diff_ids: tuple[str, ...]
    raw: bytes
    doc: Mapping[str, Any]
    volumes: tuple[str, ...] = ()

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, _opt_str(self.doc, "variant", "config"))


def _opt_str_list(doc: Mapping[str, Any], key: str, what: str) -> tuple[str, ...] | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImageError(f"{what}: {key} must be a list of strings")
    if len(value) > 4096 or sum(len(v) for v in value) > MAX_CONFIG_SIZE:
        raise ImageError(f"{what}: {key} is too long")
    return tuple(value)


def _key_set(value: object, what: str) -> tuple[str, ...]:
    """Docker encodes sets (ExposedPorts, Volumes) as objects with empty-object values."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > 65536:
        raise ImageError(f"{what} must be an object")
    return tuple(sorted(value))


def parse_config(data: bytes, what: str = "config") -> ImageConfig:
    doc = load_json(data, what, MAX_CONFIG_SIZE)
    container = doc.get("config")
    if container is None:
        container = {}
    if not isinstance(container, dict):
        raise ImageError(f"{what}: config must be an object")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ImageError(f"{what}: rootfs must be an object with type 'layers'")
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise ImageError(f"{what}: rootfs.diff_ids must be a list")
    if len(diff_ids) > MAX_LAYERS:
        raise ImageError(f"{what}: {len(diff_ids)} diff_ids exceeds the limit of {MAX_LAYERS}")
    checked_ids = tuple(validate_digest(d, f"{what} diff_id") for d in diff_ids)
    env = _opt_str_list(container, "Env", what) or ()
    for item in env:
        if "=" not in item:
            raise ImageError(f"{what}: Env entry {_show(item)} is not NAME=VALUE")
    return ImageConfig(
        architecture=_opt_str(doc, "architecture", what),
        os=_opt_str(doc, "os", what),
        entrypoint=_opt_str_list(container, "Entrypoint", what),
        cmd=_opt_str_list(container, "Cmd", what),
        env=env,
        working_dir=_opt_str(container, "WorkingDir", what),
        user=_opt_str(container, "User", what),
        exposed_ports=_key_set(container.get("ExposedPorts"), f"{what}: ExposedPorts"),
        volumes=_key_set(container.get("Volumes"), f"{what}: Volumes"),
        labels=_str_map(container.get("Labels"), f"{what}: Labels"),
        stop_signal=_opt_str(container, "StopSignal", what),
        diff_ids=checked_ids,
        raw=data,
        doc=doc,
    )


def manifest_bytes(
    config: Descriptor, layers: list[Descriptor], annotations: Mapping[str, str] | None
) -> bytes:
    """A canonical OCI image manifest: fixed key order, no whitespace, sorted annotations."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True, slots=True)
class LayerBlob:
    """A layer file ready to be written to a destination (the converter's output)."""

    path: str | os.PathLike[str]
    media_type: str
    digest: str
    size: int
    diff_id: str

    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size)
