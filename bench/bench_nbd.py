"""Throughput of salmiac's NBD server against `nbdkit file`, measured with nbdcopy over Unix sockets.

Same files, same run, interleaved repetitions:
  read:  nbdcopy nbd+unix:///EXPORT null:     (export -> nowhere)
  write: nbdcopy SOURCE nbd+unix:///EXPORT    (file -> export)
Prints mean, standard deviation and min per server, and the ratio ours/nbdkit of mean throughput
(>= 1.0 means we are at least as fast). After the runs it checks the written export by sha256.

    .venv/bin/python bench/bench_nbd.py [--size-mib 256] [--reps 5] [--profile out.prof]
    .venv/bin/python bench/bench_nbd.py --nbdcopy-args=--connections=1 --nbdcopy-args=--requests=16

--profile runs our server under cProfile and writes the stats file (then: python -m pstats FILE).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = ROOT / ".cache" / "nbd" / "bench"


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], deadline_s: float = 20.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early with status {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as probe:
                if probe.connect_ex(str(path)) == 0:
                    return
        time.sleep(0.05)
    raise SystemExit(f"no server on {path} after {deadline_s}s")


def _sha256(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        remaining = size
        while remaining:
            chunk = f.read(min(remaining, 8 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed(cmd: Sequence[str], server_pid: int) -> tuple[float, float]:
    """Wall seconds of the client run, and CPU seconds the server spent meanwhile."""
    cpu = _cpu_seconds(server_pid)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start, _cpu_seconds(server_pid) - cpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--profile", type=Path, help="run our server under cProfile, write stats here")
    parser.add_argument("--nbdcopy-args", action="append", default=[], help="extra nbdcopy argument")
    args = parser.parse_args(argv)
    for tool in ("nbdcopy", "nbdkit", "nbdinfo"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (Debian: libnbd-bin, nbdkit)")

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    size = args.size_mib << 20
    source = work / "source.img"
    if not source.exists() or source.stat().st_size != size:
        with source.open("wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
    exports = {"read": work / "read.img", "write": work / "write.img"}
    shutil.copyfile(source, exports["read"])
    with exports["write"].open("wb") as f:
        f.truncate(size)

    ours_sock, kit_sock = work / "ours.sock", work / "nbdkit.sock"
    for sock in (ours_sock, kit_sock):
        sock.unlink(missing_ok=True)
    ours_cmd = [sys.executable]
    if args.profile:
        ours_cmd += ["-m", "cProfile", "-o", str(args.profile)]
    ours_cmd += ["-m", "salmiac.parent.nbd_server", "--socket", str(ours_sock),
                 "--export", f"read={exports['read']}", "--export", f"write={exports['write']}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    ours = subprocess.Popen(ours_cmd, env=env)
    # nbdkit's file plugin in dir= mode serves each file under its own name, like our two exports.
    kit = subprocess.Popen(["nbdkit", "-f", "-U", str(kit_sock), "file", f"dir={work}"])
    try:
        _wait_for_socket(ours_sock, ours)
        _wait_for_socket(kit_sock, kit)
        uris = {
            ("ours", "read"): f"nbd+unix:///read?socket={ours_sock}",
            ("ours", "write"): f"nbd+unix:///write?socket={ours_sock}",
            ("nbdkit", "read"): f"nbd+unix:///read.img?socket={kit_sock}",
            ("nbdkit", "write"): f"nbd+unix:///write.img?socket={kit_sock}",
        }
        extra = list(args.nbdcopy_args)

        pids = {"ours": ours.pid, "nbdkit": kit.pid}

        def run(server: str, direction: str) -> tuple[float, float]:
            uri = uris[server, direction]
            if direction == "read":
                return _timed(["nbdcopy", *extra, uri, "null:"], pids[server])
            return _timed(["nbdcopy", *extra, str(source), uri], pids[server])

        times: dict[tuple[str, str], list[float]] = {key: [] for key in uris}
        cpus: dict[tuple[str, str], list[float]] = {key: [] for key in uris}
        for key in uris:  # warm-up: page cache, file allocation
            run(*key)
        for _ in range(args.reps):
            for key in uris:
                wall, cpu = run(*key)
                times[key].append(wall)
                cpus[key].append(cpu)

        want = _sha256(source, size)
        for name in ("write", "read"):
            got = _sha256(exports[name], size)
            if got != want:
                raise SystemExit(f"{name} export content differs from the source (sha256 {got})")
    finally:
        for proc in (ours, kit):
            proc.send_signal(signal.SIGINT)
        for proc in (ours, kit):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    mib = size / (1 << 20)
    print(f"nbdcopy {' '.join(extra) or '(defaults)'}, {args.size_mib} MiB, {args.reps} repetitions, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'direction':<9} {'server':<7} {'mean s':>7} {'stdev s':>7} {'min s':>6} {'MiB/s':>6} "
          f"{'server CPU s':>12}")
    for direction in ("read", "write"):
        for server in ("ours", "nbdkit"):
            samples = times[server, direction]
            mean = statistics.mean(samples)
            stdev = statistics.stdev(samples) if len(samples) > 1 else 0.0
            cpu = statistics.mean(cpus[server, direction])
            print(f"{direction:<9} {server:<7} {mean:7.3f} {stdev:7.3f} {min(samples):6.3f} {mib / mean:6.0f} "
                  f"{cpu:12.3f}")
        ours_t, kit_t = times["ours", direction], times["nbdkit", direction]
        mean_ratio = statistics.mean(kit_t) / statistics.mean(ours_t)
        print(f"{direction:<9} ratio ours/nbdkit throughput: mean {mean_ratio:.2f}"
              f", best {min(kit_t) / min(ours_t):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
