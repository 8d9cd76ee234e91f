"""``docker-daemon:NAME`` — ask the docker engine for ``GET /images/{name}/get``, a docker-archive tarball.

The engine is reached over its Unix socket: ``DOCKER_HOST=unix:///path`` or ``/var/run/docker.sock``. The
reply is streamed into a temp file (bounded) and then read like any ``docker-archive:``. TCP engines
(``tcp://``, with or without TLS) are not supported: say so instead of guessing.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Mapping
from typing import BinaryIO

from salmiac.errors import ImageError, RequestError, RuntimeFailure

DEFAULT_SOCKET = "/var/run/docker.sock"
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_ARCHIVE = 64 << 30
MAX_ERROR_BODY = 64 << 10


def engine_socket(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    host = env.get("DOCKER_HOST", "")
    if not host:
        return DEFAULT_SOCKET
    if host.startswith("unix://"):
        path = host.removeprefix("unix://")
        if not path.startswith("/"):
            raise RequestError(f"DOCKER_HOST={host!r}: expected unix:///absolute/path")
        return path
    raise RequestError(f"DOCKER_HOST={host!r}: only unix:// docker engines are supported")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def save_image(
    name: str,
    dest: BinaryIO,
    *,
    environ: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_size: int = DEFAULT_MAX_ARCHIVE,
) -> int:
    """Stream the engine's ``docker save`` of ``name`` into ``dest``; returns the byte count."""
    path = engine_socket(environ)
    conn = _UnixConnection(path, timeout)
    target = f"/images/{urllib.parse.quote(name, safe='')}/get"
    try:
        try:
            conn.request("GET", target, headers={"Accept": "application/x-tar"})
            resp = conn.getresponse()
        except OSError as exc:
            raise RuntimeFailure(f"cannot reach the docker engine at unix://{path}: {exc.strerror or exc}") from exc
        if resp.status != 200:
            detail = _engine_message(resp.read(MAX_ERROR_BODY))
            if resp.status == 404:
                raise ImageError(f"docker-daemon:{name}: no such image in the engine ({detail})")
            raise RuntimeFailure(f"docker engine at unix://{path}: HTTP {resp.status} for {name}: {detail}")
        total = 0
        try:
            while chunk := resp.read(1 << 20):
                total += len(chunk)
                if total > max_size:
                    raise ImageError(f"docker-daemon:{name}: image larger than {max_size} bytes")
                dest.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            raise RuntimeFailure(f"docker engine at unix://{path}: reading {name} failed: {exc}") from exc
        return total
    finally:
        conn.close()


def _engine_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            return str(doc["message"])[:300]
    except ValueError:
        pass
    return body.decode("utf-8", "replace").strip()[:300]
