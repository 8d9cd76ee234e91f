"""OCI distribution client (pull and push) on the standard library's ``http.client``.

Why stdlib and not ``requests``/``httpx``: the protocol needs only a handful of requests, and every place a
registry's reply could make us misbehave (body sizes, redirects, which header goes to which host, what is
retried) is easier to bound when it is spelled out here than when it is a library default. It also keeps the
converter free of another dependency.

What is implemented:
- ``GET /v2/`` ping; ``WWW-Authenticate: Bearer`` token flow (realm/service/scope, Basic credentials sent to
  the token endpoint) and ``Basic`` auth; tokens cached per scope.
- TLS with the system CAs (``SSL_CERT_FILE`` honoured by OpenSSL) plus an optional ``ca_file``;
  ``tls_verify=False`` (as skopeo ``--tls-verify=false``) tries HTTPS without verification, then plain HTTP.
- Redirects (blob downloads go to storage): up to ``MAX_REDIRECTS``; ``Authorization`` is dropped when the
  redirect leaves the registry host.
- Retries with exponential backoff on 5xx, 429 and broken connections, for every request that can be
  replayed (uploads restart from the ``POST``).
- Manifests: Accept for OCI/Docker manifest and index, bounded, digest-checked. Blobs: streamed into the
  ``BlobCache`` which verifies size and digest. Push: ``HEAD`` existence check, ``POST`` then monolithic
  ``PUT ?digest=`` or chunked ``PATCH``es, manifest ``PUT``; the returned digest is checked.
- Optional cross-repository mount (``push_blob(..., mount_from=REPO)``).
Not implemented: OAuth2 identity tokens, ``Range`` resume of partial downloads.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

from salmiac.errors import ImageError, RegistryError
from salmiac.image.auth import Credentials
from salmiac.image.cache import BlobCache
from salmiac.image.models import (
    ACCEPTED_MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    Descriptor,
    digest_hasher,
    sha256_digest,
    validate_digest,
    verify_bytes,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 << 10
MAX_TOKEN_RESPONSE = 1 << 20
DEFAULT_TIMEOUT = 60.0
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5
#: Blobs up to this size are uploaded in one PUT; bigger ones in PATCH chunks of this size.
DEFAULT_CHUNK_SIZE = 64 << 20
IO_BLOCK = 1 << 20
USER_AGENT = "salmiac"
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


class RegistryAuthError(RegistryError):
    """Credentials missing or refused: the user can fix it."""

    exit_code = 2


class RegistryNotFound(RegistryError):
    """The repository, tag or blob does not exist."""

    exit_code = 2


class _Retryable(Exception):
    """Internal: a failure worth retrying (5xx, reset connection); carries the error to raise at the end."""

    def __init__(self, error: RegistryError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" | "basic"
    params: Mapping[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """``Bearer realm="...",service="...",scope="..."`` → Challenge; None if unusable."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params: dict[str, str] = {}
    for match in _CHALLENGE_PARAM.finditer(rest[:8192]):
        quoted, bare = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        params[match.group(1).lower()] = value
    return Challenge(scheme.lower(), params)


def _error_detail(body: bytes) -> str:
    """``{"errors":[{"code":"UNAUTHORIZED","message":"..."}]}`` → "unauthorized: ..."."""
    try:
        doc = json.loads(body)
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code = str(errors[0].get("code", "")).lower()
            message = str(errors[0].get("message", ""))
            return f"{code}: {message}"[:300] if code else message[:300]
    except ValueError:
        pass
    text = body.decode("utf-8", "replace").strip().splitlines()
    return text[0][:200] if text else ""


class RegistryClient:
    """One registry host; thread-unsafe; one HTTP connection per request (simple and robust)."""

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        tls_verify: bool = True,
        ca_file: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sleep: Callable[[float], None] = time.sleep,
        name: str | None = None,
    ) -> None:
        self.host = registry
        self.name = name or registry  # what errors call it (docker.io rather than registry-1.docker.io)
        self.credentials = credentials
        self.tls_verify = tls_verify
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.chunk_size = chunk_size
        self._sleep = sleep
        self._ssl = self._ssl_context(tls_verify, ca_file)
        self._scheme: str | None = None
        self._basic = False
        self._tokens: dict[str, str] = {}

    # -- plumbing --------------------------------------------------------------------------------------

    @staticmethod
    def _ssl_context(tls_verify: bool, ca_file: str | None) -> ssl.SSLContext:
        if not tls_verify:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        ctx = ssl.create_default_context()  # system CAs; OpenSSL honours SSL_CERT_FILE / SSL_CERT_DIR
        if ca_file:
            try:
                ctx.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"cannot load CA file {ca_file}: {exc}") from exc
        return ctx

    def _fail(self, what: str, status: int | None = None, detail: str = "") -> RegistryError:
        """``registry HOST: DETAIL (WHAT, HTTP STATUS)`` with the class the status implies."""
        context = ", ".join(part for part in (what, f"HTTP {status}" if status else "") if part)
        message = f"registry {self.name}: {detail or 'request failed'}" + (f" ({context})" if context else "")
        if status in (401, 403):
            return RegistryAuthError(message)
        if status == 404:
            return RegistryNotFound(message)
        return RegistryError(message)

    def _connection(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        if scheme == "https":
            return http.client.HTTPSConnection(
                netloc, timeout=self.timeout, context=self._ssl, blocksize=IO_BLOCK
            )
        return http.client.HTTPConnection(netloc, timeout=self.timeout, blocksize=IO_BLOCK)

    def _base(self) -> str:
        if self._scheme is None:
            self.ping()
        assert self._scheme is not None  # set by ping(), which raises otherwise
        return f"{self._scheme}://{self.host}"

    def _raw(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | BinaryIO | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise self._fail("", None, f"unusable URL {url[:200]!r}")
        conn = self._connection(parts.scheme, parts.netloc)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        all_headers = {"User-Agent": USER_AGENT, **headers}
        try:
            conn.request(method, target, body=body, headers=all_headers)
            return conn, conn.getresponse()
        except ssl.SSLError as exc:  # certificate or protocol trouble does not heal by retrying
            conn.close()
            raise self._fail(f"{method} {parts.netloc}{parts.path}", None, f"TLS error: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise _Retryable(self._fail(f"{method} {parts.netloc}{parts.path}", None, str(exc))) from exc

    # -- auth ------------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Find the scheme (and whether the registry wants auth) with ``GET /v2/``."""
        schemes = ["https"] if self.tls_verify else ["https", "http"]
        last: RegistryError | None = None
        for scheme in schemes:
            try:
                conn, resp = self._with_retries(partial(self._raw, "GET", f"{scheme}://{self.host}/v2/", {}))
            except RegistryError as exc:
                last = exc
                continue
            try:
                resp.read(MAX_ERROR_BODY)
                if resp.status in (200, 401):
                    self._scheme = scheme
                    if resp.status == 401:
                        self._note_challenge(resp.getheader("WWW-Authenticate", ""))
                    return
                last = self._fail(f"GET /v2/ on {scheme}", resp.status, "unexpected reply to ping")
            finally:
                conn.close()
        assert last is not None  # the loop ran at least once and did not return
        if self.tls_verify and "TLS error" in str(last):
            raise RegistryError(f"{last}; for a plain-HTTP registry add --tls-verify=false") from last
        raise last

    def _note_challenge(self, header: str) -> None:
        challenge = parse_challenge(header)
        if challenge is not None and challenge.scheme == "basic":
            self._basic = True

    def _auth_headers(self, scope: str) -> dict[str, str]:
        token = self._tokens.get(scope)
        if token is not None:
            return {"Authorization": f"Bearer {token}"}
        if self._basic and self.credentials is not None:
            return {"Authorization": self.credentials.basic()}
        return {}

    def _authenticate(
        self, resp: http.client.HTTPResponse, scope: str, what: str, detail: str, round_no: int
    ) -> None:
        """React to a 401: fetch (or refresh an expired) bearer token for ``scope``, or switch to Basic."""
        challenge = parse_challenge(resp.getheader("WWW-Authenticate", "") or "")
        if challenge is None:
            raise self._fail(what, 401, "unauthorized: no usable WWW-Authenticate challenge")
        if challenge.scheme == "basic":
            if self.credentials is None or self._basic:
                reason = "credentials required" if self.credentials is None else "credentials refused"
                raise self._fail(what, 401, f"unauthorized: {reason}")
            self._basic = True
            return
        if challenge.scheme != "bearer":
            raise self._fail(what, 401, f"unauthorized: unsupported auth scheme {challenge.scheme!r}")
        if round_no > 0 and scope in self._tokens:
            # A token fetched for this very request was refused: no point asking again.
            hint = "" if self.credentials else " (no credentials configured)"
            raise self._fail(what, 401, (detail or "unauthorized: token refused") + hint)
        # Round 0 with a cached token means it expired: refresh it.
        self._tokens.pop(scope, None)
        self._tokens[scope] = self._fetch_token(challenge, scope)

    def _fetch_token(self, challenge: Challenge, scope: str) -> str:
        realm = challenge.params.get("realm", "")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise self._fail("token", None, f"unusable token realm {realm[:200]!r}")
        if parts.scheme == "http" and self.tls_verify and self.credentials is not None:
            raise self._fail("token", None, f"refusing to send credentials to plain-HTTP realm {realm}")
        query: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        for item in scope.split(" "):
            query.append(("scope", item))
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        headers = {"Authorization": self.credentials.basic()} if self.credentials else {}
        conn, resp = self._with_retries(lambda: self._checked_raw("GET", url, headers))
        try:
            body = resp.read(MAX_TOKEN_RESPONSE + 1)
        finally:
            conn.close()
        if resp.status != 200:
            detail = _error_detail(body) or "token request refused"
            if resp.status in (401, 403) and not detail.startswith(("unauthorized", "denied")):
                detail = f"unauthorized: {detail}"
            raise self._fail(f"token from {parts.netloc}", resp.status, detail)
        try:
            doc = json.loads(body[:MAX_TOKEN_RESPONSE])
        except ValueError as exc:
            raise self._fail("token", None, "token endpoint returned invalid JSON") from exc
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
            raise self._fail("token", None, "token endpoint returned no token")
        return token

    # -- requests --------------------------------------------------------------------------------------

    def _checked_raw(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | BinaryIO | None = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """One attempt; 5xx/429 become retryable."""
        conn, resp = self._raw(method, url, headers, body)
        if resp.status in _RETRY_STATUSES:
            detail = _error_detail(resp.read(MAX_ERROR_BODY))
            conn.close()
            path = urllib.parse.urlsplit(url).path
            raise _Retryable(self._fail(f"{method} {path}", resp.status, detail or "server error"))
        return conn, resp

    def _with_retries(self, attempt: Callable[[], _T]) -> _T:
        delay = self.backoff
        for number in range(self.retries + 1):
            try:
                return attempt()
            except _Retryable as exc:
                if number == self.retries:
                    raise exc.error from exc
                log.info("%s; retrying in %.1fs", exc.error, delay)
                self._sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    @contextmanager
    def request(
        self,
        method: str,
        path_or_url: str,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | Callable[[], BinaryIO] | None = None,
        ok: tuple[int, ...] = (200,),
        follow_redirects: bool = False,
    ) -> Iterator[http.client.HTTPResponse]:
        """Authenticated request with retries and redirects; yields a response whose status is in ``ok``."""
        base = self._base()
        url = path_or_url if "://" in path_or_url else base + path_or_url
        what = f"{method} {urllib.parse.urlsplit(url).path}"
        for round_no in range(3):
            conn, resp = self._follow(method, url, scope, headers or {}, body, follow_redirects)
            if resp.status == 401:
                detail = _error_detail(resp.read(MAX_ERROR_BODY))
                conn.close()
                self._authenticate(resp, scope, what, detail, round_no)
                continue
            try:
                if resp.status not in ok:
                    detail = _error_detail(resp.read(MAX_ERROR_BODY))
                    raise self._fail(what, resp.status, detail or http.client.responses.get(resp.status, ""))
                yield resp
            finally:
                conn.close()
            return
        raise self._fail(what, 401, "unauthorized")

    def _follow(
        self,
        method: str,
        url: str,
        scope: str,
        headers: Mapping[str, str],
        body: bytes | Callable[[], BinaryIO] | None,
        follow_redirects: bool,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        registry_netloc = urllib.parse.urlsplit(self._base()).netloc
        for _hop in range(MAX_REDIRECTS + 1):
            same_host = urllib.parse.urlsplit(url).netloc == registry_netloc
            all_headers = dict(headers)
            if same_host:
                all_headers.update(self._auth_headers(scope))

            def attempt(target: str = url, hdrs: dict[str, str] = all_headers) -> tuple[
                http.client.HTTPConnection, http.client.HTTPResponse
            ]:
                payload = body() if callable(body) else body
                try:
                    return self._checked_raw(method, target, hdrs, payload)
                finally:
                    if payload is not None and not isinstance(payload, bytes):
                        payload.close()

            conn, resp = self._with_retries(attempt)
            if follow_redirects and resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                resp.read(MAX_ERROR_BODY)
                conn.close()
                if not location:
                    raise self._fail(f"{method} {urllib.parse.urlsplit(url).path}", resp.status,
                                     "redirect without Location")
                url = urllib.parse.urljoin(url, location)
                continue
            return conn, resp
        raise self._fail(f"{method} {urllib.parse.urlsplit(url).path}", None, "too many redirects")

    # -- pull ------------------------------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str, str]:
        """``(bytes, media type, digest)``; bytes checked against ``reference`` when it is a digest."""
        path = f"/v2/{repository}/manifests/{reference}"
        with self.request(
            "GET", path, f"repository:{repository}:pull",
            headers={"Accept": ", ".join(ACCEPTED_MANIFEST_TYPES)},
        ) as resp:
            length = resp.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > MAX_MANIFEST_SIZE:
                raise ImageError(f"manifest {repository}:{reference}: {length} bytes exceeds the limit")
            data = resp.read(MAX_MANIFEST_SIZE + 1)
            media_type = (resp.getheader("Content-Type") or "").split(";")[0].strip()
            header_digest = resp.getheader("Docker-Content-Digest")
        if len(data) > MAX_MANIFEST_SIZE:
            raise ImageError(f"manifest {repository}:{reference}: exceeds the {MAX_MANIFEST_SIZE}-byte limit")
        if ":" in reference:  # tags cannot contain ":", digests always do
            validate_digest(reference)
            verify_bytes(data, reference, "manifest")
            digest = reference
        else:
            digest = sha256_digest(data)
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                raise ImageError(
                    f"manifest {repository}:{reference}: digest mismatch (registry says {header_digest}, "
                    f"content is {digest})"
                )
        return data, media_type, digest

    def fetch_blob(self, repository: str, desc: Descriptor, cache: BlobCache, what: str = "blob") -> Path:
        """Download into the cache (verified); a cache hit costs no request."""
        cache.check_size(desc, what)
        if cache.has(desc.digest):
            return cache.path(desc.digest)

        def attempt() -> Path:
            try:
                with self.request(
                    "GET", f"/v2/{repository}/blobs/{desc.digest}", f"repository:{repository}:pull",
                    follow_redirects=True,
                ) as resp:
                    length = resp.getheader("Content-Length")
                    if length is not None and length.isdigit() and int(length) != desc.size:
                        raise ImageError(
                            f"{what} {desc.digest}: size mismatch (descriptor says {desc.size}, "
                            f"registry sends {length})"
                        )
                    return cache.put(resp, desc, what)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(self._fail(f"GET blob {desc.digest}", None, str(exc))) from exc

        return self._with_retries(attempt)

    # -- push ------------------------------------------------------------------------------------------

    def blob_exists(self, repository: str, desc: Descriptor) -> bool:
        scope = f"repository:{repository}:pull,push"
        try:
            with self.request("HEAD", f"/v2/{repository}/blobs/{desc.digest}", scope,
                              follow_redirects=True) as resp:
                length = resp.getheader("Content-Length")
                return length is None or not length.isdigit() or int(length) == desc.size
        except RegistryNotFound:
            return False

    def push_blob(
        self,
        repository: str,
        desc: Descriptor,
        opener: Callable[[], BinaryIO],
        *,
        mount_from: str | None = None,
    ) -> None:
        """Upload the blob ``opener()`` returns unless the registry has it; ``desc`` is checked by the server.

        ``mount_from`` names another repository on this registry that may hold the blob: the registry is asked
        to mount it from there (no bytes sent); if it cannot, the upload proceeds as usual.
        """
        if self.blob_exists(repository, desc):
            return
        scope = f"repository:{repository}:pull,push"
        if mount_from is not None and mount_from != repository:
            scope += f" repository:{mount_from}:pull"

        def attempt() -> None:
            try:
                self._upload(repository, desc, opener, scope, mount_from)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(self._fail(f"upload {desc.digest}", None, str(exc))) from exc

        self._with_retries(attempt)

    def _upload(
        self, repository: str, desc: Descriptor, opener: Callable[[], BinaryIO], scope: str, mount_from: str | None
    ) -> None:
        path = f"/v2/{repository}/blobs/uploads/"
        if mount_from is not None and mount_from != repository:
            path += "?" + urllib.parse.urlencode({"mount": desc.digest, "from": mount_from})
        with self.request("POST", path, scope, body=b"", headers={"Content-Length": "0"}, ok=(201, 202)) as resp:
            if resp.status == 201:  # mounted
                resp.read(MAX_ERROR_BODY)
                return
            location = self._location(resp)
        if desc.size <= self.chunk_size:
            self._finish_upload(location, desc, scope, body=opener, length=desc.size)
            return
        offset = 0
        with opener() as src:
            while offset < desc.size:
                chunk = src.read(min(self.chunk_size, desc.size - offset))
                if not chunk:
                    raise ImageError(f"blob {desc.digest}: source shorter than {desc.size} bytes")
                headers = {
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(chunk)),
                    "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                }
                with self.request("PATCH", location, scope, headers=headers, body=chunk, ok=(202,)) as resp:
                    location = self._location(resp)
                offset += len(chunk)
        self._finish_upload(location, desc, scope, body=b"", length=0)

    def _finish_upload(
        self, location: str, desc: Descriptor, scope: str, *, body: bytes | Callable[[], BinaryIO], length: int
    ) -> None:
        sep = "&" if urllib.parse.urlsplit(location).query else "?"
        url = f"{location}{sep}digest={urllib.parse.quote(desc.digest)}"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        with self.request("PUT", url, scope, headers=headers, body=body, ok=(201,)) as resp:
            returned = resp.getheader("Docker-Content-Digest")
            resp.read(MAX_ERROR_BODY)
        if returned and returned != desc.digest:
            raise self._fail(f"upload {desc.digest}", None, f"registry stored digest {returned}")

    def _location(self, resp: http.client.HTTPResponse) -> str:
        location = resp.getheader("Location")
        resp.read(MAX_ERROR_BODY)
        if not location:
            raise self._fail("upload", resp.status, "upload reply without Location")
        return urllib.parse.urljoin(self._base() + "/", location)

    def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under a tag or digest; returns its digest."""
        digest = sha256_digest(data)
        with self.request(
            "PUT", f"/v2/{repository}/manifests/{reference}", f"repository:{repository}:pull,push",
            headers={"Content-Type": media_type, "Content-Length": str(len(data))}, body=data, ok=(201,),
        ) as resp:
            returned = resp.getheader("Docker-Content-Digest")
            resp.read(MAX_ERROR_BODY)
        if returned and returned != digest:
            raise self._fail("PUT manifest", None, f"registry computed digest {returned}, we sent {digest}")
        return digest


def file_opener(path: str | os.PathLike[str]) -> Callable[[], BinaryIO]:
    def opener() -> BinaryIO:
        return open(path, "rb")

    return opener


def hash_file(path: str | os.PathLike[str], digest: str) -> str:
    """Digest of a file, in the algorithm ``digest`` names."""
    hasher = digest_hasher(digest)
    with open(path, "rb") as handle:
        while chunk := handle.read(IO_BLOCK):
            hasher.update(chunk)
    return f"{digest.split(':', 1)[0]}:{hasher.hexdigest()}"
