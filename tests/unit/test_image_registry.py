"""Pure parts of the registry client and docker-archive reader: challenges, error bodies, manifest.json."""

from __future__ import annotations

import contextlib
import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salmiac.errors import ImageError
from salmiac.image.docker_archive import _parse_entries, _select, chain_id
from salmiac.image.reference import parse_docker_name
from salmiac.image.registry import _error_detail, parse_challenge

# Shared CPUs: no per-example deadline; generation of nested JSON may be slow.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_bearer_challenge() -> None:
    challenge = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    )
    assert challenge is not None
    assert challenge.scheme == "bearer"
    assert challenge.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/busybox:pull",
    }


def test_challenge_quoting_and_basic() -> None:
    challenge = parse_challenge('Basic realm="a \\"quoted\\" realm", charset=UTF-8')
    assert challenge is not None
    assert challenge.scheme == "basic"
    assert challenge.params == {"realm": 'a "quoted" realm', "charset": "UTF-8"}
    assert parse_challenge("") is None


@FUZZ
@given(st.text(max_size=500))
def test_challenge_parser_total(text: str) -> None:
    parse_challenge(text)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
         "unauthorized: authentication required"),
        (b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}',
         "manifest_unknown: manifest unknown"),
        (b"<html>\nbad gateway</html>", "<html>"),
        (b"", ""),
        (b'{"errors": "nope"}', '{"errors": "nope"}'),
    ],
)
def test_error_detail(body: bytes, detail: str) -> None:
    assert _error_detail(body) == detail


def entries(doc: object) -> bytes:
    return json.dumps(doc).encode()


def test_docker_archive_selection() -> None:
    parsed = _parse_entries(entries([
        {"Config": "a.json", "RepoTags": ["app:1", "localhost:5000/app:2"], "Layers": ["l1.tar"]},
        {"Config": "b.json", "RepoTags": None, "Layers": []},
    ]), "x")
    assert _select(parsed, parse_docker_name("docker.io/library/app:1"), None, "x").config == "a.json"
    assert _select(parsed, parse_docker_name("localhost:5000/app:2"), None, "x").config == "a.json"
    assert _select(parsed, None, 1, "x").config == "b.json"
    with pytest.raises(ImageError, match="holds 2 images"):
        _select(parsed, None, None, "x")
    with pytest.raises(ImageError, match="no image named app:3"):
        _select(parsed, parse_docker_name("app:3"), None, "x")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "non-empty list"),
        ([], "non-empty list"),
        ([1], "must be an object"),
        ([{"Config": 1, "Layers": []}], "Config must be a file name"),
        ([{"Config": "c", "RepoTags": "x", "Layers": []}], "RepoTags must be a list"),
        ([{"Config": "c", "Layers": [""]}], "Layers must be a list of file names"),
        ([{"Config": "c", "Layers": ["l"] * 501}], "more than 500 layers"),
    ],
)
def test_docker_archive_manifest_hostile(doc: object, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        _parse_entries(entries(doc), "x")


@FUZZ
@given(st.binary(max_size=500))
def test_docker_archive_manifest_fuzz(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        _parse_entries(data, "x")


def test_chain_id() -> None:
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_id([a]) == a
    assert chain_id([a, b]) == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
