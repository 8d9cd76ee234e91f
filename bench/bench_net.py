"""Throughput of the enclave network relay against a plain veth pair, in the same run.

    sudo .venv/bin/python bench/bench_net.py [--runs 5] [--seconds 5] [--json out.json]

Topology (tests/integration/netns_topology.py): client netns --veth--> parent netns (relay, AF_PACKET,
transparent mode, segmentation offload on) --Unix socket--> enclave netns (TAP). The baseline is a second veth
pair from the same client netns straight to a "direct" netns, measured in the same run, with the client's two
veths configured alike in each of two settings:

- ``default``: the kernel's default offloads. The client's TSO hands the parent 64 KiB segments, as GRO on a
  real NIC does; the baseline is a plain veth pair as it comes.
- ``nooffload``: checksum/TSO/GSO off on the client's veths: the parent gets MTU-sized frames (a NIC without
  GRO); the baseline veth moves MTU-sized frames too.

Measured: iperf3 TCP client -> enclave and enclave -> client (-R), redis-benchmark SET/GET requests/s.
Figures are mean and spread (min..max) over ``--runs``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))

from netns_topology import PARENT_IP, Topology, wait_until  # type: ignore[import-not-found,unused-ignore]

DIRECT_CLIENT_IP = "10.78.0.1"
DIRECT_IP = "10.78.0.2"


def iperf(topo: Topology, server_ns: str, server_ip: str, seconds: int, reverse: bool) -> float:
    """One iperf3 run; Gbit/s as seen by the receiver."""
    srv = topo.spawn(server_ns, "iperf3", "-s", "-1", "-B", server_ip)
    try:
        wait_until(
            lambda: f"{server_ip}:5201" in topo.ns(server_ns, "ss", "-ltnH").stdout, what="iperf3 server listening"
        )
        cmd = ["iperf3", "-c", server_ip, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
        r = topo.ns(topo.client, *cmd, check=False, timeout=seconds + 30)
        result = json.loads(r.stdout)
        if "error" in result:
            raise RuntimeError(f"iperf3 to {server_ip}: {result['error']}")
        return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        if srv.poll() is None:
            srv.terminate()
        srv.wait(timeout=30)


def python_pid(pid: int) -> int:
    """The Python process under ``ip netns exec`` (which execs) or ``unshare`` (which forks)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0]) if children else pid


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_ping(topo: Topology, host: str) -> bool:
    return bool(topo.ns(topo.client, "redis-cli", "-h", host, "PING", check=False).stdout.strip() == "PONG")


def redis_rps(topo: Topology, host: str, requests: int) -> dict[str, float]:
    r = topo.ns(topo.client, "redis-benchmark", "-h", host, "-t", "set,get", "-n", str(requests), "-q",
                "-P", "1", "-c", "20", timeout=300)  # fmt: skip
    out: dict[str, float] = {}
    for line in r.stdout.replace("\r", "\n").splitlines():
        m = re.match(r"^(SET|GET): ([\d.]+) requests per second", line.strip())
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "stdev": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def add_direct_pair(topo: Topology) -> str:
    direct = f"salm-d-{secrets.token_hex(3)}"
    topo.sh("ip", "netns", "add", direct)
    topo.created.append(direct)
    topo.ns(direct, "ip", "link", "set", "lo", "up")
    topo.sh("ip", "link", "add", "c1", "netns", topo.client, "type", "veth", "peer", "name", "d1", "netns", direct)
    topo.ns(topo.client, "ip", "addr", "add", f"{DIRECT_CLIENT_IP}/24", "dev", "c1")
    topo.ns(direct, "ip", "addr", "add", f"{DIRECT_IP}/24", "dev", "d1")
    topo.ns(topo.client, "ip", "link", "set", "c1", "up")
    topo.ns(direct, "ip", "link", "set", "d1", "up")
    return direct


def set_offloads(topo: Topology, on: bool) -> None:
    """The client's veth to the relay (c0) and to the direct netns (c1), alike."""
    state = "on" if on else "off"
    for dev in ("c0", "c1"):
        topo.ns(topo.client, "ethtool", "-K", dev, "tx", state, "tso", state, "gso", state)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--redis-requests", type=int, default=50_000)
    ap.add_argument("--mtu", type=int, default=1500)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="salmiac-bench-net-") as tmp:
        topo = Topology(Path(tmp), mtu=args.mtu)
        try:
            direct = add_direct_pair(topo)
            topo.ns(topo.client, "ip", "link", "set", "c1", "mtu", str(args.mtu))
            topo.ns(direct, "ip", "link", "set", "d1", "mtu", str(args.mtu))
            for ns, ip in ((topo.enclave, PARENT_IP), (direct, DIRECT_IP)):
                topo.spawn(ns, "redis-server", "--bind", ip, "--port", "6379", "--protected-mode", "no",
                           "--save", "", "--appendonly", "no")  # fmt: skip
            series: dict[str, list[float]] = {}
            relay_pid, enclave_pid = python_pid(topo.relay.pid), python_pid(topo.enclave_proc.pid)
            for run in range(args.runs):
                for reverse in (False, True):
                    d = "enclave_to_client" if reverse else "client_to_enclave"
                    for setting in ("default", "nooffload"):
                        set_offloads(topo, on=setting == "default")
                        cpu0 = (cpu_seconds(relay_pid), cpu_seconds(enclave_pid))
                        gbps = iperf(topo, topo.enclave, PARENT_IP, args.seconds, reverse)
                        series.setdefault(f"relay_{setting}_{d}_gbps", []).append(gbps)
                        # CPU per GB moved: a figure other load on the machine distorts far less than Gbit/s.
                        gbytes = gbps * args.seconds / 8
                        series.setdefault(f"cpu_s_per_gb_relay_{setting}_{d}", []).append(
                            (cpu_seconds(relay_pid) - cpu0[0]) / gbytes)
                        series.setdefault(f"cpu_s_per_gb_enclave_{setting}_{d}", []).append(
                            (cpu_seconds(enclave_pid) - cpu0[1]) / gbytes
                        )
                        series.setdefault(f"veth_{setting}_{d}_gbps", []).append(
                            iperf(topo, direct, DIRECT_IP, args.seconds, reverse)
                        )
                set_offloads(topo, on=True)
                for name, host in (("relay", PARENT_IP), ("direct", DIRECT_IP)):
                    wait_until(functools.partial(redis_ping, topo, host), what="redis")
                    for op, rps in redis_rps(topo, host, args.redis_requests).items():
                        series.setdefault(f"redis_{name}_{op.lower()}_rps", []).append(rps)
                print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
            relay_stats = topo.stop_relay()
        finally:
            topo.close()

    result: dict[str, Any] = {k: summary(v) for k, v in sorted(series.items())}
    ratios: dict[str, Any] = {}
    for d in ("client_to_enclave", "enclave_to_client"):
        for setting in ("default", "nooffload"):
            relay, veth = series[f"relay_{setting}_{d}_gbps"], series[f"veth_{setting}_{d}_gbps"]
            ratios[f"{d}_{setting}_relay_vs_veth"] = summary([a / b for a, b in zip(relay, veth, strict=True)])
    for op in ("set", "get"):
        r = [a / b for a, b in zip(series[f"redis_relay_{op}_rps"], series[f"redis_direct_{op}_rps"], strict=True)]
        ratios[f"redis_{op}_relay_vs_direct"] = summary(r)
    result["ratios"] = ratios
    result["relay_drops"] = {
        "from_stream": relay_stats["from_stream"],
        "to_stream": relay_stats["to_stream"],
        "device_rx_dropped": relay_stats.get("device_rx_dropped"),
    }
    result["config"] = {
        "runs": args.runs,
        "seconds": args.seconds,
        "mtu": args.mtu,
        "when": time.time(),
        "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
        "cpus": os.cpu_count(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
