"""Registry credentials: explicit ones first, then docker/containers auth files, then credential helpers.

Lookup order for a registry host:
1. explicit ``Credentials`` (the conversion request's auth);
2. each auth file in turn — ``$DOCKER_CONFIG/config.json`` (else ``~/.docker/config.json``),
   ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json`` — where within one file
   ``credHelpers[host]`` beats an ``auths`` entry, which beats ``credsStore``.
Docker Hub is known under several names (docker.io, index.docker.io, registry-1.docker.io,
``https://index.docker.io/v1/``); they are all the same key here. Files are bounded; a malformed file is a
RequestError naming it. Identity tokens (``identitytoken``, helper user ``<token>``) are OAuth2 refresh tokens
that need a different token flow; they are ignored (logged), not misused as passwords.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from salmiac.errors import RequestError

log = logging.getLogger(__name__)

MAX_AUTH_FILE = 1 << 20
MAX_HELPER_OUTPUT = 64 << 10
HELPER_TIMEOUT = 30.0
DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")
#: The server URL docker itself stores Docker Hub credentials under (and asks helpers for).
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.username or ":" in self.username or "\n" in self.username + self.password:
            raise RequestError("invalid registry credentials: username must be non-empty without ':' or newlines")

    def basic(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


def normalise_host(key: str) -> str:
    """``https://index.docker.io/v1/`` → ``docker.io``; ``http://localhost:5000/v2`` → ``localhost:5000``.

    A key naming a repository namespace (containers auth.json allows ``quay.io/org``) keeps its path.
    """
    text = key.strip()
    for scheme in ("https://", "http://"):
        text = text.removeprefix(scheme)
    text = text.rstrip("/")
    for suffix in ("/v1", "/v2"):
        text = text.removesuffix(suffix)
    host, sep, path = text.partition("/")
    host = host.lower()
    if host in DOCKER_HUB_KEYS:
        host = "docker.io"
    return f"{host}/{path}" if sep and path else host


def auth_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if environ is None else environ
    files: list[Path] = []
    docker_dir = env.get("DOCKER_CONFIG")
    if docker_dir:
        files.append(Path(docker_dir) / "config.json")
    else:
        home = env.get("HOME") or str(Path.home())
        files.append(Path(home) / ".docker" / "config.json")
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    return files


def _load_auth_file(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_AUTH_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RequestError(f"cannot read registry auth file {path}: {exc.strerror}") from exc
    if len(data) > MAX_AUTH_FILE:
        raise RequestError(f"registry auth file {path}: larger than {MAX_AUTH_FILE} bytes")
    if not data.strip():
        return None
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RequestError(f"registry auth file {path}: invalid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise RequestError(f"registry auth file {path}: expected a JSON object")
    return doc


def _entry_credentials(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise RequestError(f"{where}: entry must be an object")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise RequestError(f"{where}: 'auth' is not base64 of user:password") from exc
        username, sep, password = decoded.partition(":")
        if not sep or not username:
            raise RequestError(f"{where}: 'auth' does not decode to user:password")
        return Credentials(username, password)
    plain_user, plain_password = entry.get("username"), entry.get("password")
    if isinstance(plain_user, str) and plain_user and isinstance(plain_password, str):
        return Credentials(plain_user, plain_password)
    if entry.get("identitytoken"):
        log.info("%s: identity tokens are not supported; ignoring this entry", where)
    return None


def _match_key(keys: list[str], registry: str, repository: str | None) -> str | None:
    """The most specific key for registry[/repository]: longest namespace prefix, then the bare host."""
    wanted = normalise_host(registry)
    candidates = []
    for key in keys:
        norm = normalise_host(key)
        host, _, path = norm.partition("/")
        if host != wanted:
            continue
        if not path:
            candidates.append((0, key))
        elif repository and (repository == path or repository.startswith(path + "/")):
            candidates.append((len(path), key))
    return max(candidates)[1] if candidates else None


def run_credential_helper(name: str, server: str) -> Credentials | None:
    """``docker-credential-NAME get`` with ``server`` on stdin; None if absent or it has no entry."""
    if not name or "/" in name or name.startswith("."):
        raise RequestError(f"invalid credential helper name {name!r}")
    program = shutil.which(f"docker-credential-{name}")
    if program is None:
        log.info("credential helper docker-credential-%s not found; skipping", name)
        return None
    try:
        proc = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=HELPER_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RequestError(f"credential helper docker-credential-{name} failed: {exc}") from exc
    out = proc.stdout[:MAX_HELPER_OUTPUT]
    if proc.returncode != 0:
        message = (out or proc.stderr[:512]).decode("utf-8", "replace").strip()
        if "credentials not found" in message.lower():
            return None
        raise RequestError(f"credential helper docker-credential-{name} failed for {server}: {message}")
    try:
        doc = json.loads(out)
    except ValueError as exc:
        raise RequestError(f"credential helper docker-credential-{name}: invalid JSON reply") from exc
    if not isinstance(doc, dict):
        raise RequestError(f"credential helper docker-credential-{name}: invalid reply")
    username, secret = doc.get("Username"), doc.get("Secret")
    if not isinstance(username, str) or not isinstance(secret, str) or not username:
        return None
    if username == "<token>":
        log.info("credential helper %s returned an identity token; not supported", name)
        return None
    return Credentials(username, secret)


def _helper_server(registry: str) -> str:
    return DOCKER_HUB_SERVER_URL if normalise_host(registry) == "docker.io" else registry


def credentials_from_file(
    doc: Mapping[str, Any], path: Path, registry: str, repository: str | None = None
) -> Credentials | None:
    helpers = doc.get("credHelpers", {})
    if helpers is None:
        helpers = {}
    if not isinstance(helpers, dict):
        raise RequestError(f"registry auth file {path}: credHelpers must be an object")
    key = _match_key(list(helpers), registry, None)
    if key is not None:
        helper = helpers[key]
        if not isinstance(helper, str):
            raise RequestError(f"registry auth file {path}: credHelpers[{key!r}] must be a string")
        found = run_credential_helper(helper, _helper_server(registry))
        if found is not None:
            return found
    auths = doc.get("auths", {})
    if auths is None:
        auths = {}
    if not isinstance(auths, dict):
        raise RequestError(f"registry auth file {path}: auths must be an object")
    key = _match_key(list(auths), registry, repository)
    if key is not None:
        found = _entry_credentials(auths[key], f"registry auth file {path}: auths[{key!r}]")
        if found is not None:
            return found
    store = doc.get("credsStore")
    if store:
        if not isinstance(store, str):
            raise RequestError(f"registry auth file {path}: credsStore must be a string")
        return run_credential_helper(store, _helper_server(registry))
    return None


def resolve_credentials(
    registry: str,
    repository: str | None = None,
    explicit: Credentials | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Credentials | None:
    """Credentials for ``registry`` (host[:port]) and optionally a repository, or None (anonymous)."""
    if explicit is not None:
        return explicit
    for path in auth_files(environ):
        doc = _load_auth_file(path)
        if doc is None:
            continue
        found = credentials_from_file(doc, path, registry, repository)
        if found is not None:
            log.debug("using credentials for %s from %s", registry, path)
            return found
    return None
