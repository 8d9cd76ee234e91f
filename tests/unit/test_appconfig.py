"""protocol.appconfig: the measured app config round-trips, serialises deterministically, and is parsed strictly."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.protocol.appconfig import (
    APP_CONFIG_VERSION,
    MAX_LIST,
    AppConfig,
    AppConfigError,
    RootfsSpec,
)

FULL = AppConfig(
    entrypoint=["/docker-entrypoint.sh"],
    cmd=["nginx", "-g", "daemon off;"],
    env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "NGINX_VERSION=1.25.3"],
    working_dir="/usr/share/nginx",
    user="nginx:nginx",
    stop_signal=3,
    stop_timeout=30,
    exposed_ports=["80/tcp"],
    overlay_persistence=True,
    allow_cmdline_args=False,
    rootfs=RootfsSpec(type="initramfs", path="/rootfs"),
    image_name="docker.io/library/nginx:1.25",
    image_digest="sha256:" + "ab" * 32,
)

# The default config's exact bytes: these feed PCR0/PCR2, so a change here changes every measurement.
DEFAULT_JSON = (
    b'{"allow_cmdline_args":true,"cmd":[],"entrypoint":[],"env":[],"exposed_ports":[],"image_digest":"","image_name":"",'
    b'"overlay_persistence":false,"rootfs":{"path":"/rootfs","type":"initramfs"},"stop_signal":15,'
    b'"stop_timeout":10,"user":"","version":1,"working_dir":"/"}'
)


def test_default_bytes() -> None:
    assert AppConfig().to_json() == DEFAULT_JSON
    assert AppConfig.from_json(DEFAULT_JSON) == AppConfig()


def test_round_trip_full() -> None:
    raw = FULL.to_json()
    assert AppConfig.from_json(raw) == FULL
    assert AppConfig.from_json(raw).to_json() == raw


def test_deterministic_regardless_of_input_key_order() -> None:
    doc = json.loads(FULL.to_json())
    shuffled = json.dumps(dict(reversed(list(doc.items()))), indent=2).encode()
    assert shuffled != FULL.to_json()
    assert AppConfig.from_json(shuffled).to_json() == FULL.to_json()
    # Compact, sorted, ASCII: the only representation.
    raw = AppConfig(cmd=["\u00e9cho", "\u6c34"]).to_json()
    assert raw == json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    assert raw.isascii() and b" " not in raw


def test_missing_fields_take_defaults() -> None:
    assert AppConfig.from_json(b'{"version":1}') == AppConfig()
    assert AppConfig.from_json(b'{"version":1,"cmd":["sh"],"rootfs":{"path":"/r"}}') == AppConfig(
        cmd=["sh"], rootfs=RootfsSpec(path="/r")
    )


def doc(**fields: Any) -> bytes:
    return json.dumps({"version": APP_CONFIG_VERSION, **fields}).encode()


BAD: list[tuple[str, bytes, str]] = [
    ("not-json", b"{", "not JSON"),
    ("not-utf8", b'{"version":1,"user":"\xff"}', "not JSON"),
    ("deep", b"[" * 100_000, "not JSON"),
    ("array", b"[]", "not an object"),
    ("string", b'"x"', "not an object"),
    ("no-version", b"{}", "version"),
    ("version-2", doc(version=2), "version"),
    ("version-true", b'{"version":true}', "version"),
    ("version-str", b'{"version":"1"}', "version"),
    ("version-float", b'{"version":1.0}', "version"),
    ("unknown-field", doc(entrypont=["sh"]), "unknown app config field 'entrypont'"),
    ("duplicate-key", b'{"version":1,"user":"root","user":"nobody"}', "duplicate app config key 'user'"),
    ("nested-duplicate", b'{"version":1,"rootfs":{"path":"/a","path":"/b"}}', "duplicate"),
    ("cmd-str", doc(cmd="sh -c x"), "cmd must be a list of strings"),
    ("cmd-int-item", doc(cmd=["sh", 1]), "cmd must be a list of strings"),
    ("entrypoint-null", doc(entrypoint=None), "entrypoint"),
    ("env-nul", doc(env=["A=\0"]), "NUL"),
    ("exposed-ports-dict", doc(exposed_ports={"80/tcp": {}}), "exposed_ports"),
    ("too-many", doc(cmd=["x"] * (MAX_LIST + 1)), "cmd"),
    ("user-int", doc(user=0), "user must be a string"),
    ("working-dir-null", doc(working_dir=None), "working_dir must be a string"),
    ("working-dir-relative", doc(working_dir="app"), "absolute"),
    ("image-name-list", doc(image_name=[]), "image_name"),
    ("stop-signal-0", doc(stop_signal=0), "stop_signal"),
    ("stop-signal-65", doc(stop_signal=65), "stop_signal"),
    ("stop-signal-str", doc(stop_signal="SIGTERM"), "stop_signal"),
    ("stop-signal-bool", doc(stop_signal=True), "stop_signal"),
    ("stop-timeout-negative", doc(stop_timeout=-1), "stop_timeout"),
    ("stop-timeout-huge", doc(stop_timeout=3601), "stop_timeout"),
    ("stop-timeout-float", doc(stop_timeout=1.5), "stop_timeout"),
    ("stop-timeout-nan", b'{"version":1,"stop_timeout":NaN}', "stop_timeout"),
    ("overlay-int", doc(overlay_persistence=1), "overlay_persistence"),
    ("allow-cmdline-args-str", doc(allow_cmdline_args="yes"), "allow_cmdline_args"),
    ("rootfs-list", doc(rootfs=[]), "rootfs"),
    ("rootfs-unknown-key", doc(rootfs={"type": "initramfs", "size": 1}), "rootfs"),
    ("rootfs-type-int", doc(rootfs={"type": 5}), "rootfs"),
    ("rootfs-path-null", doc(rootfs={"path": None}), "rootfs"),
]


@pytest.mark.parametrize(("raw", "match"), [(r, m) for _, r, m in BAD], ids=[n for n, _, _ in BAD])
def test_rejected(raw: bytes, match: str) -> None:
    with pytest.raises(AppConfigError, match=match):
        AppConfig.from_json(raw)


def test_error_is_a_value_error() -> None:
    # Callers that only know "bad input" can still catch it.
    assert issubclass(AppConfigError, ValueError)


TEXT = st.text(st.characters(blacklist_characters="\0"), max_size=20)
CONFIGS = st.builds(
    AppConfig,
    entrypoint=st.lists(TEXT, max_size=4),
    cmd=st.lists(TEXT, max_size=4),
    env=st.lists(TEXT, max_size=4),
    working_dir=TEXT.map(lambda s: "/" + s),
    user=TEXT,
    stop_signal=st.integers(min_value=1, max_value=64),
    stop_timeout=st.integers(min_value=0, max_value=3600),
    exposed_ports=st.lists(TEXT, max_size=4),
    overlay_persistence=st.booleans(),
    allow_cmdline_args=st.booleans(),
    rootfs=st.one_of(
        st.builds(RootfsSpec, type=st.just("initramfs"), path=TEXT),
        st.builds(RootfsSpec, type=st.just("verity"), path=TEXT, fs=st.just("squashfs"),
                  verity=st.dictionaries(TEXT, st.integers() | TEXT, max_size=3)),
    ),
    image_name=TEXT,
    image_digest=TEXT,
)


@given(CONFIGS)
@settings(max_examples=200, deadline=None)
def test_round_trip_random(config: AppConfig) -> None:
    raw = config.to_json()
    again = AppConfig.from_json(raw)
    assert again == config
    assert again.to_json() == raw


def test_rootfs_type_and_verity_parameters_are_checked() -> None:
    good = AppConfig(rootfs=RootfsSpec(type="verity", fs="squashfs", verity={"root_hash": "00" * 32}))
    assert AppConfig.from_json(good.to_json()) == good
    for rootfs in ({"type": "nfs"}, {"type": "verity", "fs": "squashfs"}, {"type": "verity", "verity": {}},
                   {"type": "verity", "fs": "ext2", "verity": {}}, {"type": "initramfs", "extra": 1}):
        raw = AppConfig().to_json().replace(b'{"path":"/rootfs","type":"initramfs"}', json.dumps(rootfs).encode())
        assert raw != AppConfig().to_json()
        with pytest.raises(AppConfigError):
            AppConfig.from_json(raw)


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_only_raise_app_config_error(raw: bytes) -> None:
    with contextlib.suppress(AppConfigError):
        AppConfig.from_json(raw)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
    max_leaves=10,
)


@given(
    st.dictionaries(st.sampled_from([*AppConfig.__dataclass_fields__, "bogus"]), JSON_VALUES, max_size=6),
)
@settings(max_examples=200, deadline=None)
def test_random_field_values_only_raise_app_config_error(fields: dict[str, Any]) -> None:
    fields.setdefault("version", APP_CONFIG_VERSION)
    try:
        config = AppConfig.from_json(json.dumps(fields).encode())
    except AppConfigError:
        return
    # Anything accepted is well typed: it serialises and reads back identically.
    assert AppConfig.from_json(config.to_json()) == config
    assert all(isinstance(v, str) for v in (config.rootfs.type, config.rootfs.path, config.user))


def test_volumes_and_key_provider_are_checked() -> None:
    from salmiac.protocol.appconfig import KEY_INSECURE_DEV

    good = AppConfig(volumes=["/data", "/var/lib/db"], key_provider=KEY_INSECURE_DEV)
    assert AppConfig.from_json(good.to_json()) == good and good.needs_disk
    assert not AppConfig().needs_disk and AppConfig(overlay_persistence=True).needs_disk
    assert b"volumes" not in AppConfig().to_json() and b"key_provider" not in AppConfig().to_json()
    base = json.loads(AppConfig().to_json())
    for bad in ({"volumes": ["data"]}, {"volumes": ["/"]}, {"volumes": ["/x"] * 65}, {"key_provider": "kms"},
                {"volumes": "/data"}):
        with pytest.raises(AppConfigError):
            AppConfig.from_json(json.dumps({**base, **bad}).encode())


def test_volume_dirs_on_the_disk_are_distinct_and_flat() -> None:
    from salmiac.enclave.storage import DISK_DIR, _volume_dir

    names = [_volume_dir(p) for p in ("/a/b", "/a%2Fb", "/a_b", "/a/b/")]
    assert len(set(names[:3])) == 3
    assert all(os.path.dirname(n) == f"{DISK_DIR}/volumes" for n in names)
