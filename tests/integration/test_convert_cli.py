"""`salmiac convert` as a user runs it: determinism, output formats, and bad requests."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from fixtures.images import OciImage
from helpers.cli import convert, salmiac


def test_same_input_twice_gives_identical_eif_and_pcrs(busybox_image: OciImage, tmp_path: Path) -> None:
    first = convert(tmp_path, busybox_image.ref, f"oci:{tmp_path / 'a'}:x")
    second = convert(tmp_path, busybox_image.ref, f"oci:{tmp_path / 'b'}:x")
    assert first["eif"]["sha256"] == second["eif"]["sha256"]
    assert first["measurements"] == second["measurements"]
    assert first["converted_image"]["digest"] == second["converted_image"]["digest"]
    for pcr in ("PCR0", "PCR1", "PCR2"):
        assert len(bytes.fromhex(first["measurements"][pcr])) == 48


def test_output_image_is_accepted_by_skopeo_and_umoci(busybox_image: OciImage, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    response = convert(tmp_path, busybox_image.ref, f"oci:{out_dir}:conv")
    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{out_dir}:conv"], check=True,
                                        capture_output=True).stdout)
    assert inspect["Digest"] == response["converted_image"]["digest"]
    config = json.loads(subprocess.run(["skopeo", "inspect", "--config", f"oci:{out_dir}:conv"], check=True,
                                       capture_output=True).stdout)
    assert config["config"]["Entrypoint"][:2] == ["/opt/salmiac/bin/salmiac", "run"]
    assert config["config"]["Labels"]["com.salmiac.pcr0"] == response["measurements"]["PCR0"]
    bundle = tmp_path / "unpacked"
    subprocess.run(["umoci", "unpack", "--image", f"{out_dir}:conv", str(bundle)], check=True, capture_output=True)
    eif = bundle / "rootfs/opt/salmiac/enclave.eif"
    assert hashlib.sha256(eif.read_bytes()).hexdigest() == response["eif"]["sha256"]
    assert (bundle / "rootfs/usr/bin/python3.11").exists()  # the parent runtime
    root = str(bundle / "rootfs")
    helped = subprocess.run(["chroot", root, "/opt/salmiac/bin/salmiac", "run", "--help"], capture_output=True)
    assert helped.returncode == 0 and b"--network" in helped.stdout, helped.stderr.decode()
    # What the parent needs on a Nitro host, from the image's own packages (not this machine's).
    code = ("import sys; sys.path.insert(0, '/opt/salmiac/lib'); import salmiac.parent.netrelay, "
            "salmiac.parent.nitro, salmiac.parent.nbd_server; from pyroute2.iproute.linux import IPRoute; print('ok')")
    imported = subprocess.run(["chroot", root, "/usr/bin/python3.11", "-I", "-c", code], capture_output=True)
    assert imported.stdout.strip() == b"ok", imported.stderr.decode()
    for tool in ("nft", "ethtool"):  # on the image's PATH (Debian 12 ships ethtool in /sbin)
        assert any((bundle / "rootfs" / d / tool).exists() for d in ("usr/sbin", "sbin")), tool


def test_docker_archive_output(busybox_image: OciImage, tmp_path: Path) -> None:
    archive = tmp_path / "conv.tar"
    convert(tmp_path, busybox_image.ref, f"docker-archive:{archive}:salmiac/bb:conv")
    inspect = json.loads(subprocess.run(["skopeo", "inspect", f"docker-archive:{archive}"], check=True,
                                        capture_output=True).stdout)
    assert inspect["Labels"]["com.salmiac.version"]


BAD_REQUESTS = [
    ("missing-input", {"output_image": {"name": "oci:OUT:x"}}, "input_image"),
    ("mem-lots", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                  "nitro_enclaves_options": {"mem_size": "lots"}}, "mem_size"),
    ("unknown-field", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                       "converter_options": {"push_convertd_image": True}}, "push_convertd_image"),
    ("cpu-zero", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                  "nitro_enclaves_options": {"cpu_count": 0}}, "cpu_count"),
    ("env-no-equals", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                       "converter_options": {"env_vars": ["JUSTKEY"]}}, "env_vars"),
    ("registry-no-push", {"input_image": {"name": "oci:IN:latest"},
                          "output_image": {"name": "localhost:5000/x:y"}}, "push_converted_image"),
    ("not-json", "{not json", "JSON"),
    ("rootfs-mode", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                     "converter_options": {"rootfs": "nfs"}}, "converter_options.rootfs"),
    ("rw-size", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                 "converter_options": {"rw_storage_size": "huge"}}, "rw_storage_size"),
    ("rw-size-number", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                        "converter_options": {"rw_storage_size": 5}}, "rw_storage_size"),
    ("dev-key-in-request", {"input_image": {"name": "oci:IN:latest"}, "output_image": {"name": "oci:OUT:x"},
                            "converter_options": {"insecure_dev_key": True}}, "insecure_dev_key"),
]


@pytest.mark.parametrize(("case", "body", "named"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_one_line_exit_2_nothing_written(
    case: str, body: object, named: str, busybox_image: OciImage, tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    text = body if isinstance(body, str) else json.dumps(body)
    text = text.replace("oci:IN", f"oci:{busybox_image.layout}").replace("oci:OUT", f"oci:{out}")
    req = tmp_path / "req.json"
    req.write_text(text)
    proc = salmiac("convert", "--quiet", str(req))
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines
    assert proc.stdout == b""
    assert not out.exists()


def test_missing_input_image_is_an_error_naming_it(tmp_path: Path) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"input_image": {"name": f"oci:{tmp_path / 'nope'}:latest"},
                               "output_image": {"name": f"oci:{tmp_path / 'out'}:x"}}))
    proc = salmiac("convert", "--quiet", str(req))
    assert proc.returncode != 0
    assert str(tmp_path / "nope") in proc.stderr.decode()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "expected"), [
    (["run", "--emulate", "-p", "80", "oci:/nonexistent:x"], "-p '80': expected HOSTPORT:ENCLAVEPORT"),
    (["run", "--emulate", "--network", "none", "-p", "8080:80", "oci:/nonexistent:x"], "-p needs a network"),
    (["run", "--emulate", "-e", "NOEQUALS", "oci:/nonexistent:x"], "expected KEY=VALUE"),
    (["run", "--emulate", "--memory", "4XB", "oci:/nonexistent:x"], "is not a size"),
    (["run", "--emulate", "--hostname", "bad name", "oci:/nonexistent:x"], "--hostname 'bad name'"),
    (["run", "--emulate", "--dns", "not-an-ip", "oci:/nonexistent:x"], "--dns"),
    (["run", "--port", "80", "oci:/nonexistent:x"], "(see `salmiac run --help`)"),
    ([], "(see `salmiac --help`)"),
], ids=["publish", "publish-none", "env", "memory", "hostname", "dns", "unknown-flag", "no-command"])
def test_run_options_are_checked_before_the_image_is_touched(argv: list[str], expected: str) -> None:
    """A mistyped option is named on its own line, not hidden behind a missing (or slow to fetch) image."""
    proc = salmiac(*argv, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
