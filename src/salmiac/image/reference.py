"""Image references, spelled as skopeo spells them; bare names normalised exactly as docker does.

    oci:DIR[:TAG]                     OCI image layout directory
    oci-archive:FILE[:TAG]            tar of an OCI image layout
    docker-archive:FILE[:REF|:@N]     ``docker save`` tarball (REF = name:tag inside it, @N = Nth image)
    docker://NAME                     registry (NAME normalised as below)
    docker-daemon:NAME|ID             docker engine (``GET /images/NAME/get``)
    NAME                              registry: ``busybox`` → ``docker.io/library/busybox:latest``

For the file transports the path ends at the first ``:`` (as in skopeo), so paths cannot contain ``:``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from salmiac.errors import RequestError

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
#: Where docker.io is actually served from.
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

MAX_NAME_LENGTH = 255  # distribution/reference: NameTotalLengthMax
MAX_REFERENCE_LENGTH = 4096

# distribution/reference grammar
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_COMPONENT_RE = re.compile(rf"^{_PATH_COMPONENT}$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
_HEX64_RE = re.compile(r"^[a-f0-9]{64}$")
# OCI image layout ref.name: components of [A-Za-z0-9]+ separated by [-._:@/+] (or "--").
_OCI_TAG_RE = re.compile(r"^[A-Za-z0-9]+(?:(?:[-._:@/+]|--)[A-Za-z0-9]+)*$")

#: skopeo transports that exist but we do not read or write.
#: ``docker:NAME`` without ``//`` is skopeo's syntax error but a valid bare name (the ``docker`` image).
_UNSUPPORTED_TRANSPORTS = frozenset({"dir", "containers-storage", "ostree", "sif", "tarball", "atomic"})


class Transport(enum.Enum):
    OCI = "oci"
    OCI_ARCHIVE = "oci-archive"
    DOCKER_ARCHIVE = "docker-archive"
    REGISTRY = "docker"
    DAEMON = "docker-daemon"


@dataclass(frozen=True, slots=True)
class DockerName:
    """A normalised docker reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def endpoint(self) -> str:
        """host[:port] to connect to."""
        return DOCKER_HUB_ENDPOINT if self.registry == DEFAULT_REGISTRY else self.registry

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """The short form docker prints (``busybox:latest``)."""
        text = str(self)
        if self.registry == DEFAULT_REGISTRY:
            text = text.removeprefix("docker.io/").removeprefix("library/")
        return text


@dataclass(frozen=True, slots=True)
class LayoutReference:
    """``oci:DIR[:TAG]`` or ``oci-archive:FILE[:TAG]``."""

    path: str
    tag: str | None = None
    archive: bool = False

    @property
    def transport(self) -> Transport:
        return Transport.OCI_ARCHIVE if self.archive else Transport.OCI

    def __str__(self) -> str:
        return f"{self.transport.value}:{self.path}" + (f":{self.tag}" if self.tag else "")


@dataclass(frozen=True, slots=True)
class DockerArchiveReference:
    """``docker-archive:FILE[:name:tag]`` or ``docker-archive:FILE:@N``."""

    path: str
    name: DockerName | None = None
    index: int | None = None

    @property
    def transport(self) -> Transport:
        return Transport.DOCKER_ARCHIVE

    def __str__(self) -> str:
        text = f"docker-archive:{self.path}"
        if self.name is not None:
            text += f":{self.name.familiar()}"
        elif self.index is not None:
            text += f":@{self.index}"
        return text


@dataclass(frozen=True, slots=True)
class RegistryReference:
    name: DockerName

    @property
    def transport(self) -> Transport:
        return Transport.REGISTRY

    def __str__(self) -> str:
        return f"docker://{self.name}"


@dataclass(frozen=True, slots=True)
class DaemonReference:
    """``docker-daemon:NAME[:TAG]`` or ``docker-daemon:sha256:<image id>``."""

    name: DockerName | None = None
    image_id: str | None = None

    @property
    def transport(self) -> Transport:
        return Transport.DAEMON

    @property
    def api_name(self) -> str:
        """The name the engine API is asked for."""
        if self.image_id is not None:
            return self.image_id
        assert self.name is not None  # constructor invariant, not peer input
        return str(self.name)

    def __str__(self) -> str:
        return f"docker-daemon:{self.image_id or self.name}"


ImageReference = LayoutReference | DockerArchiveReference | RegistryReference | DaemonReference


def _fail(text: str, why: str) -> RequestError:
    shown = text if len(text) <= 200 else text[:197] + "..."
    return RequestError(f"invalid image reference {shown!r}: {why}")


def parse_docker_name(text: str, *, whole: str | None = None, default_tag: bool = True) -> DockerName:
    """Normalise ``NAME[:TAG][@DIGEST]`` exactly as docker does (``docker.io/library/...``, tag latest)."""
    whole = text if whole is None else whole
    if not text:
        raise _fail(whole, "empty image name")
    remainder = text
    digest: str | None = None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        if not _DIGEST_RE.match(digest):
            raise _fail(whole, f"bad digest {digest!r}")
        if digest.startswith("sha256:") and not _SHA256_RE.match(digest):
            raise _fail(whole, f"bad digest {digest!r}: sha256 needs 64 lowercase hex digits")
    tag: str | None = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise _fail(whole, f"bad tag {tag!r}")
    if not remainder:
        raise _fail(whole, "empty repository name")
    first, _, rest = remainder.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, path = first, rest
        if not _DOMAIN_RE.match(registry):
            raise _fail(whole, f"bad registry host {registry!r}")
    else:
        registry, path = DEFAULT_REGISTRY, remainder
    if registry in DOCKER_HUB_ALIASES:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in path:
        path = f"library/{path}"
    for component in path.split("/"):
        if not _PATH_COMPONENT_RE.match(component):
            if component.lower() != component and _PATH_COMPONENT_RE.match(component.lower()):
                raise _fail(whole, "repository name must be lowercase")
            raise _fail(whole, f"bad repository path component {component!r}")
    if len(f"{registry}/{path}") > MAX_NAME_LENGTH:
        raise _fail(whole, f"repository name longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest is None and default_tag:
        tag = DEFAULT_TAG
    return DockerName(registry, path, tag, digest)


def _split_path(text: str, rest: str, transport: str) -> tuple[str, str | None]:
    path, sep, suffix = rest.partition(":")
    if not path:
        raise _fail(text, f"{transport}: needs a path")
    if "\x00" in path:
        raise _fail(text, "path contains a NUL byte")
    return path, (suffix if sep else None)


def parse_reference(text: str) -> ImageReference:
    """Parse any supported image reference; RequestError naming the bad part otherwise."""
    if len(text) > MAX_REFERENCE_LENGTH:
        raise _fail(text, f"longer than {MAX_REFERENCE_LENGTH} characters")
    if not text or text != text.strip():
        raise _fail(text, "empty or surrounded by whitespace")
    if text.startswith("docker://"):
        return RegistryReference(parse_docker_name(text.removeprefix("docker://"), whole=text))
    scheme, sep, rest = text.partition(":")
    if "://" in text and scheme != "docker":
        raise _fail(text, f"unsupported transport {scheme!r}; use docker://, oci:, oci-archive:, "
                    "docker-archive: or docker-daemon:")
    if sep and scheme in ("oci", "oci-archive"):
        path, tag = _split_path(text, rest, scheme)
        if tag is not None and tag != "" and not _OCI_TAG_RE.match(tag):
            raise _fail(text, f"bad tag {tag!r}")
        return LayoutReference(path, tag or None, archive=scheme == "oci-archive")
    if sep and scheme == "docker-archive":
        path, suffix = _split_path(text, rest, scheme)
        if not suffix:
            return DockerArchiveReference(path)
        if suffix.startswith("@"):
            if not suffix[1:].isdigit() or len(suffix) > 10:
                raise _fail(text, f"bad image index {suffix!r}: expected @N")
            return DockerArchiveReference(path, index=int(suffix[1:]))
        name = parse_docker_name(suffix, whole=text)
        if name.digest is not None:
            raise _fail(text, "docker-archive: a reference inside an archive cannot have a digest")
        return DockerArchiveReference(path, name=name)
    if sep and scheme == "docker-daemon":
        if not rest:
            raise _fail(text, "docker-daemon: needs an image name or ID")
        if rest.startswith("sha256:"):
            if not _SHA256_RE.match(rest):
                raise _fail(text, "bad image ID: sha256 needs 64 lowercase hex digits")
            return DaemonReference(image_id=rest)
        name = parse_docker_name(rest, whole=text)
        if name.digest is not None:
            raise _fail(text, "docker-daemon: use NAME:TAG or an image ID, not a digest")
        return DaemonReference(name=name)
    if sep and scheme in _UNSUPPORTED_TRANSPORTS and ("/" in rest or rest.startswith(".")):
        raise _fail(text, f"transport {scheme!r} is not supported")
    if _HEX64_RE.match(text):
        raise _fail(text, "a bare 64-hex string is an image ID, not a name; use docker-daemon:sha256:ID")
    return RegistryReference(parse_docker_name(text))


def as_reference(ref: str | ImageReference) -> ImageReference:
    return parse_reference(ref) if isinstance(ref, str) else ref
