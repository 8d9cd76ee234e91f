"""Pull and push against Debian's docker-registry (distribution 2.8), with skopeo and umoci as oracles.

Three registries (see tests/fixtures/registry.py): plain HTTP; HTTPS + htpasswd Basic auth with a test CA;
bearer tokens from a token server. Needs docker-registry, apache2-utils (htpasswd), skopeo, umoci.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from pathlib import Path

import pytest

from fixtures.registry import PASSWORD, USERNAME, RunningRegistry, SampleImage, run, skopeo, skopeo_inspect
from salmiac.errors import ImageError, RegistryError
from salmiac.image.auth import Credentials
from salmiac.image.cache import BlobCache
from salmiac.image.destination import LayerBlob, write_image
from salmiac.image.models import OCI_LAYER, Descriptor
from salmiac.image.registry import RegistryAuthError, RegistryClient, RegistryNotFound
from salmiac.image.source import open_image

pytestmark = pytest.mark.registry

CREDS = Credentials(USERNAME, PASSWORD)


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    return BlobCache(tmp_path / "cache")


def cert_dir(registry: RunningRegistry, tmp_path: Path) -> str:
    """skopeo wants a directory with ca.crt."""
    directory = tmp_path / "certs"
    directory.mkdir(exist_ok=True)
    assert registry.ca_file is not None
    (directory / "ca.crt").write_bytes(Path(registry.ca_file).read_bytes())
    return str(directory)


def parts_of(ref: str, cache: BlobCache, **kwargs: object) -> tuple[bytes, list[LayerBlob]]:
    with open_image(ref, cache=cache, **kwargs) as src:  # type: ignore[arg-type]
        for layer in src.layers:
            src.open_blob(layer).close()
        return src.config.raw, [
            LayerBlob(str(cache.path(layer.digest)), layer.media_type, layer.digest, layer.size, diff_id)
            for layer, diff_id in zip(src.layers, src.config.diff_ids, strict=True)
        ]


def test_pull_plain(plain_registry: RunningRegistry, sample_image: SampleImage, cache: BlobCache) -> None:
    ref = f"docker://{plain_registry.host}/sample/app:v1"
    skopeo("copy", "--dest-tls-verify=false", sample_image.ref, ref)
    with open_image(ref, cache=cache, tls_verify=False) as src:
        inspect = skopeo_inspect(ref, "--tls-verify=false")
        assert src.manifest_digest == inspect["Digest"]
        assert [layer.digest for layer in src.layers] == inspect["Layers"]
        assert src.config.entrypoint == ("/bin/app", "--serve")
        for layer in src.layers:
            with src.open_blob(layer) as blob:
                assert "sha256:" + hashlib.sha256(blob.read()).hexdigest() == layer.digest
    # by digest, and as a bare name (docker normalisation keeps the host)
    by_digest = f"{plain_registry.host}/sample/app@{inspect['Digest']}"
    with open_image(by_digest, cache=cache, tls_verify=False) as src:
        assert src.manifest_digest == inspect["Digest"]


def test_pull_errors(plain_registry: RunningRegistry, cache: BlobCache) -> None:
    with pytest.raises(RegistryNotFound) as info:
        open_image(f"docker://{plain_registry.host}/missing/repo:v1", cache=cache, tls_verify=False)
    message = str(info.value)
    assert message.startswith(f"registry {plain_registry.host}: ")
    assert "GET /v2/missing/repo/manifests/v1, HTTP 404" in message
    # verifying TLS against a plain-HTTP registry fails clearly (no silent downgrade)
    with pytest.raises(RegistryError, match=rf"registry {plain_registry.host}: TLS error"):
        open_image(f"docker://{plain_registry.host}/missing/repo:v1", cache=cache)


def test_push_plain(plain_registry: RunningRegistry, sample_image: SampleImage, cache: BlobCache,
                    tmp_path: Path) -> None:
    config, layers = parts_of(sample_image.ref, cache)
    ref = f"docker://{plain_registry.host}/pushed/app:v2"
    written = write_image(ref, config=config, layers=layers, tls_verify=False)
    inspect = skopeo_inspect(ref, "--tls-verify=false")
    assert inspect["Digest"] == written.manifest_digest
    raw = skopeo("inspect", "--raw", "--tls-verify=false", ref).stdout
    assert raw.encode() == written.manifest_bytes
    # skopeo copies it back out and umoci unpacks it
    skopeo("copy", "--src-tls-verify=false", ref, f"oci:{tmp_path}/out:v2")
    run(["umoci", "unpack", "--rootless", "--image", f"{tmp_path}/out:v2", tmp_path / "bundle"])
    assert (tmp_path / "bundle/rootfs/etc/hello.txt").read_bytes() == b"replaced in layer 1\n"
    # pushing again: every blob exists, only the manifest is PUT; same digest
    again = write_image(ref, config=config, layers=layers, tls_verify=False)
    assert again.manifest_digest == written.manifest_digest
    # push by digest
    by_digest = write_image(f"docker://{plain_registry.host}/pushed/app@{written.manifest_digest}",
                            config=config, layers=layers, tls_verify=False)
    assert by_digest.manifest_digest == written.manifest_digest


def test_chunked_upload_and_blob_checks(plain_registry: RunningRegistry, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 40 + b"tail"
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    desc = Descriptor(OCI_LAYER, digest, len(payload))
    client = RegistryClient(plain_registry.host, tls_verify=False, chunk_size=1000)
    assert not client.blob_exists("chunks/test", desc)
    client.push_blob("chunks/test", desc, lambda: io.BytesIO(payload))  # 11 PATCHes then PUT
    assert client.blob_exists("chunks/test", desc)
    cache = BlobCache(tmp_path / "c")
    client.fetch_blob("chunks/test", desc, cache)
    assert cache.path(digest).read_bytes() == payload
    # the registry checks what we upload: content that does not match the digest is refused
    wrong = Descriptor(OCI_LAYER, "sha256:" + "0" * 64, len(payload))
    with pytest.raises(RegistryError, match=r"digest|invalid"):
        client.push_blob("chunks/test", wrong, lambda: io.BytesIO(payload))
    # and we check what we download: a descriptor with the wrong size is caught
    short = Descriptor(OCI_LAYER, digest, len(payload) - 1)
    with pytest.raises(ImageError, match="size mismatch"):
        client.fetch_blob("chunks/test", short, BlobCache(tmp_path / "c2"))


def test_multi_arch_through_registry(plain_registry: RunningRegistry, multi_arch_layout: Path,
                                     cache: BlobCache) -> None:
    ref = f"docker://{plain_registry.host}/multi/app:1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{multi_arch_layout}:multi", ref)
    amd = skopeo_inspect(f"oci:{multi_arch_layout}:amd")["Digest"]
    with open_image(ref, cache=cache, tls_verify=False) as src:
        assert src.manifest_digest == amd
        assert src.index is not None
    with pytest.raises(ImageError, match=r"no linux/riscv64 image in the index"):
        open_image(ref, cache=cache, tls_verify=False, platform="linux/riscv64")


# TLS + htpasswd ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_image(
    tls_registry: RunningRegistry, sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory
) -> str:
    ref = f"docker://{tls_registry.host}/secure/app:v1"
    certs = cert_dir(tls_registry, tmp_path_factory.mktemp("tls-certs"))
    skopeo("copy", "--dest-cert-dir", certs, "--dest-creds", tls_registry.creds, sample_image.ref, ref)
    return ref


def test_tls_basic_auth_pull(tls_registry: RunningRegistry, tls_image: str, cache: BlobCache, tmp_path: Path) -> None:
    expected = skopeo_inspect(tls_image, "--cert-dir", cert_dir(tls_registry, tmp_path), "--creds",
                              tls_registry.creds)["Digest"]
    with open_image(tls_image, cache=cache, credentials=CREDS, ca_file=tls_registry.ca_file) as src:
        assert src.manifest_digest == expected


def test_tls_auth_failures(tls_registry: RunningRegistry, tls_image: str, cache: BlobCache) -> None:
    with pytest.raises(RegistryAuthError) as info:
        open_image(tls_image, cache=cache, ca_file=tls_registry.ca_file)
    assert str(info.value) == (
        f"registry {tls_registry.host}: unauthorized: credentials required "
        f"(GET /v2/secure/app/manifests/v1, HTTP 401)"
    )
    assert info.value.exit_code == 2
    with pytest.raises(RegistryAuthError, match=rf"registry {tls_registry.host}: unauthorized: credentials refused"):
        open_image(tls_image, cache=cache, ca_file=tls_registry.ca_file, credentials=Credentials(USERNAME, "wrong"))
    # without the test CA the certificate is not trusted
    with pytest.raises(RegistryError, match=rf"registry {tls_registry.host}: TLS error: .*certificate verify failed"):
        open_image(tls_image, cache=cache, credentials=CREDS)


def test_tls_ca_from_ssl_cert_file_and_creds_from_docker_config(
    tls_registry: RunningRegistry, tls_image: str, cache: BlobCache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tls_registry.ca_file is not None
    monkeypatch.setenv("SSL_CERT_FILE", tls_registry.ca_file)
    config_dir = tmp_path / "docker"
    config_dir.mkdir()
    auth = base64.b64encode(tls_registry.creds.encode()).decode()
    (config_dir / "config.json").write_text(json.dumps({"auths": {f"https://{tls_registry.host}": {"auth": auth}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(config_dir))
    with open_image(tls_image, cache=cache) as src:
        assert src.config.user == "1000:1000"


def test_tls_push(tls_registry: RunningRegistry, sample_image: SampleImage, cache: BlobCache, tmp_path: Path) -> None:
    config, layers = parts_of(sample_image.ref, cache)
    ref = f"docker://{tls_registry.host}/secure/pushed:v1"
    with pytest.raises(RegistryAuthError, match="unauthorized"):
        write_image(ref, config=config, layers=layers, ca_file=tls_registry.ca_file)
    written = write_image(ref, config=config, layers=layers, credentials=CREDS, ca_file=tls_registry.ca_file)
    inspect = skopeo_inspect(ref, "--cert-dir", cert_dir(tls_registry, tmp_path), "--creds", tls_registry.creds)
    assert inspect["Digest"] == written.manifest_digest


# Bearer tokens -------------------------------------------------------------------------------------------


def test_token_auth(token_registry: RunningRegistry, sample_image: SampleImage, cache: BlobCache,
                    tmp_path: Path) -> None:
    tokens = token_registry.extra["token_server"]
    ref = f"docker://{token_registry.host}/tok/app:v1"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", token_registry.creds, sample_image.ref, ref)
    expected = skopeo_inspect(ref, "--tls-verify=false", "--creds", token_registry.creds)["Digest"]
    tokens.requests.clear()
    with open_image(ref, cache=cache, credentials=CREDS, tls_verify=False) as src:
        assert src.manifest_digest == expected
        for layer in src.layers:
            src.open_blob(layer).close()
    # one token for the pull scope, re-used for manifest and blobs
    assert [r["scope"] for r in tokens.requests] == [["repository:tok/app:pull"]]
    assert tokens.requests[0]["service"] == ["salmiac-test-registry"]
    # push with a pull,push token
    config, layers = parts_of(sample_image.ref, BlobCache(tmp_path / "c2"))
    pushed = f"docker://{token_registry.host}/tok/pushed:v1"
    written = write_image(pushed, config=config, layers=layers, credentials=CREDS, tls_verify=False)
    assert skopeo_inspect(pushed, "--tls-verify=false", "--creds", token_registry.creds)["Digest"] == \
        written.manifest_digest


def test_token_auth_failures(token_registry: RunningRegistry, cache: BlobCache) -> None:
    ref = f"docker://{token_registry.host}/tok/app:v1"
    with pytest.raises(RegistryAuthError, match=rf"registry {token_registry.host}: unauthorized: bad credentials"):
        open_image(ref, cache=cache, credentials=Credentials(USERNAME, "nope"), tls_verify=False)
    with pytest.raises(RegistryAuthError, match=rf"registry {token_registry.host}: unauthorized"):
        open_image(ref, cache=cache, tls_verify=False)


def test_expired_token_is_refreshed(token_registry: RunningRegistry, sample_image: SampleImage) -> None:
    ref = f"docker://{token_registry.host}/tok/refresh:v1"
    skopeo("copy", "--dest-tls-verify=false", "--dest-creds", token_registry.creds, sample_image.ref, ref)
    client = RegistryClient(token_registry.host, credentials=CREDS, tls_verify=False)
    client.get_manifest("tok/refresh", "v1")
    scope = "repository:tok/refresh:pull"
    client._tokens[scope] = "expired.token.value"  # what a token looks like to the registry once it expired
    tokens = token_registry.extra["token_server"]
    before = len(tokens.requests)
    data, _media_type, _digest = client.get_manifest("tok/refresh", "v1")
    assert json.loads(data)["schemaVersion"] == 2
    assert len(tokens.requests) == before + 1


def test_cross_repository_mount(token_registry: RunningRegistry) -> None:
    """The blob is mounted from another repository: no bytes are sent (the opener is never called)."""
    payload = b"mount me " * 50
    desc = Descriptor(OCI_LAYER, "sha256:" + hashlib.sha256(payload).hexdigest(), len(payload))
    client = RegistryClient(token_registry.host, credentials=CREDS, tls_verify=False)
    client.push_blob("mount/source", desc, lambda: io.BytesIO(payload))

    def must_not_upload() -> io.BytesIO:
        raise AssertionError("the blob should have been mounted, not uploaded")

    client.push_blob("mount/target", desc, must_not_upload, mount_from="mount/source")
    assert client.blob_exists("mount/target", desc)
    tokens = token_registry.extra["token_server"]
    assert ["repository:mount/target:pull,push", "repository:mount/source:pull"] in [
        r.get("scope") for r in tokens.requests
    ]
    # a source repository without the blob: the registry declines the mount and we upload
    other = b"not mountable"
    other_desc = Descriptor(OCI_LAYER, "sha256:" + hashlib.sha256(other).hexdigest(), len(other))
    client.push_blob("mount/target", other_desc, lambda: io.BytesIO(other), mount_from="mount/empty")
    assert client.blob_exists("mount/target", other_desc)
