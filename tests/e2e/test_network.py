"""Issue 3 end to end: unmodified nginx and redis-server from Debian in the emulated enclave, reached from a client
network namespace through the parent's relay; the enclave resolves a name through a DNS server (dnsmasq) in the
client namespace and fetches a page from it.

    client netns  c0 10.78.0.1/24  <--veth-->  p0 10.78.0.2/24  parent netns: `salmiac run --emulate` (QEMU)
    dnsmasq, http.server, curl, redis-cli                         enclave: salmiac0, nginx :80, redis :6379
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.images import OciImage
from helpers.cli import SALMIAC, convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from netns_topology import have_netns_tools, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.skipif(have_netns_tools() is not None, reason=str(have_netns_tools())),
]

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


@pytest.fixture(scope="module")
def converted_servers(servers_image: OciImage, tmp_path_factory: pytest.TempPathFactory) -> str:
    tmp = tmp_path_factory.mktemp("conv-servers")
    out = f"oci:{tmp / 'out'}:servers"
    convert(tmp, servers_image.ref, out)
    return out


@pytest.fixture()
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(tmp_path)
    try:
        h.start_client_services()
        yield h
    finally:
        h.close()


def run_enclave(h: Hosts, image: str, *options: str) -> subprocess.Popen[bytes]:
    enclave = h.spawn(h.parent, *SALMIAC, "-v", "run", "--emulate", "--console-log", str(h.dir / "console.log"),
                      "--dns", CLIENT_IP, *options, image, "fetch", WEB_NAME, "8080", log="run.log")
    wait_until(lambda: "ready" in h.log("run.log").split() or enclave.poll() is not None, timeout=BOOT_TIMEOUT,
               what="enclave servers")
    assert enclave.poll() is None, h.log("run.log") + h.log("console.log")[-3000:]
    return enclave


def stop_enclave(h: Hosts, enclave: subprocess.Popen[bytes]) -> None:
    enclave.send_signal(signal.SIGTERM)  # to `ip netns exec`, which execs salmiac: the parent gets it
    assert enclave.wait(timeout=120) == 0, h.log("run.log")
    assert "stopped" in h.log("run.log").split(), "the app got SIGTERM and stopped cleanly"
    assert h.ns(h.parent, "nft", "list", "tables").stdout.strip() == "", "the relay removed its nftables table"


def redis(h: Hosts, port: int, *cmd: str) -> str:
    return h.ns(h.client, "redis-cli", "-h", PARENT_IP, "-p", str(port), *cmd, timeout=60).stdout.strip()


def check_outbound(h: Hosts) -> None:
    out = h.log("run.log")
    assert f"resolved {WEB_NAME} {CLIENT_IP}" in out, out
    assert "fetched HTTP/1.0 200 OK outbound-ok" in out, out
    assert WEB_NAME in h.log("dnsmasq.log"), "the name was resolved by the test's DNS server"


def client_addresses(h: Hosts, port: int) -> list[str]:
    listing = redis(h, port, "CLIENT", "LIST")
    return [field.split("=", 1)[1].rsplit(":", 1)[0] for field in listing.split() if field.startswith("addr=")]


def test_transparent_mode_serves_nginx_and_redis_and_resolves_names(converted_servers: str, hosts: Hosts) -> None:
    h = hosts
    enclave = run_enclave(h, converted_servers, "--network", "transparent")
    try:
        check_outbound(h)
        page = h.ns(h.client, "curl", "-sS", "-m", "30", f"http://{PARENT_IP}/", timeout=60).stdout
        assert PAGE in page
        assert redis(h, 6379, "SET", "greeting", "hello enclave") == "OK"
        assert redis(h, 6379, "GET", "greeting") == "hello enclave"
        assert client_addresses(h, 6379) == [CLIENT_IP], "the app sees the client's own address"
        ping = h.ns(h.client, "ping", "-c", "3", "-i", "0.3", "-W", "5", PARENT_IP, check=False, timeout=60)
        assert ping.returncode == 0 and "DUP" not in ping.stdout, ping.stdout
    finally:
        if enclave.poll() is None:
            stop_enclave(h, enclave)


def test_published_mode_forwards_only_listed_ports(converted_servers: str, hosts: Hosts) -> None:
    h = hosts
    enclave = run_enclave(h, converted_servers, "--network", "published", "-p", "8080:80", "-p", "6380:6379")
    try:
        check_outbound(h)
        assert f"{PARENT_IP} - - " in h.log("web.log"), "outbound leaves through NAT with the parent's address"
        page = h.ns(h.client, "curl", "-sS", "-m", "30", f"http://{PARENT_IP}:8080/", timeout=60).stdout
        assert PAGE in page
        assert redis(h, 6380, "SET", "k", "v") == "OK" and redis(h, 6380, "GET", "k") == "v"
        assert client_addresses(h, 6380) == [CLIENT_IP], "published ports keep the client's address (DNAT only)"
        closed = h.ns(h.client, "curl", "-sS", "-m", "10", f"http://{PARENT_IP}:80/", check=False, timeout=60)
        assert closed.returncode != 0, "an unpublished port does not reach the enclave"
    finally:
        if enclave.poll() is None:
            stop_enclave(h, enclave)


def test_network_none_and_bad_flags(converted_servers: str, tmp_path: Path) -> None:
    from helpers.cli import salmiac

    proc = salmiac("run", "--emulate", "--network", "none", "-p", "80:80", converted_servers)
    assert proc.returncode == 2 and b"-p needs a network" in proc.stderr
    proc = salmiac("run", "--emulate", "-p", "80:80/sctp", converted_servers)
    assert proc.returncode == 2 and b"80:80/sctp" in proc.stderr
    proc = salmiac("run", "--emulate", "--dns", "not-an-address", converted_servers)
    assert proc.returncode == 2 and b"--dns" in proc.stderr

