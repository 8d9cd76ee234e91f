"""dm-verity hash-tree time: salmiac.rootfs.verity.format_verity against `veritysetup format`, same file, same run.

A random file (default 256 MiB) under .cache/verity/bench; interleaved repetitions, both writing the tree to a
separate hash file with the same salt and --no-superblock; the root hashes must agree. Prints mean, standard
deviation and min per tool, and the ratio ours/veritysetup of mean time (<= 1.0 means we are at least as fast).
The file stays in the page cache between runs, so this measures hashing, not the disk.

    .venv/bin/python bench/bench_verity.py [--size-mib 256] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from salmiac.rootfs.verity import format_verity  # noqa: E402

DEFAULT_WORKDIR = ROOT / ".cache" / "verity" / "bench"
SALT = bytes.fromhex("5a1a" * 16)


def _make_data(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    with open(path, "wb") as fh:
        for _ in range(size // (1 << 20)):
            fh.write(os.urandom(1 << 20))
        fh.write(os.urandom(size % (1 << 20)))


def _ours(data: Path, hash_file: Path) -> tuple[float, str]:
    start = time.perf_counter()
    info = format_verity(data, hash_file, salt=SALT)
    return time.perf_counter() - start, info.root_hash


def _veritysetup(data: Path, hash_file: Path) -> tuple[float, str]:
    hash_file.unlink(missing_ok=True)
    start = time.perf_counter()
    out = subprocess.run(["veritysetup", "format", "--no-superblock", f"--salt={SALT.hex()}", str(data),
                          str(hash_file)], capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    match = re.search(r"^Root hash:\s+([0-9a-f]{64})$", out, re.MULTILINE)
    if not match:
        raise SystemExit(f"no root hash in veritysetup output:\n{out}")
    return elapsed, match.group(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    args = parser.parse_args(argv)
    if shutil.which("veritysetup") is None:
        raise SystemExit("veritysetup not found (apt-get install cryptsetup-bin)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"data-{args.size_mib}m"
    _make_data(data, args.size_mib << 20)
    _ours(data, args.workdir / "warmup.hash")  # page cache, imports

    times: dict[str, list[float]] = {"salmiac": [], "veritysetup": []}
    for _ in range(args.reps):
        ours_s, ours_root = _ours(data, args.workdir / "ours.hash")
        theirs_s, theirs_root = _veritysetup(data, args.workdir / "theirs.hash")
        if ours_root != theirs_root:
            raise SystemExit(f"root hash mismatch: salmiac {ours_root} veritysetup {theirs_root}")
        times["salmiac"].append(ours_s)
        times["veritysetup"].append(theirs_s)
    if (args.workdir / "ours.hash").read_bytes() != (args.workdir / "theirs.hash").read_bytes():
        raise SystemExit("hash trees differ")

    print(f"dm-verity hash tree of {args.size_mib} MiB, sha256, 4096-byte blocks, {args.reps} reps")
    for name, values in times.items():
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {name:12s} mean {mean:6.3f} s  sd {sd:5.3f}  min {min(values):6.3f} s  "
              f"({args.size_mib / mean:7.1f} MiB/s)")
    ratio = statistics.mean(times["salmiac"]) / statistics.mean(times["veritysetup"])
    print(f"  ratio salmiac/veritysetup (time): {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
