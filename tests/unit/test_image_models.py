"""Manifest, index and config parsing, including hostile documents."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from salmiac.errors import ImageError, RequestError
from salmiac.image import models
from salmiac.image.models import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    Index,
    Manifest,
    Platform,
    parse_config,
    parse_index,
    parse_manifest,
    parse_manifest_or_index,
)

# Shared CPUs: no per-example deadline; generation of nested JSON may be slow.
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def manifest_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": models.OCI_CONFIG, "digest": D1, "size": 10},
        "layers": [
            {"mediaType": models.OCI_LAYER_GZIP, "digest": D2, "size": 20},
            {"mediaType": models.OCI_LAYER_ZSTD, "digest": D3, "size": 30, "annotations": {"a": "b"}},
        ],
    }
    doc.update(overrides)
    return doc


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def test_oci_manifest() -> None:
    parsed = parse_manifest(enc(manifest_doc()))
    assert parsed.media_type == OCI_MANIFEST
    assert parsed.config.digest == D1
    assert [layer.size for layer in parsed.layers] == [20, 30]
    assert parsed.layers[1].annotations == {"a": "b"}
    assert models.layer_compression(parsed.layers[1].media_type) is models.Compression.ZSTD


def test_docker_schema2_manifest() -> None:
    doc = manifest_doc(mediaType=DOCKER_MANIFEST)
    doc["config"]["mediaType"] = models.DOCKER_CONFIG
    doc["layers"] = [{"mediaType": models.DOCKER_LAYER_GZIP, "digest": D2, "size": 1}]
    parsed = parse_manifest(enc(doc))
    assert parsed.media_type == DOCKER_MANIFEST
    assert models.layer_compression(parsed.layers[0].media_type) is models.Compression.GZIP


def test_media_type_from_hint_or_shape() -> None:
    doc = manifest_doc()
    del doc["mediaType"]
    assert parse_manifest(enc(doc)).media_type == OCI_MANIFEST
    assert parse_manifest(enc(doc), DOCKER_MANIFEST).media_type == DOCKER_MANIFEST
    index = {"schemaVersion": 2, "manifests": []}
    assert isinstance(parse_manifest_or_index(enc(index)), Index)


def index_doc(*platforms: tuple[str, str, str]) -> bytes:
    entries = []
    for i, (os_name, arch, variant) in enumerate(platforms):
        plat = {"os": os_name, "architecture": arch}
        if variant:
            plat["variant"] = variant
        entries.append({"mediaType": OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 5, "platform": plat})
    entries.append({"mediaType": OCI_MANIFEST, "digest": D3, "size": 5,
                    "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
                    "platform": {"os": "unknown", "architecture": "unknown"}})
    return enc({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": entries})


def test_index_selects_platform() -> None:
    index = parse_index(index_doc(("linux", "arm64", "v8"), ("linux", "amd64", ""), ("windows", "amd64", "")))
    assert index.select(Platform.parse("linux/amd64")).digest == "sha256:" + f"{1:064x}"
    assert index.select(Platform.parse("linux/arm64")).digest == "sha256:" + f"{0:064x}"
    assert index.select(Platform.parse("linux/arm64/v8")).digest == "sha256:" + f"{0:064x}"


def test_index_without_platform_lists_available() -> None:
    index = parse_index(index_doc(("linux", "arm64", "v8"), ("linux", "arm", "v7")))
    with pytest.raises(ImageError, match=r"no linux/amd64 image .*linux/arm/v7, linux/arm64/v8, unknown/unknown"):
        index.select(Platform.parse("linux/amd64"))


@pytest.mark.parametrize("text", ["linux", "linux/", "/amd64", "a/b/c/d", ""])
def test_bad_platform(text: str) -> None:
    with pytest.raises(RequestError, match="invalid platform"):
        Platform.parse(text)


HOSTILE = [
    (b"[]", "expected a JSON object"),
    (b"\xff\xfe", "invalid JSON"),
    (b"{", "invalid JSON"),
    (b'{"schemaVersion": NaN}', "invalid JSON"),
    (b"[" * 100 + b"]" * 100, "nested deeper"),
    (enc({"schemaVersion": 1, "fsLayers": []}), "schema 1"),
    (enc(manifest_doc(schemaVersion=3)), "unsupported schemaVersion"),
    (enc(manifest_doc(mediaType="application/x-foo")), "unsupported media type"),
    (enc(manifest_doc(config={"mediaType": "application/x", "digest": D1, "size": 1})), "not an image"),
    (enc(manifest_doc(config={"mediaType": models.OCI_CONFIG, "digest": "md5:abc", "size": 1})), "digest"),
    (enc(manifest_doc(config={"mediaType": models.OCI_CONFIG, "digest": D1, "size": -1})), "invalid size"),
    (enc(manifest_doc(config={"mediaType": models.OCI_CONFIG, "digest": D1, "size": True})), "invalid size"),
    (enc(manifest_doc(config={"mediaType": models.OCI_CONFIG, "digest": D1, "size": 1 << 40})), "config of"),
    (enc(manifest_doc(layers={})), "layers must be a list"),
    (enc(manifest_doc(layers=[{"mediaType": models.OCI_LAYER, "digest": D2, "size": 1}] * 501)), "exceeds the limit"),
    (enc(manifest_doc(layers=[{"mediaType": "application/vnd.oci.image.layer.v1.tar+encrypted", "digest": D2,
                               "size": 1}])), "unsupported layer media type"),
    (enc(manifest_doc(layers=[{"mediaType": models.OCI_LAYER, "digest": "sha256:" + "A" * 64, "size": 1}])),
     "invalid"),
    (enc(manifest_doc(annotations={"a": 1})), "must map to a string"),
    (enc(manifest_doc(annotations={str(i): "x" for i in range(300)})), "more than 256"),
    (b" " * (models.MAX_MANIFEST_SIZE + 1), "exceeds"),
]


@pytest.mark.parametrize(("data", "message"), HOSTILE)
def test_hostile_manifests(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        parse_manifest_or_index(data)


def test_index_is_not_a_manifest() -> None:
    with pytest.raises(ImageError, match="expected an image manifest"):
        parse_manifest(index_doc(("linux", "amd64", "")))
    with pytest.raises(ImageError, match="more than 1000"):
        entry = {"mediaType": OCI_MANIFEST, "digest": D1, "size": 1}
        parse_index(enc({"schemaVersion": 2, "manifests": [entry] * 1001}))


@FUZZ
@given(st.binary(max_size=2000))
def test_fuzz_manifest_bytes(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        parse_manifest_or_index(data)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests",
                                        "annotations"]), JSONISH))
def test_fuzz_manifest_structure(doc: dict[str, Any]) -> None:
    with contextlib.suppress(ImageError):
        parse_manifest_or_index(enc(doc))


def config_doc(**container: Any) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": container,
        "rootfs": {"type": "layers", "diff_ids": [D2, D3]},
        "history": [{"created_by": "test"}],
    }


def test_config_fields() -> None:
    data = enc(config_doc(
        Entrypoint=["/bin/app", "--flag"], Cmd=None, Env=["PATH=/bin", "EMPTY="], WorkingDir="/srv", User="1000:1000",
        ExposedPorts={"8080/tcp": {}, "53/udp": {}}, Labels={"k": "v"}, StopSignal="SIGINT",
    ))
    config = parse_config(data)
    assert config.entrypoint == ("/bin/app", "--flag")
    assert config.cmd is None
    assert config.env == ("PATH=/bin", "EMPTY=")
    assert config.working_dir == "/srv"
    assert config.user == "1000:1000"
    assert config.exposed_ports == ("53/udp", "8080/tcp")
    assert config.labels == {"k": "v"}
    assert config.stop_signal == "SIGINT"
    assert config.diff_ids == (D2, D3)
    assert config.platform == Platform("linux", "amd64")
    assert config.raw == data
    assert config.doc["history"] == [{"created_by": "test"}]


def test_config_without_container_section() -> None:
    doc = config_doc()
    doc["config"] = None
    config = parse_config(enc(doc))
    assert config.entrypoint is None and config.env == () and config.user == ""


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["config"].update(Entrypoint="/bin/sh"), "Entrypoint must be a list of strings"),
        (lambda d: d["config"].update(Cmd=[1]), "Cmd must be a list of strings"),
        (lambda d: d["config"].update(Env=["NOEQUALS"]), "not NAME=VALUE"),
        (lambda d: d["config"].update(User=0), "User must be a string"),
        (lambda d: d["config"].update(Labels={"a": None}), "must map to a string"),
        (lambda d: d["config"].update(ExposedPorts=["80"]), "ExposedPorts must be an object"),
        (lambda d: d.update(rootfs={"type": "layers"}), "diff_ids must be a list"),
        (lambda d: d.update(rootfs={"type": "zip", "diff_ids": []}), "type 'layers'"),
        (lambda d: d["rootfs"].update(diff_ids=["sha256:xyz"]), "invalid"),
        (lambda d: d.update(config=[]), "config must be an object"),
    ],
)
def test_bad_configs(mutate: Any, message: str) -> None:
    doc = config_doc()
    mutate(doc)
    with pytest.raises(ImageError, match=message):
        parse_config(enc(doc))


def test_canonical_manifest_bytes_are_deterministic() -> None:
    config = models.Descriptor(models.OCI_CONFIG, D1, 10)
    layers = [models.Descriptor(models.OCI_LAYER_GZIP, D2, 20)]
    one = models.manifest_bytes(config, layers, {"b": "2", "a": "1"})
    two = models.manifest_bytes(config, layers, {"a": "1", "b": "2"})
    assert one == two
    parsed = parse_manifest(one)
    assert isinstance(parsed, Manifest)
    assert list(parsed.annotations) == ["a", "b"]
    assert b" " not in one
