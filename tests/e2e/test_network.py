"""Issue 3 end to end: unmodified nginx and redis-server from Debian in the emulated enclave, reached from a client
network namespace through the parent's relay; the enclave resolves a name through a DNS server (dnsmasq) in the
client namespace and fetches a page from it.

    client netns  c0 10.78.0.1/24  <--veth-->  p0 10.78.0.2/24  parent netns: `salmiac run --emulate` (QEMU)
    dnsmasq, http.server, curl, redis-cli                         enclave: salmiac0, nginx :80, redis :6379
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.images import OciImage
from helpers.cli import convert
from helpers.enclave_net import (
    CLIENT_IP,
    PAGE,
    PARENT_IP,
    WEB_NAME,
    Hosts,
    have_netns_tools,
    redis,
    run_enclave,
    stop_enclave,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.netns,
    pytest.mark.skipif(have_netns_tools() is not None, reason=str(have_netns_tools())),
]


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


def stop_and_check(h: Hosts, enclave: subprocess.Popen[bytes]) -> None:
    stop_enclave(h, enclave)
    assert "stopped" in h.log("run.log").split(), "the app got SIGTERM and stopped cleanly"
    assert h.ns(h.parent, "nft", "list", "tables").stdout.strip() == "", "the relay removed its nftables table"


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
            stop_and_check(h, enclave)


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
            stop_and_check(h, enclave)


def test_network_none_and_bad_flags(converted_servers: str, tmp_path: Path) -> None:
    from helpers.cli import salmiac

    proc = salmiac("run", "--emulate", "--network", "none", "-p", "80:80", converted_servers)
    assert proc.returncode == 2 and b"-p needs a network" in proc.stderr
    proc = salmiac("run", "--emulate", "-p", "80:80/sctp", converted_servers)
    assert proc.returncode == 2 and b"80:80/sctp" in proc.stderr
    proc = salmiac("run", "--emulate", "--dns", "not-an-address", converted_servers)
    assert proc.returncode == 2 and b"--dns" in proc.stderr

