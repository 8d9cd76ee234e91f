"""Issue 2's walking skeleton end to end: real images from Debian packages, converted by us, booted in QEMU.

Each run boots the EIF's own kernel and ramdisks under TCG; expect 20-60 s per boot on a shared machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.images import OciImage, docker_archive
from fixtures.registry import RunningRegistry
from helpers.cli import SALMIAC, convert, salmiac

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def converted_python(python_image: OciImage, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("conv-python")
    out = f"oci:{tmp / 'out'}:python"
    return out, convert(tmp, python_image.ref, out)


def _show(stdout: bytes) -> dict[str, Any]:
    lines = [line for line in stdout.decode().splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    result: dict[str, Any] = json.loads(lines[0])
    return result


def test_python_args_replace_cmd_and_exit_code(converted_python: tuple[str, dict[str, Any]]) -> None:
    image, _ = converted_python
    proc = salmiac("run", "--emulate", image, "exit=42", "second arg")
    assert proc.returncode == 42, proc.stderr.decode()
    shown = _show(proc.stdout)
    assert shown["argv"] == ["/app/show.py", "exit=42", "second arg"]  # ENTRYPOINT kept, CMD replaced
    assert (shown["uid"], shown["gid"]) == (1000, 1000)  # USER 1000:1000
    assert shown["cwd"] == "/app"  # WORKDIR
    assert shown["env"]["APP_GREETING"] == "hello world"
    assert shown["env"]["HOME"] == "/home/app"  # the image's ENV wins over the passwd default


def test_python_default_cmd_and_runtime_env(converted_python: tuple[str, dict[str, Any]]) -> None:
    image, _ = converted_python
    proc = salmiac("run", "--emulate", "-e", "SHOW_EXIT=5", "-e", "APP_EXTRA=x y", image)
    assert proc.returncode == 5, proc.stderr.decode()
    shown = _show(proc.stdout)
    assert shown["argv"] == ["/app/show.py", "default-arg"]
    assert shown["env"]["APP_EXTRA"] == "x y"
    assert shown["env"]["SHOW_EXIT"] == "5"


def test_inspect_matches_convert_response(converted_python: tuple[str, dict[str, Any]]) -> None:
    image, response = converted_python
    layout = image.removeprefix("oci:").rsplit(":", 1)[0]
    cache = Path(os.environ["SALMIAC_CACHE_DIR"])
    # Unpack the bundle through `run`'s own path, then inspect the EIF it found.
    from salmiac.parent.bundle import extract_bundle

    bundle = extract_bundle(f"oci:{layout}:python", cache)
    proc = salmiac("inspect", str(bundle / "enclave.eif"))
    assert proc.returncode == 0, proc.stderr.decode()
    described = json.loads(proc.stdout)
    for pcr in ("PCR0", "PCR1", "PCR2"):
        assert described["Measurements"][pcr] == response["measurements"][pcr]
    by_image = salmiac("inspect", f"oci:{layout}:python")  # the converted image itself, as a user has it
    assert by_image.returncode == 0 and json.loads(by_image.stdout) == described, by_image.stderr.decode()
    assert (bundle / "enclave.eif").stat().st_size == response["eif"]["size"]


def test_busybox_shell_form_from_docker_archive(busybox_image: OciImage, tmp_path: Path) -> None:
    archive = docker_archive(busybox_image)
    out = f"oci:{tmp_path / 'out'}:bb"
    convert(tmp_path, f"docker-archive:{archive}", out)
    proc = salmiac("run", "--emulate", out)
    assert proc.stdout.decode().splitlines() == ["hello from busybox"]
    assert proc.returncode == 3, proc.stderr.decode()


def test_multilayer_semantics_at_run_time(multilayer_image: OciImage, tmp_path: Path) -> None:
    out = f"oci:{tmp_path / 'out'}:ml"
    convert(tmp_path, multilayer_image.ref, out)
    proc = salmiac("run", "--emulate", out)
    assert "multilayer ok" in proc.stdout.decode(), (proc.stdout.decode(), proc.stderr.decode())
    assert proc.returncode == 0


def test_sigterm_reaches_the_app_and_killed_app_reports_128_plus_n(busybox_image: OciImage, tmp_path: Path) -> None:
    out = f"oci:{tmp_path / 'out'}:bb"
    convert(tmp_path, busybox_image.ref, out)
    script = "trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 1; done"
    proc = subprocess.Popen([*SALMIAC, "run", "--emulate", out, "/bin/sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    line = proc.stdout.readline()
    assert line == b"ready\n" and time.monotonic() < deadline
    proc.send_signal(signal.SIGTERM)
    rest, err = proc.communicate(timeout=300)
    assert rest == b"got TERM\n", err.decode()
    assert proc.returncode == 7

    # Ctrl-C in a terminal: SIGINT to the whole foreground process group, salmiac and whatever it started. QEMU
    # must not die of it; the app gets SIGINT and its own exit status comes back.
    script = "trap 'echo got INT; exit 3' INT; echo ready; while true; do sleep 1; done"
    proc = subprocess.Popen([*SALMIAC, "run", "--emulate", out, "/bin/sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    os.killpg(proc.pid, signal.SIGINT)
    rest, err = proc.communicate(timeout=300)
    assert rest == b"got INT\n" and b"Traceback" not in err, err.decode()
    assert proc.returncode == 3

    # An app killed by a signal is reported like a shell does: 128 + N.
    killed = salmiac("run", "--emulate", out, "/bin/sh", "-c", "kill -9 $$")
    assert killed.returncode == 128 + 9, killed.stderr.decode()


def test_registry_input_gives_the_same_pcrs_as_the_layout(
    python_image: OciImage, plain_registry: RunningRegistry, converted_python: tuple[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    ref = f"{plain_registry.host}/salmiac-test/python:1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", python_image.ref, f"docker://{ref}"],
                   check=True, capture_output=True)
    out = f"oci:{tmp_path / 'out'}:reg"
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"input_image": {"name": ref}, "output_image": {"name": out},
                               "nitro_enclaves_options": {"cpu_count": 1, "mem_size": "1024M"}}))
    proc = salmiac("convert", "--quiet", "--tls-verify=false", str(req))
    assert proc.returncode == 0, proc.stderr.decode()
    response = json.loads(proc.stdout)
    assert response["measurements"] == converted_python[1]["measurements"]
