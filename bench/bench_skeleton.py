"""Issue 2 benchmarks: conversion time and emulated boot-to-app-start, each against a standard tool, same run.

- convert: `salmiac convert` of the python3 test image (warm cache: kernel, enclave base and parent layer already
  built) vs `skopeo copy` + `umoci unpack` of the same image (what any tool must at least do: read and unpack it).
- boot: `salmiac run --emulate` from launch to the app's first output line vs plain QEMU booting the same
  kernel (same machine type, accel and icount) with a one-file busybox initramfs whose /init echoes a line: the
  floor any emulated boot of that kernel pays.

Run: .venv/bin/python bench/bench_skeleton.py [--runs N]. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("SALMIAC_CACHE_DIR", str(REPO / ".cache" / "salmiac"))

from fixtures.images import build_python  # noqa: E402
from salmiac.enclave_base.kernel import ensure_kernel  # noqa: E402
from salmiac.image.tree import Kind  # noqa: E402
from salmiac.rootfs.cpio import CpioWriter  # noqa: E402

SALMIAC = [sys.executable, "-m", "salmiac"]


def timed(cmd: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def first_line_time(cmd: list[str], marker: bytes) -> float:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:
        if marker in line:
            elapsed = time.monotonic() - start
            break
    else:
        raise RuntimeError(f"{cmd[0]}: marker not seen")
    proc.kill()
    proc.wait()
    return elapsed


def floor_initramfs(dst: Path) -> None:
    busybox = Path("/bin/busybox").read_bytes()
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for d in ("bin", "dev", "proc"):
        w.add_dir(d, mode=0o755)
    w.add_device("dev/console", Kind.CHAR, 5, 1, mode=0o600)
    w.add_file("bin/busybox", busybox, mode=0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_file("init", b"#!/bin/sh\n/bin/busybox echo FLOOR-READY\n/bin/busybox poweroff -f\n", mode=0o755)
    w.finish()
    dst.write_bytes(buf.getvalue())


def summary(values: list[float]) -> str:
    mean = statistics.mean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} s ± {spread:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    image = build_python()
    work = Path(tempfile.mkdtemp(prefix="bench-skeleton-"))
    req = work / "req.json"
    out = f"oci:{work / 'out'}:bench"
    req.write_text(json.dumps({"input_image": {"name": image.ref}, "output_image": {"name": out},
                               "nitro_enclaves_options": {"cpu_count": 1, "mem_size": "1024M"}}))
    subprocess.run([*SALMIAC, "convert", "--quiet", str(req)], check=True, stdout=subprocess.DEVNULL)  # warm

    ours_conv, std_conv, ours_boot, floor_boot = [], [], [], []
    kernel = ensure_kernel(Path(os.environ["SALMIAC_CACHE_DIR"]) / "kernel")
    floor = work / "floor.cpio"
    floor_initramfs(floor)
    qemu_floor = ["qemu-system-x86_64", "-M", "microvm,acpi=on", "-cpu", "max", "-accel", "tcg", "-icount",
                  "shift=auto", "-m", "1024M", "-smp", "1", "-nodefaults", "-no-user-config", "-no-reboot",
                  "-display", "none", "-serial", "stdio", "-kernel", str(kernel.bzimage), "-initrd", str(floor),
                  "-append", "console=ttyS0 quiet panic=-1"]
    for i in range(args.runs):
        shutil.rmtree(work / "out", ignore_errors=True)
        ours_conv.append(timed([*SALMIAC, "convert", "--quiet", str(req)]))
        std_dir = work / f"std{i}"
        std_dir.mkdir()  # skopeo wants the layout's parent to exist
        std_conv.append(timed(["sh", "-c", f"skopeo copy {image.ref} oci:{std_dir}/layout:x && "
                                           f"umoci unpack --image {std_dir}/layout:x {std_dir}/bundle"]))
        shutil.rmtree(std_dir, ignore_errors=True)
        # --network none: the floor has no network either (the relay's set-up is measured in bench_enclave_net)
        ours_boot.append(first_line_time([*SALMIAC, "run", "--emulate", "--network", "none", out], b'"argv"'))
        floor_boot.append(first_line_time(qemu_floor, b"FLOOR-READY"))
    print("| benchmark | salmiac | standard | ratio (salmiac / standard) |")
    print("|---|---|---|---|")
    print(f"| convert python3 image (warm cache) | {summary(ours_conv)} | skopeo copy + umoci unpack "
          f"{summary(std_conv)} | {statistics.mean(ours_conv) / statistics.mean(std_conv):.2f} |")
    print(f"| emulated boot to app's first line | {summary(ours_boot)} | QEMU + same kernel + busybox /init "
          f"{summary(floor_boot)} | {statistics.mean(ours_boot) / statistics.mean(floor_boot):.2f} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
