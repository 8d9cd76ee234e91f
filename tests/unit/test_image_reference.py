"""Reference parsing: skopeo transports and docker's normalisation of bare names."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salmiac.errors import RequestError
from salmiac.image.reference import (
    DaemonReference,
    DockerArchiveReference,
    DockerName,
    LayoutReference,
    RegistryReference,
    parse_docker_name,
    parse_reference,
)

# Shared CPUs: no per-example deadline; generation of nested JSON may be slow.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

D = "sha256:" + "ab" * 32

# Expected values follow `docker pull` / distribution/reference.ParseNormalizedNamed.
VALID_NAMES = [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("library/busybox", "docker.io", "library/busybox", "latest", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", None),
    ("registry-1.docker.io/foo/bar:x", "docker.io", "foo/bar", "x", None),
    ("foo/bar", "docker.io", "foo/bar", "latest", None),
    ("localhost/foo", "localhost", "foo", "latest", None),
    ("localhost:5000/foo/bar:t", "localhost:5000", "foo/bar", "t", None),
    ("127.0.0.1:5000/a", "127.0.0.1:5000", "a", "latest", None),
    ("[::1]:5000/a", "[::1]:5000", "a", "latest", None),
    ("quay.io/org/app@" + D, "quay.io", "org/app", None, D),
    ("quay.io/org/app:v1@" + D, "quay.io", "org/app", "v1", D),
    ("Registry.Example/x", "Registry.Example", "x", "latest", None),
    ("a__b/c-d/e.f", "docker.io", "a__b/c-d/e.f", "latest", None),
    ("a/b---c", "docker.io", "a/b---c", "latest", None),
]


@pytest.mark.parametrize(("text", "registry", "repository", "tag", "digest"), VALID_NAMES)
def test_docker_normalisation(text: str, registry: str, repository: str, tag: str | None,
                              digest: str | None) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, RegistryReference)
    assert ref.name == DockerName(registry, repository, tag, digest)
    # docker:// means the same thing as a bare name
    assert parse_reference("docker://" + text) == ref


INVALID = [
    ("", "empty"),
    (" busybox", "whitespace"),
    ("BusyBox", "must be lowercase"),
    ("busybox:", "bad tag"),
    ("busybox:-x", "bad tag"),
    ("busybox:" + "a" * 129, "bad tag"),
    ("busybox@sha256:abc", "bad digest"),
    ("busybox@sha256:" + "AB" * 32, "bad digest"),
    ("a//b", "bad repository path component"),
    ("a/-b", "bad repository path component"),
    ("exa_mple.com/x", "bad registry host"),
    ("x" * 300, "longer than 255"),
    ("http://example.com/x", "unsupported transport 'http'"),
    ("dir:/tmp/x", "transport 'dir' is not supported"),
    ("oci:", "needs a path"),
    ("oci:/tmp/x:bad tag", "bad tag"),
    ("docker-archive:", "needs a path"),
    ("docker-archive:/x.tar:@x", "bad image index"),
    ("docker-archive:/x.tar:foo@" + D, "cannot have a digest"),
    ("docker-daemon:", "needs an image name"),
    ("docker-daemon:sha256:123", "bad image ID"),
    ("docker-daemon:foo@" + D, "not a digest"),
    ("ab" * 32, "image ID"),
    ("docker://", "empty image name"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_invalid_references_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_reference(text)
    assert str(info.value).startswith("invalid image reference ")
    assert message in str(info.value)


def test_file_transports() -> None:
    assert parse_reference("oci:/srv/layout") == LayoutReference("/srv/layout")
    assert parse_reference("oci:rel/dir:v1.2") == LayoutReference("rel/dir", "v1.2")
    assert parse_reference("oci-archive:/a.tar:t") == LayoutReference("/a.tar", "t", archive=True)
    assert parse_reference("docker-archive:/a.tar") == DockerArchiveReference("/a.tar")
    assert parse_reference("docker-archive:/a.tar:@2") == DockerArchiveReference("/a.tar", index=2)
    archive = parse_reference("docker-archive:/a.tar:app:1")
    assert isinstance(archive, DockerArchiveReference)
    assert archive.name == DockerName("docker.io", "library/app", "1")
    assert str(archive) == "docker-archive:/a.tar:app:1"


def test_daemon() -> None:
    ref = parse_reference("docker-daemon:alpine")
    assert isinstance(ref, DaemonReference)
    assert ref.api_name == "docker.io/library/alpine:latest"
    by_id = parse_reference("docker-daemon:" + D)
    assert isinstance(by_id, DaemonReference)
    assert by_id.api_name == D


def test_string_forms_round_trip() -> None:
    for text in ["docker://localhost:5000/a/b:c", "oci:/x:y", "oci-archive:/x", "docker-daemon:docker.io/library/a:b"]:
        assert str(parse_reference(text)) == text
        assert parse_reference(str(parse_reference(text))) == parse_reference(text)


def test_familiar_and_endpoint() -> None:
    name = parse_docker_name("busybox")
    assert name.familiar() == "busybox:latest"
    assert name.endpoint == "registry-1.docker.io"
    assert parse_docker_name("localhost:5000/x").endpoint == "localhost:5000"
    assert name.reference == "latest"
    assert parse_docker_name("x@" + D).reference == D


@FUZZ
@given(st.text(max_size=300))
def test_parser_never_crashes(text: str) -> None:
    try:
        ref = parse_reference(text)
    except RequestError as exc:
        assert str(exc).startswith("invalid image reference")
    else:
        # whatever parses must print as something that parses to the same thing
        assert parse_reference(str(ref)) == ref


@FUZZ
@given(
    st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
)
def test_generated_names_normalise(path: str, tag: str) -> None:
    name = parse_docker_name(f"{path}:{tag}")
    assert name.tag == tag
    assert name.registry == "docker.io"
    assert name.repository == (path if "/" in path else f"library/{path}")
