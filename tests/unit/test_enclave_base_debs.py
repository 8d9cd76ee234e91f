from __future__ import annotations

from pathlib import Path

import pytest

from salmiac.enclave_base import debs
from salmiac.errors import RequestError


def test_parse_deb_filename_unescapes_epoch() -> None:
    assert debs.parse_deb_filename("zlib1g_1%3a1.2.13.dfsg-1+deb12u1_amd64.deb") == (
        "zlib1g",
        "1:1.2.13.dfsg-1+deb12u1",
        "amd64",
    )
    assert debs.parse_deb_filename("media-types_10.0.0_all.deb") == ("media-types", "10.0.0", "all")


def test_lock_round_trip(tmp_path: Path) -> None:
    pins = [
        debs.Pin("zlib1g", "1:1.2.13", "amd64", "a" * 64, "zlib1g_1%3a1.2.13_amd64.deb"),
        debs.Pin("busybox-static", "1:1.35.0-4", "amd64", "b" * 64, "busybox-static_1%3a1.35.0-4_amd64.deb"),
    ]
    lock = tmp_path / "x.lock"
    debs.write_lock(lock, pins)
    assert debs.read_lock(lock) == sorted(pins, key=lambda p: p.name)
    assert lock.read_text().splitlines()[0] == debs.LOCK_HEADER


@pytest.mark.parametrize(
    "line",
    [
        "zlib1g 1.2 amd64 deadbeef zlib1g_1.2_amd64.deb",  # short hash
        "zlib1g 1.2 amd64 " + "a" * 64 + " ../zlib1g_1.2_amd64.deb",  # path in file name
        "Zlib 1.2 amd64 " + "a" * 64 + " z.deb",  # bad name
        "zlib1g 1.2 amd64",  # missing fields
    ],
)
def test_lock_rejects_malformed_lines(tmp_path: Path, line: str) -> None:
    lock = tmp_path / "x.lock"
    lock.write_text(line + "\n")
    with pytest.raises(RequestError, match=r"x\.lock:1"):
        debs.read_lock(lock)


@pytest.mark.parametrize("name", ["", "-rf", "foo bar", "Foo", "a;b", "foo=1 2"])
def test_bad_package_names_are_refused_before_apt(tmp_path: Path, name: str) -> None:
    with pytest.raises(RequestError, match="invalid package name"):
        debs.download_closure([name], tmp_path)


def test_a_string_is_not_a_package_list(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        debs.download_closure("busybox-static", tmp_path)


def test_request_key_ignores_order() -> None:
    assert debs.request_key(["a", "b"], ["c"]) == debs.request_key(["b", "a"], ["c"])
    assert debs.request_key(["a", "b"], []) != debs.request_key(["a", "b"], ["c"])
