"""Registry credentials from docker/containers auth files and credential helpers."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from salmiac.errors import RequestError
from salmiac.image.auth import Credentials, auth_files, normalise_host, resolve_credentials


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def write(path: Path, doc: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("key", "host"),
    [
        ("https://index.docker.io/v1/", "docker.io"),
        ("index.docker.io", "docker.io"),
        ("registry-1.docker.io", "docker.io"),
        ("docker.io", "docker.io"),
        ("http://localhost:5000", "localhost:5000"),
        ("localhost:5000/v2/", "localhost:5000"),
        ("Quay.IO/org", "quay.io/org"),
    ],
)
def test_normalise_host(key: str, host: str) -> None:
    assert normalise_host(key) == host


def test_order_explicit_then_files(tmp_path: Path) -> None:
    docker = write(tmp_path / "docker" / "config.json", {"auths": {"r.example": {"auth": b64("d:1")}}})
    podman = write(tmp_path / "auth.json", {"auths": {"r.example": {"auth": b64("p:2")},
                                                     "other.example": {"auth": b64("p:3")}}})
    xdg = write(tmp_path / "xdg" / "containers" / "auth.json", {"auths": {"x.example": {"auth": b64("x:4")}}})
    env = {
        "DOCKER_CONFIG": str(docker.parent),
        "REGISTRY_AUTH_FILE": str(podman),
        "XDG_RUNTIME_DIR": str(xdg.parents[1]),
    }
    assert auth_files(env) == [docker, podman, xdg]
    assert resolve_credentials("r.example", environ=env) == Credentials("d", "1")
    assert resolve_credentials("other.example", environ=env) == Credentials("p", "3")
    assert resolve_credentials("x.example", environ=env) == Credentials("x", "4")
    assert resolve_credentials("none.example", environ=env) is None
    assert resolve_credentials("r.example", explicit=Credentials("e", "0"), environ=env) == Credentials("e", "0")


def test_home_docker_config_and_hub_aliases(tmp_path: Path) -> None:
    write(tmp_path / ".docker" / "config.json",
          {"auths": {"https://index.docker.io/v1/": {"auth": b64("hub:pw:with:colons")}}})
    env = {"HOME": str(tmp_path)}
    for registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert resolve_credentials(registry, environ=env) == Credentials("hub", "pw:with:colons")


def test_username_password_fields_and_namespaces(tmp_path: Path) -> None:
    path = write(tmp_path / "auth.json", {"auths": {
        "quay.io": {"username": "u", "password": "generic"},
        "quay.io/team": {"username": "u", "password": "team"},
        "quay.io/team/app": {"username": "u", "password": "app"},
    }})
    env = {"REGISTRY_AUTH_FILE": str(path), "HOME": str(tmp_path)}
    assert resolve_credentials("quay.io", "team/app", environ=env) == Credentials("u", "app")
    assert resolve_credentials("quay.io", "team/other", environ=env) == Credentials("u", "team")
    assert resolve_credentials("quay.io", "elsewhere/x", environ=env) == Credentials("u", "generic")


def test_identity_token_entries_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path / "c" / "config.json", {"auths": {"r.example": {"identitytoken": "abc"}}})
    assert resolve_credentials("r.example", environ={"DOCKER_CONFIG": str(path.parent)}) is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "invalid JSON"),
        ("[]", "expected a JSON object"),
        (json.dumps({"auths": []}), "auths must be an object"),
        (json.dumps({"auths": {"r.example": {"auth": "!!!"}}}), "not base64"),
        (json.dumps({"auths": {"r.example": {"auth": b64("nocolon")}}}), "user:password"),
        (json.dumps({"credHelpers": []}), "credHelpers must be an object"),
        (json.dumps({"auths": {"r.example": "x"}}), "entry must be an object"),
    ],
)
def test_malformed_files_name_the_file(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "c" / "config.json"
    path.parent.mkdir()
    path.write_text(content)
    with pytest.raises(RequestError, match=message) as info:
        resolve_credentials("r.example", environ={"DOCKER_CONFIG": str(path.parent)})
    assert str(path) in str(info.value)


def test_oversized_file(tmp_path: Path) -> None:
    path = tmp_path / "c" / "config.json"
    path.parent.mkdir()
    path.write_bytes(b" " * (2 << 20))
    with pytest.raises(RequestError, match="larger than"):
        resolve_credentials("r.example", environ={"DOCKER_CONFIG": str(path.parent)})


def install_helper(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    helper = bin_dir / f"docker-credential-{name}"
    helper.write_text("#!/bin/sh\n" + script)
    helper.chmod(0o755)


def test_credential_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    # Speaks the docker-credential-helpers protocol: `get`, server URL on stdin, JSON on stdout.
    install_helper(bin_dir, "fake", """
read server
[ "$1" = get ] || exit 3
case "$server" in
  r.example) echo '{"ServerURL":"r.example","Username":"helper","Secret":"s1"}' ;;
  https://index.docker.io/v1/) echo '{"ServerURL":"hub","Username":"hubhelper","Secret":"s2"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac
""")
    install_helper(bin_dir, "broken", "echo 'boom' >&2; exit 2\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    config = write(tmp_path / "c" / "config.json", {
        "credHelpers": {"r.example": "fake", "bad.example": "broken", "gone.example": "missing"},
        "credsStore": "fake",
        "auths": {"gone.example": {"auth": b64("file:fallback")}},
    })
    env = {"DOCKER_CONFIG": str(config.parent)}
    assert resolve_credentials("r.example", environ=env) == Credentials("helper", "s1")
    assert resolve_credentials("docker.io", environ=env) == Credentials("hubhelper", "s2")
    assert resolve_credentials("nowhere.example", environ=env) is None
    # a helper that is not installed is skipped; the file's own entry still applies
    assert resolve_credentials("gone.example", environ=env) == Credentials("file", "fallback")
    with pytest.raises(RequestError, match=r"docker-credential-broken failed for bad\.example: boom"):
        resolve_credentials("bad.example", environ=env)


def test_credentials_are_not_printed() -> None:
    creds = Credentials("user", "hunter2")
    assert "hunter2" not in repr(creds)
    assert creds.basic() == "Basic " + b64("user:hunter2")
    with pytest.raises(RequestError):
        Credentials("a:b", "x")
