"""Registry client behaviour the real registry will not show on demand: 5xx and dropped connections
(retries with backoff), blob redirects to another host (Authorization not forwarded), hostile replies.

The "registry" here is a scripted ``http.server`` on localhost speaking just enough of the distribution API.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from salmiac.errors import ImageError, RegistryError
from salmiac.image.auth import Credentials
from salmiac.image.cache import BlobCache
from salmiac.image.models import MAX_MANIFEST_SIZE, OCI_LAYER, Descriptor
from salmiac.image.registry import RegistryClient

BLOB = b"layer bytes " * 100
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}).encode()


@dataclass
class Script:
    """What the fake server does; ``log`` records (path, Authorization header)."""

    handlers: dict[str, Callable[[http.server.BaseHTTPRequestHandler], None]] = field(default_factory=dict)
    log: list[tuple[str, str | None]] = field(default_factory=list)


def reply(handler: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
          headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def serve(script: Script) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            script.log.append((self.path, self.headers.get("Authorization")))
            action = script.handlers.get(self.path)
            if action is None:
                reply(self, 404, b'{"errors":[{"code":"NOT_FOUND","message":"no such thing"}]}')
            else:
                action(self)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def fake() -> Iterator[tuple[Script, str]]:
    script = Script()
    script.handlers["/v2/"] = lambda h: reply(h, 200, b"{}")
    server, host = serve(script)
    yield script, host
    server.shutdown()
    server.server_close()


def failing_then(failures: list[Callable[[http.server.BaseHTTPRequestHandler], None]],
                 success: Callable[[http.server.BaseHTTPRequestHandler], None]
                 ) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def action(handler: http.server.BaseHTTPRequestHandler) -> None:
        (failures.pop(0) if failures else success)(handler)

    return action


def drop_connection(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.close_connection = True
    handler.connection.shutdown(2)


def test_retries_with_backoff(fake: tuple[Script, str]) -> None:
    script, host = fake
    script.handlers["/v2/a/manifests/t"] = failing_then(
        [lambda h: reply(h, 503), drop_connection, lambda h: reply(h, 502)],
        lambda h: reply(h, 200, MANIFEST, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}),
    )
    sleeps: list[float] = []
    client = RegistryClient(host, tls_verify=False, sleep=sleeps.append)
    data, media_type, digest = client.get_manifest("a", "t")
    assert data == MANIFEST and media_type.endswith("manifest.v1+json")
    assert digest == "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
    assert sleeps == [0.5, 1.0, 2.0]


def test_gives_up_after_retries(fake: tuple[Script, str]) -> None:
    script, host = fake
    script.handlers["/v2/a/manifests/t"] = lambda h: reply(
        h, 500, b'{"errors":[{"code":"UNKNOWN","message":"storage on fire"}]}')
    sleeps: list[float] = []
    client = RegistryClient(host, tls_verify=False, sleep=sleeps.append, retries=2)
    with pytest.raises(RegistryError) as info:
        client.get_manifest("a", "t")
    assert str(info.value) == f"registry {host}: unknown: storage on fire (GET /v2/a/manifests/t, HTTP 500)"
    assert len(sleeps) == 2
    assert [path for path, _ in script.log].count("/v2/a/manifests/t") == 3


def test_blob_redirect_drops_authorization(fake: tuple[Script, str], tmp_path: Path) -> None:
    script, host = fake
    storage = Script()
    storage.handlers["/bucket/blob?sig=1"] = lambda h: reply(h, 200, BLOB)
    storage_server, storage_host = serve(storage)
    try:
        script.handlers["/v2/"] = lambda h: reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="x"'})

        def blob(h: http.server.BaseHTTPRequestHandler) -> None:
            if h.headers.get("Authorization") is None:
                reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="x"'})
            else:
                reply(h, 307, b"", {"Location": f"http://{storage_host}/bucket/blob?sig=1"})

        script.handlers[f"/v2/a/blobs/{BLOB_DIGEST}"] = blob
        client = RegistryClient(host, tls_verify=False, credentials=Credentials("u", "p"))
        cache = BlobCache(tmp_path)
        client.fetch_blob("a", Descriptor(OCI_LAYER, BLOB_DIGEST, len(BLOB)), cache)
        assert cache.path(BLOB_DIGEST).read_bytes() == BLOB
        assert storage.log == [("/bucket/blob?sig=1", None)]  # credentials stayed with the registry
        assert script.log[-1][1] == Credentials("u", "p").basic()
    finally:
        storage_server.shutdown()
        storage_server.server_close()


def test_redirect_loop(fake: tuple[Script, str], tmp_path: Path) -> None:
    script, host = fake
    script.handlers[f"/v2/a/blobs/{BLOB_DIGEST}"] = lambda h: reply(h, 302, b"", {"Location": h.path})
    client = RegistryClient(host, tls_verify=False)
    with pytest.raises(RegistryError, match="too many redirects"):
        client.fetch_blob("a", Descriptor(OCI_LAYER, BLOB_DIGEST, len(BLOB)), BlobCache(tmp_path))


def test_hostile_replies(fake: tuple[Script, str], tmp_path: Path) -> None:
    script, host = fake
    script.handlers["/v2/a/manifests/big"] = lambda h: reply(h, 200, b" " * (MAX_MANIFEST_SIZE + 1))
    other = b'{"schemaVersion":2}'
    script.handlers["/v2/a/manifests/lying"] = lambda h: reply(
        h, 200, other, {"Docker-Content-Digest": "sha256:" + "1" * 64})
    pinned = "sha256:" + "2" * 64
    script.handlers[f"/v2/a/manifests/{pinned}"] = lambda h: reply(h, 200, other)
    script.handlers[f"/v2/a/blobs/{BLOB_DIGEST}"] = lambda h: reply(h, 200, BLOB[:-1] + b"X")
    client = RegistryClient(host, tls_verify=False, sleep=lambda _s: None)
    with pytest.raises(ImageError, match="exceeds"):
        client.get_manifest("a", "big")
    with pytest.raises(ImageError, match=r"digest mismatch \(registry says sha256:1111"):
        client.get_manifest("a", "lying")
    with pytest.raises(ImageError, match=f"manifest {pinned}: digest mismatch"):
        client.get_manifest("a", pinned)
    cache = BlobCache(tmp_path)
    with pytest.raises(ImageError, match=f"layer {BLOB_DIGEST}: digest mismatch"):
        client.fetch_blob("a", Descriptor(OCI_LAYER, BLOB_DIGEST, len(BLOB)), cache, "layer")
    assert not cache.has(BLOB_DIGEST)
    with pytest.raises(ImageError, match="size mismatch"):
        client.fetch_blob("a", Descriptor(OCI_LAYER, BLOB_DIGEST, len(BLOB) + 5), cache, "layer")


def test_not_a_registry(tmp_path: Path) -> None:
    script = Script()
    server, host = serve(script)  # 404 for /v2/
    try:
        with pytest.raises(RegistryError, match=rf"registry {host}: .*unexpected reply to ping"):
            RegistryClient(host, tls_verify=False).ping()
    finally:
        server.shutdown()
        server.server_close()
