"""A client network namespace and a parent namespace joined by a veth, for `salmiac run --emulate` with networking
(the e2e tests of issue 3 and bench/bench_enclave_net.py).

    client netns  c0 10.78.0.1/24  <--veth-->  p0 10.78.0.2/24  parent netns: `salmiac run --emulate` (QEMU)
    dnsmasq, http.server, curl, redis-cli                         enclave: salmiac0, the app's servers
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from helpers.cli import SALMIAC

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from netns_topology import have_netns_tools, wait_until

__all__ = ["have_netns_tools", "wait_until"]


CLIENT_IP, PARENT_IP = "10.78.0.1", "10.78.0.2"
WEB_NAME = "web.salmiac.test"
PAGE = "<h1>nginx in a salmiac enclave</h1>"
BOOT_TIMEOUT = 400.0


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.returncode} {proc.stderr.strip()}")
    return proc


class Hosts:
    """Two namespaces on a veth; services in the client; `salmiac run` in the parent."""

    def __init__(self, workdir: Path) -> None:
        tag = secrets.token_hex(3)
        self.client, self.parent = f"salm-nc-{tag}", f"salm-np-{tag}"
        self.dir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        for ns in (self.client, self.parent):
            sh("ip", "netns", "add", ns)
            self.ns(ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", "c0", "netns", self.client, "type", "veth", "peer", "p0", "netns", self.parent)
        self.ns(self.client, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "c0")
        self.ns(self.parent, "ip", "addr", "add", f"{PARENT_IP}/24", "dev", "p0")
        for ns, dev in ((self.client, "c0"), (self.parent, "p0")):
            # A real NIC segments on the wire; a veth hands 64 KiB super-frames to AF_PACKET (netrelay docs).
            self.ns(ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", check=False)
            self.ns(ns, "ip", "link", "set", dev, "up")
        self.ns(self.parent, "ip", "route", "add", "default", "via", CLIENT_IP)

    def ns(self, ns: str, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)

    def spawn(self, ns: str, *cmd: str, log: str) -> subprocess.Popen[bytes]:
        out = open(self.dir / log, "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start_client_services(self) -> None:
        www = self.dir / "www"
        www.mkdir()
        (www / "index.html").write_text("outbound-ok\n")
        self.spawn(self.client, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                   f"--listen-address={CLIENT_IP}", f"--address=/{WEB_NAME}/{CLIENT_IP}", "--log-queries",
                   "--pid-file=", log="dnsmasq.log")
        self.spawn(self.client, sys.executable, "-m", "http.server", "8080", "--bind", CLIENT_IP,
                   "--directory", str(www), log="web.log")
        wait_until(lambda: "8080" in self.ns(self.client, "ss", "-ltn").stdout, what="web server")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        for ns in (self.client, self.parent):
            sh("ip", "netns", "del", ns, check=False)


def run_enclave(
    h: Hosts, image: str, *options: str, app_args: tuple[str, ...] = ("fetch", WEB_NAME, "8080")
) -> subprocess.Popen[bytes]:
    enclave = h.spawn(h.parent, *SALMIAC, "-v", "run", "--emulate", "--console-log", str(h.dir / "console.log"),
                      "--dns", CLIENT_IP, *options, image, *app_args, log="run.log")
    wait_until(lambda: "ready" in h.log("run.log").split() or enclave.poll() is not None, timeout=BOOT_TIMEOUT,
               what="enclave servers")
    if enclave.poll() is not None:
        raise RuntimeError(h.log("run.log") + h.log("console.log")[-3000:])
    return enclave


def stop_enclave(h: Hosts, enclave: subprocess.Popen[bytes]) -> None:
    enclave.send_signal(signal.SIGTERM)  # to `ip netns exec`, which execs salmiac: the parent gets it
    status = enclave.wait(timeout=120)
    if status != 0:
        raise RuntimeError(f"salmiac run exited {status}: {h.log('run.log')}")


def redis(h: Hosts, port: int, *cmd: str) -> str:
    return h.ns(h.client, "redis-cli", "-h", PARENT_IP, "-p", str(port), *cmd, timeout=60).stdout.strip()
