"""Networking through the emulated enclave (QEMU under TCG) against the same servers run directly, in the same run.

    sudo .venv/bin/python bench/bench_enclave_net.py [--runs 3] [--seconds 5] [--requests 2000]

Topology (tests/helpers/enclave_net.py): client netns --veth--> parent netns. First the baseline: Debian's
redis-server and iperf3 started directly in the parent netns, measured from the client. Then `salmiac run
--emulate --network transparent` of the servers test image (the same Debian redis-server and iperf3 inside the
enclave) in the parent netns, measured from the client the same way. TCG emulates every guest instruction, so the
enclave's figures say how usable local emulation is, not what Nitro does (there the guest runs natively).

Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("SALMIAC_CACHE_DIR", str(REPO / ".cache" / "salmiac"))

from fixtures.images import build_servers  # noqa: E402
from helpers.enclave_net import PARENT_IP, Hosts, run_enclave, stop_enclave, wait_until  # noqa: E402

SALMIAC = [sys.executable, "-m", "salmiac"]


def iperf(h: Hosts, seconds: int, reverse: bool) -> float:
    args = ["iperf3", "-c", PARENT_IP, "-t", str(seconds), "-J", *(["-R"] if reverse else [])]
    for _attempt in range(5):
        out = json.loads(h.ns(h.client, *args, timeout=seconds + 120, check=False).stdout or "{}")
        if "sum_received" in out.get("end", {}):
            return float(out["end"]["sum_received"]["bits_per_second"]) / 1e9
        # Under TCG the server may still be tearing the previous test down ("the server is busy").
        time.sleep(2)
    raise RuntimeError(f"iperf3 {' '.join(args)}: {out.get('error', out)}")


def redis_rps(h: Hosts, requests: int) -> dict[str, float]:
    out = h.ns(h.client, "redis-benchmark", "-h", PARENT_IP, "-t", "set,get", "-n", str(requests), "-c", "10",
               "-q", timeout=600).stdout
    found = {m.group(1).lower(): float(m.group(2)) for m in re.finditer(r"^(SET|GET): ([\d.]+) requests", out, re.M)}
    if set(found) != {"set", "get"}:
        raise RuntimeError(f"redis-benchmark said: {out}")
    return found


def measure(h: Hosts, runs: int, seconds: int, requests: int) -> dict[str, list[float]]:
    got: dict[str, list[float]] = {"tcp_in": [], "tcp_out": [], "redis_set": [], "redis_get": []}
    for _ in range(runs):
        got["tcp_in"].append(iperf(h, seconds, reverse=False))
        got["tcp_out"].append(iperf(h, seconds, reverse=True))
        rps = redis_rps(h, requests)
        got["redis_set"].append(rps["set"])
        got["redis_get"].append(rps["get"])
    return got


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--requests", type=int, default=2000)
    args = p.parse_args()
    image = build_servers()
    with tempfile.TemporaryDirectory(prefix="bench-enet-") as tmp:
        work = Path(tmp)
        req = work / "request.json"
        req.write_text(json.dumps({
            "input_image": {"name": image.ref}, "output_image": {"name": f"oci:{work / 'out'}:servers"},
            "nitro_enclaves_options": {"cpu_count": 1, "mem_size": "1024M"},
        }))
        subprocess.run([*SALMIAC, "convert", "--quiet", str(req)], check=True, stdout=subprocess.DEVNULL)
        h = Hosts(work)
        try:
            direct = [
                h.spawn(h.parent, "redis-server", "--bind", PARENT_IP, "--port", "6379", "--save", "",
                        "--protected-mode", "no", "--appendonly", "no", log="redis-direct.log"),
                h.spawn(h.parent, "iperf3", "--server", "--bind", PARENT_IP, log="iperf-direct.log"),
            ]
            wait_until(lambda: ":6379" in h.ns(h.parent, "ss", "-ltn").stdout, what="direct redis")
            wait_until(lambda: ":5201" in h.ns(h.parent, "ss", "-ltn").stdout, what="direct iperf3")
            base = measure(h, args.runs, args.seconds, args.requests)
            for proc in direct:
                proc.terminate()
                proc.wait(timeout=30)
            started = time.monotonic()
            enclave = run_enclave(h, f"oci:{work / 'out'}:servers", "--network", "transparent", app_args=())
            boot = time.monotonic() - started
            enc = measure(h, args.runs, args.seconds, args.requests)
            stop_enclave(h, enclave)
        finally:
            h.close()

    def fmt(values: list[float], unit: str) -> str:
        return f"{statistics.mean(values):.3g} {unit} ({min(values):.3g}..{max(values):.3g})"

    print(f"enclave boot to servers ready: {boot:.1f} s; {args.runs} runs of iperf3 -t {args.seconds}, "
          f"redis-benchmark -n {args.requests} -c 10\n")
    print("| measure | through the emulated enclave | direct (same servers in the parent netns) | ratio |")
    print("|---|---|---|---|")
    rows = (("iperf3 TCP client → app", "tcp_in", "Gbit/s"), ("iperf3 TCP app → client (-R)", "tcp_out", "Gbit/s"),
            ("redis-benchmark SET", "redis_set", "req/s"), ("redis-benchmark GET", "redis_get", "req/s"))
    for label, key, unit in rows:
        ratio = statistics.mean(enc[key]) / statistics.mean(base[key])
        print(f"| {label} | {fmt(enc[key], unit)} | {fmt(base[key], unit)} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
