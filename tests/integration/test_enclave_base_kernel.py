"""ensure_kernel against the real Debian archive (one ~33 MiB download, then cached)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from salmiac.enclave_base import debs, kernel
from salmiac.errors import RequestError

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "enclave_base"


def test_kernel_is_unpacked_and_consistent() -> None:
    bundle = kernel.ensure_kernel(CACHE)
    assert bundle.version.startswith("6.12.") and bundle.version.endswith("-cloud-amd64")
    assert kernel.kernel_release_of(bundle.bzimage) == bundle.version
    assert bundle.config_value("NSM") == "m"
    assert bundle.config_value("CONFIG_DEVTMPFS") == "y"
    assert (bundle.modules_dir / "modules.builtin").exists()
    assert list(bundle.modules_dir.glob("kernel/drivers/block/nbd.ko*"))
    assert (
        debs.sha256_file(
            CACHE
            / "kernel"
            / debs.deb_filename(f"linux-image-{bundle.version}-unsigned", bundle.deb_version, "amd64")
        )
        == bundle.deb_sha256
    )


def test_pinned_cached_kernel_needs_no_apt() -> None:
    bundle = kernel.ensure_kernel(CACHE)
    release = bundle.version.removesuffix("-cloud-amd64")
    saved = debs.run_tool
    try:
        debs.run_tool = _forbidden
        assert kernel.ensure_kernel(CACHE, release) == bundle
        assert kernel.ensure_kernel(CACHE, bundle.version) == bundle
    finally:
        debs.run_tool = saved


@pytest.mark.parametrize("bad", ["5.10.0-1", "6.12.118", "6.12.118+deb12-amd64", "../x", ""])
def test_bad_release_is_a_request_error(bad: str) -> None:
    with pytest.raises(RequestError, match="kernel release"):
        kernel.ensure_kernel(CACHE, bad)


def _forbidden(*args: object, **kwargs: object) -> str:
    raise AssertionError("apt was consulted although the kernel is cached")
