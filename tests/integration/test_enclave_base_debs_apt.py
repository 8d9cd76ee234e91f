"""Real apt against the host's configured Debian sources (downloads a few small packages once)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from salmiac.enclave_base import debs
from salmiac.errors import RequestError, RuntimeFailure

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "enclave_base" / "test-debs"


def test_closure_is_resolved_from_an_empty_system_and_cached(tmp_path: Path) -> None:
    paths = debs.download_closure(["libexpat1"], CACHE)
    names = [debs.parse_deb_filename(p.name)[0] for p in paths]
    # libexpat1 depends on libc6 (→ libgcc-s1, gcc-12-base): the host has them, the closure must too.
    assert {"libexpat1", "libc6", "libgcc-s1"} <= set(names)
    assert paths == sorted(paths)
    lock = CACHE / f"closure-{debs.request_key(['libexpat1'], [])}.lock"
    pins = debs.read_lock(lock)
    assert {p.filename for p in pins} == {p.name for p in paths}
    for pin, path in zip(sorted(pins, key=lambda p: p.filename), sorted(paths), strict=True):
        assert debs.sha256_file(path) == pin.sha256

    # Second call: served from the lock and cache; prove apt is not consulted by hiding it.
    saved = debs.run_tool
    try:
        debs.run_tool = _forbidden
        assert debs.download_closure(["libexpat1"], CACHE) == paths
    finally:
        debs.run_tool = saved

    debs.extract_debs(paths, tmp_path / "root")
    # bookworm's packages are not usr-merged: libraries are under /lib.
    assert list((tmp_path / "root").glob("lib/x86_64-linux-gnu/libexpat.so.1*"))
    assert (tmp_path / "root" / "lib/x86_64-linux-gnu/libc.so.6").exists()


def test_exclude_prunes_the_excluded_subtree() -> None:
    with_libc = {n for n, _, _ in debs.resolve(["libexpat1"])}
    without = {n for n, _, _ in debs.resolve(["libexpat1"], exclude=["libc6"])}
    assert "libc6" in with_libc and "libgcc-s1" in with_libc
    assert without == {"libexpat1"}


def test_tampered_cache_file_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    paths = debs.download_closure(["libexpat1"], cache, exclude=["libc6"], lock=tmp_path / "my.lock")
    assert paths[0].name.startswith("libexpat1_")
    paths[0].write_bytes(b"not a deb")
    with pytest.raises(RuntimeFailure, match="differs from the lock"):
        debs.download_closure(["libexpat1"], cache, exclude=["libc6"], lock=tmp_path / "my.lock")
    # A missing file is fetched again at the pinned version.
    paths[0].unlink()
    assert debs.download_closure(["libexpat1"], cache, exclude=["libc6"], lock=tmp_path / "my.lock") == paths
    info = subprocess.run(["dpkg-deb", "-f", str(paths[0]), "Package"], capture_output=True, text=True)
    assert info.stdout.strip() == "libexpat1"


def test_unknown_package_is_a_request_error(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="no-such-package-salmiac"):
        debs.download_closure(["no-such-package-salmiac"], tmp_path)


def _forbidden(*args: object, **kwargs: object) -> str:
    raise AssertionError("apt was consulted although the lock and cache were complete")
