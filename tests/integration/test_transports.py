"""Every file transport against real tools: umoci and skopeo make the inputs and judge our outputs.

Needs skopeo and umoci (Debian packages). Fixtures come from tests/fixtures/registry.py.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import socketserver
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from fixtures.registry import SAMPLE_LAYERS, SampleImage, blob_path, run, skopeo, skopeo_inspect
from salmiac.errors import ImageError, RequestError, RuntimeFailure
from salmiac.image.cache import BlobCache
from salmiac.image.destination import LayerBlob, write_image
from salmiac.image.models import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor
from salmiac.image.source import ImageSource, open_image


def tar_files(stream: BinaryIO) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                out[member.name.removeprefix("./")] = handle.read()
    return out


def check_against_skopeo(src: ImageSource, ref: str) -> None:
    """Our view of an image equals skopeo's: manifest digest, layer digests, config."""
    inspect = skopeo_inspect(ref)
    assert src.manifest_digest == inspect["Digest"]
    assert [layer.digest for layer in src.layers] == inspect["Layers"]
    config = json.loads(skopeo("inspect", "--config", ref).stdout)
    assert json.loads(src.config.raw) == config
    assert list(src.config.diff_ids) == config["rootfs"]["diff_ids"]


def check_sample_contents(src: ImageSource) -> None:
    assert len(src.layers) == len(SAMPLE_LAYERS)
    for layer, expected, diff_id in zip(src.layers, SAMPLE_LAYERS, src.config.diff_ids, strict=True):
        with src.open_layer(layer) as stream:
            assert tar_files(stream) == expected
        with src.open_layer(layer) as stream:
            assert "sha256:" + hashlib.sha256(stream.read()).hexdigest() == diff_id
    config = src.config
    assert config.entrypoint == ("/bin/app", "--serve")
    assert config.cmd == ("default-arg",)
    assert "GREETING=hello" in config.env
    assert (config.working_dir, config.user, config.stop_signal) == ("/srv", "1000:1000", "SIGINT")
    assert config.exposed_ports == ("8080/tcp",)
    assert config.labels == {"org.example": "yes"}
    assert (config.os, config.architecture) == ("linux", "amd64")


@pytest.fixture
def cache(tmp_path: Path) -> BlobCache:
    return BlobCache(tmp_path / "cache")


def test_oci_layout(sample_image: SampleImage, cache: BlobCache) -> None:
    with open_image(sample_image.ref, cache=cache) as src:
        check_against_skopeo(src, sample_image.ref)
        check_sample_contents(src)
        assert all(layer.media_type == OCI_LAYER_GZIP for layer in src.layers)


def test_oci_layout_tag_errors(sample_image: SampleImage, cache: BlobCache) -> None:
    with pytest.raises(ImageError, match=r"no image tagged 'nope' \(tags: v1\)"):
        open_image(f"oci:{sample_image.layout}:nope", cache=cache)
    with open_image(f"oci:{sample_image.layout}", cache=cache) as src:  # the only image needs no tag
        assert src.manifest_digest == skopeo_inspect(sample_image.ref)["Digest"]
    with pytest.raises(ImageError, match="not an OCI image layout"):
        open_image(f"oci:{sample_image.layout / 'blobs'}", cache=cache)
    with pytest.raises(ImageError, match="no such directory"):
        open_image("oci:/nonexistent/layout", cache=cache)


def test_oci_archive(sample_image: SampleImage, cache: BlobCache, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    skopeo("copy", sample_image.ref, f"oci-archive:{archive}:v1")
    ref = f"oci-archive:{archive}:v1"
    with open_image(ref, cache=cache) as src:
        check_against_skopeo(src, ref)
        check_sample_contents(src)


def test_docker_archive(sample_image: SampleImage, cache: BlobCache, tmp_path: Path) -> None:
    archive = tmp_path / "docker.tar"
    skopeo("copy", sample_image.ref, f"docker-archive:{archive}:example/app:v1")
    for ref in (f"docker-archive:{archive}", f"docker-archive:{archive}:example/app:v1",
                f"docker-archive:{archive}:@0"):
        with open_image(ref, cache=cache) as src:
            # The archive has no manifest of its own; layers are stored uncompressed, so the layer
            # digests we compute are the diff_ids, and the config is byte-identical to skopeo's.
            inspect = skopeo_inspect(f"docker-archive:{archive}")
            assert [layer.digest for layer in src.layers] == inspect["Layers"]
            assert list(src.config.diff_ids) == inspect["Layers"]
            assert all(layer.media_type == OCI_LAYER for layer in src.layers)
            config = json.loads(skopeo("inspect", "--config", f"docker-archive:{archive}").stdout)
            assert json.loads(src.config.raw) == config
            check_sample_contents(src)
    with pytest.raises(ImageError, match=r"no image named other:v1 \(tags: docker\.io/example/app:v1\)"):
        open_image(f"docker-archive:{archive}:other:v1", cache=cache)
    with pytest.raises(ImageError, match="no image @3"):
        open_image(f"docker-archive:{archive}:@3", cache=cache)


def test_docker_archive_member_names_stay_inside(tmp_path: Path, cache: BlobCache) -> None:
    """A hostile manifest.json cannot make us read host files: names are archive keys only."""
    secret = tmp_path / "secret"
    secret.write_text("do not read")
    archive = tmp_path / "evil.tar"
    manifest = json.dumps([{"Config": "c.json", "RepoTags": [], "Layers": [str(secret), "../../" + str(secret)]}])
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64] * 2}})
    with tarfile.open(archive, "w") as tar:
        for name, data in (("manifest.json", manifest.encode()), ("c.json", config.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ImageError, match=f"no member '{str(secret).lstrip('/')}'"):
        open_image(f"docker-archive:{archive}", cache=cache)


@pytest.fixture(scope="module")
def compression_variants(sample_image: SampleImage, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The sample image with gzip (umoci), zstd and uncompressed layers (skopeo recompressing)."""
    base = tmp_path_factory.mktemp("compression")
    plain_archive = base / "plain.tar"  # docker-archive layers are uncompressed
    skopeo("copy", sample_image.ref, f"docker-archive:{plain_archive}")
    skopeo("copy", "--dest-compress-format", "zstd", f"docker-archive:{plain_archive}", f"oci:{base}/zstd:t")
    # skopeo 1.9 keeps the layers uncompressed here but labels them "+gzip" (a skopeo bug); that layout is
    # kept as a case of its own, and a copy with the media types corrected is the uncompressed variant.
    skopeo("copy", "--dest-oci-accept-uncompressed-layers", f"docker-archive:{plain_archive}",
           f"oci:{base}/mislabelled:t")
    shutil.copytree(base / "mislabelled", base / "plain")
    relabel_layers(base / "plain", OCI_LAYER)
    return {OCI_LAYER_GZIP: sample_image.ref, OCI_LAYER_ZSTD: f"oci:{base}/zstd:t", OCI_LAYER: f"oci:{base}/plain:t",
            "mislabelled": f"oci:{base}/mislabelled:t"}


def relabel_layers(layout: Path, media_type: str) -> None:
    """Rewrite the layout's only manifest with another layer media type (new manifest blob, new index)."""
    index = json.loads((layout / "index.json").read_text())
    entry = index["manifests"][0]
    manifest = json.loads(blob_path(layout, entry["digest"]).read_bytes())
    for layer in manifest["layers"]:
        layer["mediaType"] = media_type
    data = json.dumps(manifest).encode()
    entry["digest"] = "sha256:" + hashlib.sha256(data).hexdigest()
    entry["size"] = len(data)
    blob_path(layout, entry["digest"]).write_bytes(data)
    (layout / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("variant", [OCI_LAYER_GZIP, OCI_LAYER_ZSTD, OCI_LAYER, "mislabelled"])
def test_layer_compressions(compression_variants: dict[str, str], variant: str, cache: BlobCache) -> None:
    ref = compression_variants[variant]
    with open_image(ref, cache=cache) as src:
        assert {layer.media_type for layer in src.layers} == {OCI_LAYER_GZIP if variant == "mislabelled" else variant}
        check_against_skopeo(src, ref)
        check_sample_contents(src)


def copy_layout(sample_image: SampleImage, dest: Path) -> Path:
    shutil.copytree(sample_image.layout, dest)
    return dest


def test_tampered_layer_is_refused(sample_image: SampleImage, tmp_path: Path) -> None:
    layout = copy_layout(sample_image, tmp_path / "layout")
    cache = BlobCache(tmp_path / "cache")
    with open_image(f"oci:{layout}:v1", cache=cache) as src:
        target = src.layers[1]
        path = blob_path(layout, target.digest)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(ImageError, match=rf"layer {target.digest}: digest mismatch"):
            src.open_blob(target)
        path.write_bytes(bytes(data[:-1]))
        with pytest.raises(ImageError, match=rf"layer {target.digest}: size mismatch"):
            src.open_blob(target)
        assert not cache.has(target.digest)  # nothing unverified entered the cache
        first = src.layers[0]
        with src.open_blob(first) as handle:  # untouched layers still read
            assert hashlib.sha256(handle.read()).hexdigest() == first.digest.split(":")[1]


def test_tampered_manifest_and_config(sample_image: SampleImage, tmp_path: Path) -> None:
    digest = skopeo_inspect(sample_image.ref)["Digest"]
    layout = copy_layout(sample_image, tmp_path / "m")
    path = blob_path(layout, digest)
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion": 2'))
    with pytest.raises(ImageError, match=f"manifest {digest}: "):
        open_image(f"oci:{layout}:v1", cache=BlobCache(tmp_path / "c1"))
    layout = copy_layout(sample_image, tmp_path / "c")
    manifest = json.loads(blob_path(layout, digest).read_bytes())
    config_path = blob_path(layout, manifest["config"]["digest"])
    config_path.write_bytes(config_path.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(ImageError, match=rf"config {manifest['config']['digest']}: digest mismatch"):
        open_image(f"oci:{layout}:v1", cache=BlobCache(tmp_path / "c2"))


def test_multi_arch_index_picks_amd64(multi_arch_layout: Path, cache: BlobCache) -> None:
    multi_arch = multi_arch_layout
    ref = f"oci:{multi_arch}:multi"
    amd = skopeo_inspect(f"oci:{multi_arch}:amd")["Digest"]
    # oracle: copying the index without --all, skopeo picks the same (amd64) manifest
    skopeo("copy", ref, f"oci:{multi_arch.parent}/picked:x")
    assert skopeo_inspect(f"oci:{multi_arch.parent}/picked:x")["Digest"] == amd
    with open_image(ref, cache=cache) as src:
        assert src.manifest_digest == amd
        assert src.index is not None and len(src.index.manifests) == 2
        with src.open_layer(src.layers[0]) as stream:
            assert tar_files(stream) == {"arch": b"amd64\n"}
    with open_image(ref, cache=cache, platform="linux/arm64") as src:
        assert src.manifest_digest == skopeo_inspect(f"oci:{multi_arch}:arm")["Digest"]
        assert src.config.architecture == "arm64"
    with pytest.raises(ImageError, match=r"no linux/s390x image in the index \(available platforms: "
                                         r"linux/amd64, linux/arm64/v8\)"):
        open_image(ref, cache=cache, platform="linux/s390x")
    with pytest.raises(ImageError, match="is linux/arm64, not linux/amd64"):
        open_image(f"oci:{multi_arch}:arm", cache=cache)


# Destinations --------------------------------------------------------------------------------------------


@pytest.fixture
def sample_parts(sample_image: SampleImage, cache: BlobCache) -> tuple[bytes, list[LayerBlob]]:
    """Config bytes and layer files of the sample image, as the converter would hand them over."""
    with open_image(sample_image.ref, cache=cache) as src:
        layers = [
            LayerBlob(str(cache.path(layer.digest)), layer.media_type, layer.digest, layer.size, diff_id)
            for layer, diff_id in zip(src.layers, src.config.diff_ids, strict=True)
        ]
        for layer in src.layers:
            src.open_blob(layer).close()  # into the cache
        return src.config.raw, layers


def unpack_and_check(layout: Path, tag: str, tmp_path: Path) -> None:
    """umoci unpacks it, and the files are the sample's merged layers."""
    bundle = tmp_path / f"bundle-{tag}"
    run(["umoci", "unpack", "--rootless", "--image", f"{layout}:{tag}", bundle])
    rootfs = bundle / "rootfs"
    assert (rootfs / "etc/hello.txt").read_bytes() == b"replaced in layer 1\n"
    assert (rootfs / "bin/app").read_bytes() == SAMPLE_LAYERS[0]["bin/app"]
    assert (rootfs / "srv/data/blob.bin").read_bytes() == SAMPLE_LAYERS[1]["srv/data/blob.bin"]


def test_write_oci_layout(sample_parts: tuple[bytes, list[LayerBlob]], tmp_path: Path) -> None:
    config, layers = sample_parts
    out = tmp_path / "out"
    written = write_image(f"oci:{out}:first", config=config, layers=layers,
                          annotations={"org.opencontainers.image.title": "t"})
    assert skopeo_inspect(f"oci:{out}:first")["Digest"] == written.manifest_digest
    assert json.loads(skopeo("inspect", "--raw", f"oci:{out}:first").stdout) == json.loads(written.manifest_bytes)
    unpack_and_check(out, "first", tmp_path)
    # same inputs → same bytes; a second tag is added, re-using a tag replaces it
    again = write_image(f"oci:{out}:second", config=config, layers=layers,
                        annotations={"org.opencontainers.image.title": "t"})
    assert again.manifest_bytes == written.manifest_bytes
    other = write_image(f"oci:{out}:first", config=config, layers=layers, annotations={"replaced": "yes"})
    assert other.manifest_digest != written.manifest_digest
    index = json.loads((out / "index.json").read_text())
    tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert sorted(tags) == ["first", "second"]
    assert skopeo_inspect(f"oci:{out}:first")["Digest"] == other.manifest_digest
    assert not list(out.rglob("*.tmp"))
    run(["skopeo", "--insecure-policy", "copy", f"oci:{out}:second", f"oci:{tmp_path}/copied:x"])


def test_write_rejects_mismatched_layers(sample_parts: tuple[bytes, list[LayerBlob]], tmp_path: Path) -> None:
    config, layers = sample_parts
    broken = [layers[0], LayerBlob(layers[0].path, layers[1].media_type, layers[1].digest, layers[1].size,
                                   layers[1].diff_id)]
    with pytest.raises(ImageError, match=r"digest mismatch|size mismatch"):
        write_image(f"oci:{tmp_path}/bad:t", config=config, layers=broken)
    with pytest.raises(ImageError, match="diff_ids do not match"):
        write_image(f"oci:{tmp_path}/bad:t", config=config, layers=layers[:1])
    with pytest.raises(RequestError, match="not supported"):
        write_image("docker-daemon:x:y", config=config, layers=layers)


def test_write_oci_archive(sample_parts: tuple[bytes, list[LayerBlob]], tmp_path: Path) -> None:
    config, layers = sample_parts
    first = tmp_path / "a.tar"
    written = write_image(f"oci-archive:{first}:v2", config=config, layers=layers)
    assert skopeo_inspect(f"oci-archive:{first}:v2")["Digest"] == written.manifest_digest
    second = tmp_path / "b.tar"
    write_image(f"oci-archive:{second}:v2", config=config, layers=layers)
    assert first.read_bytes() == second.read_bytes()
    assert not (tmp_path / "a.tar.tmp").exists()
    skopeo("copy", f"oci-archive:{first}:v2", f"oci:{tmp_path}/unpacked:v2")
    unpack_and_check(tmp_path / "unpacked", "v2", tmp_path)


def test_write_docker_archive(sample_parts: tuple[bytes, list[LayerBlob]], tmp_path: Path, cache: BlobCache) -> None:
    config, layers = sample_parts
    first = tmp_path / "d.tar"
    write_image(f"docker-archive:{first}:example.com/team/app:v3", config=config, layers=layers)
    inspect = skopeo_inspect(f"docker-archive:{first}")
    assert inspect["Layers"] == [layer.diff_id for layer in layers]  # stored uncompressed
    assert json.loads(skopeo("inspect", "--config", f"docker-archive:{first}").stdout) == json.loads(config)
    second = tmp_path / "d2.tar"
    write_image(f"docker-archive:{second}:example.com/team/app:v3", config=config, layers=layers)
    assert first.read_bytes() == second.read_bytes()
    with tarfile.open(first) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        repositories = json.loads(tar.extractfile("repositories").read())  # type: ignore[union-attr]
    assert manifest[0]["RepoTags"] == ["example.com/team/app:v3"]
    assert set(repositories) == {"example.com/team/app"}
    assert "manifest.json" in names and all(not n.startswith("/") for n in names)
    skopeo("copy", f"docker-archive:{first}", f"oci:{tmp_path}/fromdocker:v3")
    unpack_and_check(tmp_path / "fromdocker", "v3", tmp_path)
    with open_image(f"docker-archive:{first}:example.com/team/app:v3", cache=cache) as src:  # our own reader
        assert list(src.config.diff_ids) == [layer.diff_id for layer in layers]
    unnamed = tmp_path / "unnamed.tar"
    write_image(f"docker-archive:{unnamed}", config=config, layers=layers)
    assert skopeo_inspect(f"docker-archive:{unnamed}")["Layers"] == [layer.diff_id for layer in layers]


# docker-daemon -------------------------------------------------------------------------------------------


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake_engine(sample_image: SampleImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A STAND-IN for the docker engine API, which cannot run here: a Unix-socket HTTP server that answers
    ``GET /images/{name}/get`` with a docker-archive made by skopeo, and 404 for other names. DOCKER_HOST
    points at it. Yields the list of request paths it saw."""
    archive = tmp_path / "engine-save.tar"
    skopeo("copy", sample_image.ref, f"docker-archive:{archive}:docker.io/library/sample:v1")
    payload = archive.read_bytes()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path == "/images/docker.io%2Flibrary%2Fsample%3Av1/get":
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for start in range(0, len(payload), 65536):  # chunked, like the engine streams it
                    chunk = payload[start:start + 65536]
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            else:
                body = b'{"message":"reference does not exist"}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

        def address_string(self) -> str:
            return "unix"

    sock = tmp_path / "docker.sock"
    server = _UnixHTTPServer(str(sock), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    yield seen
    server.shutdown()
    server.server_close()


def test_docker_daemon(fake_engine: list[str], sample_image: SampleImage, cache: BlobCache) -> None:
    with open_image("docker-daemon:sample:v1", cache=cache) as src:
        check_sample_contents(src)
        assert list(src.config.diff_ids) == [layer.digest for layer in src.layers]  # stored uncompressed
        assert json.loads(src.config.raw) == json.loads(skopeo("inspect", "--config", sample_image.ref).stdout)
    with pytest.raises(ImageError, match=r"docker-daemon:docker\.io/library/missing:latest: no such image"):
        open_image("docker-daemon:missing", cache=cache)
    assert fake_engine == ["/images/docker.io%2Flibrary%2Fsample%3Av1/get",
                           "/images/docker.io%2Flibrary%2Fmissing%3Alatest/get"]
    assert not list((cache.root / "tmp").iterdir())  # the saved archive is not left behind


def test_docker_daemon_unreachable(tmp_path: Path, cache: BlobCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/absent.sock")
    with pytest.raises(RuntimeFailure, match="cannot reach the docker engine"):
        open_image("docker-daemon:x", cache=cache)
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2375")
    with pytest.raises(RequestError, match="only unix://"):
        open_image("docker-daemon:x", cache=cache)


def test_descriptor_size_cap(sample_image: SampleImage, tmp_path: Path) -> None:
    """A descriptor claiming more than the cache's cap is refused before any byte is copied."""
    with open_image(sample_image.ref, cache=BlobCache(tmp_path / "c", max_blob_size=4096)) as src:
        layer = src.layers[0]
        forged = Descriptor(layer.media_type, layer.digest, 1 << 50)
        with pytest.raises(ImageError, match=rf"layer {layer.digest}: size {1 << 50} exceeds the 4096-byte limit"):
            src.open_blob(forged)
        assert not src._cache.has(layer.digest)


def test_hostile_layout_files(sample_image: SampleImage, tmp_path: Path) -> None:
    """Blobs that are FIFOs or symlinks out of the layout are refused without hanging or leaking."""
    layout = copy_layout(sample_image, tmp_path / "layout")
    with open_image(f"oci:{layout}:v1", cache=BlobCache(tmp_path / "cache")) as src:
        fifo_layer, link_layer = src.layers
        fifo = blob_path(layout, fifo_layer.digest)
        fifo.unlink()
        os.mkfifo(fifo)
        with pytest.raises(ImageError, match=r"blobs/sha256/[0-9a-f]{64} is not a regular file"):
            src.open_blob(fifo_layer)
        link = blob_path(layout, link_layer.digest)
        link.unlink()
        link.symlink_to("/etc/passwd")
        with pytest.raises(ImageError, match=rf"layer {link_layer.digest}: (size|digest) mismatch"):
            src.open_blob(link_layer)
