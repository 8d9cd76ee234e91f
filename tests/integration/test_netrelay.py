"""The enclave's network end to end, without QEMU: three netns, real TAP, real AF_PACKET, real tools.

curl, redis-cli, ping, dnsmasq and iperf-free Python sockets are the oracles. Each test creates its own
namespaces (module-scoped where the topology can be shared) and removes them.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns_topology import CLIENT_IP, PARENT_IP, PY, Topology, have_netns_tools, wait_until

from salmiac.protocol import vnet
from salmiac.protocol.frames import MAX_PAYLOAD, FrameDecoder, FrameEncoder, encode_raw

pytestmark = [pytest.mark.netns, pytest.mark.skipif(bool(have_netns_tools()), reason=str(have_netns_tools()))]


def needs(*tools: str) -> None:
    import shutil

    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"needs {t}")


@pytest.fixture(scope="module")
def transparent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    topo = Topology(tmp_path_factory.mktemp("netns-transparent"))
    try:
        yield topo
    finally:
        topo.close()


def serve_http(topo: Topology, ns: str, bind: str, port: int, log: str) -> Path:
    """A directory with one random file, served by python -m http.server; returns the file."""
    d = topo.dir / f"www-{port}"
    d.mkdir(exist_ok=True)
    f = d / "blob.bin"
    f.write_bytes(secrets.token_bytes(300_000))
    topo.spawn(ns, PY, "-m", "http.server", str(port), "--bind", bind, "--directory", str(d), log=log)
    return f


def curl(topo: Topology, ns: str, url: str, out: Path, timeout: int = 10) -> subprocess.CompletedProcess[str]:
    return topo.ns(ns, "curl", "-sS", "-m", str(timeout), "-o", str(out), "-w", "%{http_code} %{remote_ip}", url,
                   check=False)  # fmt: skip


def curl_until_ok(topo: Topology, ns: str, url: str, out: Path, what: str) -> str:
    """curl ``url`` from ``ns`` until it answers 200 (the relay may still be coming up); "200 REMOTE_IP"."""
    return str(wait_until(lambda: (r := curl(topo, ns, url, out)).stdout.startswith("200") and r.stdout, what=what))


def test_enclave_took_the_offer(transparent: Topology) -> None:
    t = transparent
    addr = t.ns(t.enclave, "ip", "-j", "addr", "show", "salmiac0").stdout
    link = json.loads(addr)[0]
    assert link["address"] == t.offer["mac"]
    assert link["mtu"] == 1500
    assert any(a["local"] == PARENT_IP and a["prefixlen"] == 24 for a in link["addr_info"])
    assert "default via 10.77.0.1" in t.ns(t.enclave, "ip", "route").stdout
    assert t.ready["hostname"] == "encl"
    assert (t.root / "etc" / "hostname").read_text() == "encl\n"
    assert "nameserver 10.77.0.1" in (t.root / "etc" / "resolv.conf").read_text()
    assert t.ns(t.enclave, "cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout.split() == ["49152", "65535"]


def test_curl_from_client_reaches_http_server_in_enclave(transparent: Topology) -> None:
    t = transparent
    blob = serve_http(t, t.enclave, PARENT_IP, 8000, "http-enclave.log")
    out = t.dir / "got.bin"
    res = curl_until_ok(t, t.client, f"http://{PARENT_IP}:8000/blob.bin", out, "http via the parent's address")
    assert res == f"200 {PARENT_IP}"
    assert out.read_bytes() == blob.read_bytes()
    # The app saw the client's own address.
    wait_until(lambda: f"{CLIENT_IP} - - " in t.log("http-enclave.log"), what="access log")


def test_redis_set_get(transparent: Topology) -> None:
    needs("redis-server", "redis-cli")
    t = transparent
    t.spawn(t.enclave, "redis-server", "--bind", PARENT_IP, "--port", "6379", "--protected-mode", "no",
            "--save", "", "--appendonly", "no", log="redis.log")  # fmt: skip
    value = secrets.token_hex(16)
    wait_until(
        lambda: t.ns(t.client, "redis-cli", "-h", PARENT_IP, "SET", "k", value, check=False).stdout.strip() == "OK",
        what="redis SET",
    )
    assert t.ns(t.client, "redis-cli", "-h", PARENT_IP, "GET", "k").stdout.strip() == value


def test_outbound_http_by_name_through_dnsmasq(transparent: Topology) -> None:
    needs("dnsmasq")
    t = transparent
    t.spawn(t.client, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
            f"--listen-address={CLIENT_IP}", f"--host-record=web.test,{CLIENT_IP}", "--log-queries",
            "--log-facility=-", log="dnsmasq.log")  # fmt: skip
    blob = serve_http(t, t.client, CLIENT_IP, 8080, "http-client.log")
    out = t.dir / "out.bin"
    res = curl_until_ok(t, t.enclave, "http://web.test:8080/blob.bin", out, "outbound http by name")
    assert res == f"200 {CLIENT_IP}"
    assert out.read_bytes() == blob.read_bytes()
    assert "query[A] web.test" in t.log("dnsmasq.log")
    # The search domain from the offer works too ("web" -> "web.test").
    assert curl(t, t.enclave, "http://web:8080/blob.bin", out).stdout == f"200 {CLIENT_IP}"


def test_ping_both_ways_without_duplicates(transparent: Topology) -> None:
    t = transparent
    for src, dst in ((t.client, PARENT_IP), (t.enclave, CLIENT_IP)):

        def ping(src: str = src, dst: str = dst) -> subprocess.CompletedProcess[str] | None:
            r = t.ns(src, "ping", "-c", "3", "-i", "0.2", "-W", "2", dst, check=False)
            return r if r.returncode == 0 else None

        r = wait_until(ping, what=f"ping {dst}")
        assert " 0% packet loss" in r.stdout
        assert "DUP!" not in r.stdout, "the parent's kernel answered too"


def _tcp_out_rsts(t: Topology, ns: str) -> int:
    lines = [ln.split() for ln in t.ns(ns, "cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutRsts")])


def test_the_parents_own_connections_keep_working(transparent: Topology) -> None:
    """Replies to the parent's own ephemeral ports stay with its kernel (the uplink filter), so its own outbound
    TCP works while the enclave holds the address; UDP too (a DNS-like exchange)."""
    t = transparent
    blob = serve_http(t, t.client, CLIENT_IP, 8090, "http-client-parent.log")
    out = t.dir / "parent-got.bin"
    res = curl_until_ok(t, t.parent, f"http://{CLIENT_IP}:8090/blob.bin", out, "the parent's own http")
    assert res == f"200 {CLIENT_IP}" and out.read_bytes() == blob.read_bytes()
    t.spawn(t.client, PY, "-c", UDP_ECHO, CLIENT_IP, "5400", log="udp-parent.log")
    got = wait_until(lambda: t.ns(t.parent, PY, "-c", UDP_ASK, CLIENT_IP, "5400", check=False).stdout.strip(),
                     what="the parent's own udp")
    assert got == f"echo:hello from {PARENT_IP}"
    # A reply larger than the MTU arrives in IP fragments; only the first carries the port (a big DNS answer).
    big = wait_until(lambda: t.ns(t.parent, PY, "-c", UDP_ASK, CLIENT_IP, "5400", "4000", check=False).stdout.strip(),
                     what="the parent's own fragmented udp")
    assert big == "echo:" + "h" * 4000 + f" from {PARENT_IP}"


def test_parent_kernel_stays_silent(transparent: Topology) -> None:
    t = transparent
    before_parent = _tcp_out_rsts(t, t.parent)
    before_enclave = _tcp_out_rsts(t, t.enclave)
    r = t.ns(t.client, "curl", "-sS", "-m", "5", f"http://{PARENT_IP}:9/", check=False)
    assert "Couldn't connect" in r.stderr or "refused" in r.stderr.lower()
    assert _tcp_out_rsts(t, t.enclave) > before_enclave, "the enclave refused the connection"
    assert _tcp_out_rsts(t, t.parent) == before_parent, "the parent's kernel must not RST"


SINK = """
import hashlib, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
c, _ = s.accept()
h = hashlib.sha256()
while data := c.recv(1 << 16):
    h.update(data)
c.sendall(h.hexdigest().encode())
"""

SEND = """
import socket, sys
data = open(sys.argv[3], "rb").read()
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode())
"""


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_partial_checksums_from_offloading_sender_are_completed(tmp_path: Path, offload: bool) -> None:
    """The client's veth leaves TCP checksums to 'hardware'; the relay must complete them for the TAP (plain),
    or hand them over marked NEEDS_CSUM for the enclave's kernel to finish (offload)."""
    import hashlib

    t = Topology(tmp_path, client_csum_offload=True, offload=offload)
    try:
        payload = tmp_path / "payload.bin"
        payload.write_bytes(secrets.token_bytes(3_000_000))
        t.spawn(t.enclave, PY, "-c", SINK, PARENT_IP, "7000", log="sink.log")

        def send() -> str:
            return t.ns(t.client, PY, "-c", SEND, PARENT_IP, "7000", str(payload), check=False).stdout.strip()

        assert wait_until(send, what="upload") == hashlib.sha256(payload.read_bytes()).hexdigest()
        csum_errors = t.ns(t.enclave, "cat", "/proc/net/snmp").stdout
        tcp = [ln.split() for ln in csum_errors.splitlines() if ln.startswith("Tcp:")]
        assert int(tcp[1][tcp[0].index("InCsumErrors")]) == 0
    finally:
        t.close()


def test_segments_cross_the_relay_whole_both_ways(tmp_path: Path) -> None:
    """With the client's TSO on (what GRO on a real uplink hands the parent), 64 KiB segments cross the relay
    as single records in both directions, and the data arrives intact."""
    import hashlib

    t = Topology(tmp_path, client_offloads=True)
    try:
        assert t.offer["vnet_hdr"] is True
        payload = tmp_path / "payload.bin"
        payload.write_bytes(secrets.token_bytes(20_000_000))
        digest = hashlib.sha256(payload.read_bytes()).hexdigest()
        t.spawn(t.enclave, PY, "-c", SINK, PARENT_IP, "7000", log="sink-in.log")
        t.spawn(t.client, PY, "-c", SINK, CLIENT_IP, "7001", log="sink-out.log")

        def send(ns: str, ip: str, port: int) -> str:
            return t.ns(ns, PY, "-c", SEND, ip, str(port), str(payload), check=False).stdout.strip()

        assert wait_until(lambda: send(t.client, PARENT_IP, 7000), what="upload") == digest
        assert wait_until(lambda: send(t.enclave, CLIENT_IP, 7001), what="download") == digest
        stats = t.stop_relay()
        for direction in ("to_stream", "from_stream"):
            d = stats[direction]
            assert d["bytes"] / d["frames"] > 3000, f"{direction}: segments, not MTU-sized frames: {d}"
        assert stats["device_rx_dropped"] == 0 and stats["device_tx_refused"] == 0
    finally:
        t.close()


UDP_COUNT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(3)
got = 0
try:
    while True:
        got += len(s.recv(65535))
except TimeoutError:
    pass
print(got, flush=True)
"""

UDP_GSO_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_UDP, 103, 1000)  # UDP_SEGMENT: the kernel (or the NIC) cuts each send into 1000-byte datagrams
for _ in range(20):
    s.sendto(b"u" * 20_000, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.01)
"""


@pytest.mark.parametrize("mode", ["transparent", "published"])
def test_udp_segments_cross_both_ways(tmp_path: Path, mode: str) -> None:
    """A sender using UDP segmentation offload (QUIC stacks do) hands a veth uplink 20 KB UDP super-frames;
    every datagram must still arrive, into the enclave and out of it."""
    t = Topology(tmp_path, mode=mode, publish=["5500:5500/udp"] if mode == "published" else (), client_offloads=True)
    try:
        assert t.offer["udp_segments"] is True, "this host's kernel (>= 6.2) takes UDP segments back"
        bind_in = PARENT_IP if mode == "transparent" else "0.0.0.0"
        for sender, receiver, ip, bind, port in ((t.client, t.enclave, PARENT_IP, bind_in, 5500),
                                                 (t.enclave, t.client, CLIENT_IP, CLIENT_IP, 5501)):
            sink = t.spawn(receiver, PY, "-c", UDP_COUNT, bind, str(port), log=f"udp-count-{port}.log")
            time.sleep(0.5)
            t.ns(sender, PY, "-c", UDP_GSO_SEND, ip, str(port))
            sink.wait(timeout=30)
            assert t.log(f"udp-count-{port}.log").split() == ["400000"], f"to {ip}: all 400 datagrams"
        stats = t.stop_relay()
        assert stats["device_rx_dropped"] == 0, stats
    finally:
        t.close()


# --- hostile frames --------------------------------------------------------------------------------------


def arp_request(src_mac: bytes, src_ip: str, dst_ip: str) -> bytes:
    return (
        b"\xff" * 6 + src_mac + b"\x08\x06"
        + bytes.fromhex("0001080006040001") + src_mac + socket.inet_aton(src_ip)
        + b"\0" * 6 + socket.inet_aton(dst_ip)
    )  # fmt: skip


def ip_checksum(header: bytes) -> bytes:
    total = sum(int.from_bytes(header[i : i + 2], "big") for i in range(0, len(header), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total & 0xFFFF).to_bytes(2, "big")


def icmp_echo(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, ident: int) -> bytes:
    icmp = b"\x08\x00\x00\x00" + ident.to_bytes(2, "big") + b"\x00\x01" + b"salmiac-ping-payload"
    icmp = icmp[:2] + ip_checksum(icmp) + icmp[4:]
    ip = bytes.fromhex("45000000") + b"\x12\x34\x40\x00\x40\x01\x00\x00"
    ip = ip[:2] + (20 + len(icmp)).to_bytes(2, "big") + ip[4:] + socket.inet_aton(src_ip) + socket.inet_aton(dst_ip)
    ip = ip[:10] + ip_checksum(ip) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + icmp


def records(frames: list[bytes], offload: bool) -> bytes:
    """Frames as a peer puts them on the link: behind a virtio-net header when the link has offload."""
    return FrameEncoder(MAX_PAYLOAD).encode([vnet.PLAIN + f if offload else f for f in frames])


def read_frames_until(sock: socket.socket, match: object, timeout: float = 10, offload: bool = False) -> bytes:
    """The first Ethernet frame (virtio-net header stripped) that ``match`` accepts."""
    dec = FrameDecoder(MAX_PAYLOAD)
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            break
        dec.receive_data(data)
        for f in dec.frames():
            if offload:
                f = f[vnet.SIZE :]
            if match(f):  # type: ignore[operator]
                return f
    raise AssertionError("expected frame never arrived")


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_relay_survives_malformed_frames_from_enclave(tmp_path: Path, offload: bool) -> None:
    t = Topology(tmp_path, start_enclave=False, offload=offload)
    try:
        mac = bytes.fromhex(t.offer["mac"].replace(":", ""))
        s = wait_until(lambda: _connect(t.sock), what="relay socket")
        garbage_frames = encode_raw([b"\xee" * (MAX_PAYLOAD + 1 if offload else 9500), b"", b"\x01\x02\x03"])
        s.sendall(garbage_frames + records([arp_request(mac, PARENT_IP, CLIENT_IP)], offload))
        client = socket.inet_aton(CLIENT_IP)
        reply = read_frames_until(
            s, lambda f: f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == client, offload=offload
        )
        assert reply[:6] == mac
        s.close()
        assert t.ns(t.parent, "cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout.split() == ["32768", "49151"]
        stats = t.stop_relay()
        # Everything the relay changed in the parent is undone.
        assert t.ns(t.parent, "nft", "list", "tables").stdout.strip() == ""
        assert t.ns(t.parent, "cat", "/proc/sys/net/ipv4/ip_local_port_range").stdout.split() == ["32768", "60999"]
        assert stats["from_stream"]["dropped_oversize"] == 1
        assert stats["from_stream"]["dropped_empty"] == 1
        assert stats["from_stream"]["dropped_runt"] == 1
        assert stats["from_stream"]["frames"] == 1
    finally:
        t.close()


def _connect(path: Path) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        s.close()
        return None
    return s


# virtio-net headers a hostile parent might send, each with the reason vnet.refusal gives.
HOSTILE_HEADERS = [
    (vnet.pack(flags=0x10), "unknown flags"),
    (vnet.pack(gso_type=3, flags=1, gso_size=1400, csum_start=34, csum_offset=16), "segmentation type"),
    (vnet.pack(gso_type=vnet.GSO_TCPV4, gso_size=1400), "without a partial checksum"),
    (vnet.pack(gso_type=vnet.GSO_TCPV4, flags=1, gso_size=0, csum_start=34, csum_offset=16), "segment size"),
    (vnet.pack(flags=1, csum_start=60, csum_offset=60000), "outside"),
    (vnet.pack(gso_type=vnet.GSO_ECN), "ECN without"),
]


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_enclave_survives_malformed_frames_from_parent(tmp_path: Path, offload: bool) -> None:
    """The test plays a hostile parent: garbage first, then ARP and ICMP echo, and expects the echo reply. With
    offload, also virtio-net headers of every kind the enclave refuses, each around a valid echo request."""
    t = Topology(tmp_path, start_enclave=False)
    try:
        t.relay.terminate()
        t.relay.wait(timeout=10)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fake = tmp_path / "fake-parent.sock"
        listener.bind(str(fake))
        listener.listen(1)
        offer = {"mac": "02:00:00:00:00:02", "ipv4": "10.88.0.2/24", "mtu": 1500, "gateway": "10.88.0.1",
                 "hostname": "hostile-test", "ipv6": "fd00:88::2/64", "gateway6": "fd00:88::1",
                 "routes": [{"destination": "10.99.0.0/16", "via": "10.88.0.254"}], "vnet_hdr": offload}  # fmt: skip
        (tmp_path / "fake-offer.json").write_text(json.dumps(offer))
        stats_file = tmp_path / "enc-stats.json"
        enc = t.spawn(t.enclave, "unshare", "--uts", PY, "-m", "salmiac.enclave.network", "--config",
                      str(tmp_path / "fake-offer.json"), "--connect", f"unix:{fake}", "--root", str(t.root),
                      "--ready-file", str(tmp_path / "r"), "--stats-file", str(stats_file), "--ip", "busybox ip",
                      log="enc2.log")  # fmt: skip
        listener.settimeout(10)
        conn, _ = listener.accept()
        wait_until(lambda: (tmp_path / "r").exists(), what="enclave up")
        assert "10.99.0.0/16 via 10.88.0.254 dev salmiac0" in t.ns(t.enclave, "ip", "route").stdout
        assert "inet6 fd00:88::2/64" in t.ns(t.enclave, "ip", "-6", "addr", "show", "salmiac0").stdout
        assert "default via fd00:88::1 dev salmiac0" in t.ns(t.enclave, "ip", "-6", "route").stdout
        peer_mac, enc_mac = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
        oversize = b"\xee" * (MAX_PAYLOAD + 1 if offload else 9500)
        hostile = encode_raw([oversize, b"", b"\x01\x02\x03"])
        echo = icmp_echo(peer_mac, enc_mac, "10.88.0.1", "10.88.0.2", 0x4242)
        if offload:
            refused = [header + echo for header, _ in HOSTILE_HEADERS] + [vnet.PLAIN + echo + bytes(1600)]
            for record, (_, why) in zip(refused, [*HOSTILE_HEADERS, (b"", "without segmentation")], strict=True):
                assert why in str(vnet.refusal(record, 1518)), why
            hostile += FrameEncoder(MAX_PAYLOAD).encode(refused)
        conn.sendall(hostile + records([arp_request(peer_mac, "10.88.0.1", "10.88.0.2")], offload) + hostile
                     + records([echo], offload))
        reply = read_frames_until(conn, lambda f: f[12:14] == b"\x08\x00" and f[23] == 1 and f[34] == 0,
                                  offload=offload)
        assert reply[:6] == peer_mac and reply[38:40] == b"\x42\x42"
        conn.close()
        enc.wait(timeout=10)
        stats = json.loads(stats_file.read_text())
        assert stats["from_stream"]["dropped_oversize"] == 2
        assert stats["from_stream"]["dropped_empty"] == 2
        assert stats["from_stream"]["dropped_runt"] == 2
        if offload:
            assert stats["device_tx_refused_header"] == 2 * len(refused)
        assert enc.returncode == 0, t.log("enc2.log")
    finally:
        t.close()


def test_enclave_refuses_a_bad_offer_with_one_line(tmp_path: Path) -> None:
    t = Topology(tmp_path, start_enclave=False)
    try:
        bad = dict(t.offer, routes=[{"destination": "0.0.0.0/0", "via": "10.77.0.1"}])
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        r = t.ns(t.enclave, PY, "-m", "salmiac.enclave.network", "--config", str(tmp_path / "bad.json"),
                 "--connect", f"unix:{t.sock}", "--root", str(t.root), "--no-hostname", check=False)  # fmt: skip
        assert r.returncode == 2
        assert r.stderr.strip().count("\n") == 0
        assert "the default route comes only from the gateway" in r.stderr
        assert "salmiac0" not in t.ns(t.enclave, "ip", "link").stdout, "nothing was set up"
    finally:
        t.close()


# --- published mode --------------------------------------------------------------------------------------


def test_published_mode(tmp_path: Path) -> None:
    t = Topology(tmp_path, mode="published", publish=["8081:8000", "5301:5300/udp"])
    try:
        enclave_ip = t.offer["ipv4"].split("/")[0]
        assert t.offer["gateway"] != PARENT_IP and "local_port_range" not in t.offer
        blob = serve_http(t, t.enclave, "0.0.0.0", 8000, "http-pub.log")
        out = tmp_path / "got.bin"
        wait_until(
            lambda: curl(t, t.client, f"http://{PARENT_IP}:8081/blob.bin", out).stdout.startswith("200"),
            what="published tcp port",
        )
        assert out.read_bytes() == blob.read_bytes()
        wait_until(lambda: f"{CLIENT_IP} - - " in t.log("http-pub.log"), what="client address preserved")
        # An unpublished port is not forwarded.
        assert not curl(t, t.client, f"http://{PARENT_IP}:8000/", out, timeout=3).stdout.startswith("200")
        # UDP both ways through the published port.
        t.spawn(t.enclave, PY, "-c", UDP_ECHO, "0.0.0.0", "5300", log="udp.log")
        got = wait_until(
            lambda: t.ns(t.client, PY, "-c", UDP_ASK, PARENT_IP, "5301", check=False).stdout.strip(),
            what="udp echo",
        )
        assert got == f"echo:hello from {CLIENT_IP}"
        # Outbound: masqueraded TCP and ICMP.
        serve_http(t, t.client, CLIENT_IP, 8080, "http-client.log")
        wait_until(
            lambda: curl(t, t.enclave, f"http://{CLIENT_IP}:8080/blob.bin", out).stdout.startswith("200"),
            what="outbound through NAT",
        )
        assert f"{PARENT_IP} - - " in t.log("http-client.log"), "outbound leaves with the parent's address"
        assert t.ns(t.enclave, "ping", "-c", "2", "-W", "2", CLIENT_IP, check=False).returncode == 0
        assert t.ns(t.parent, "ping", "-c", "2", "-W", "2", enclave_ip, check=False).returncode == 0
        stats = t.stop_relay()
        assert stats["to_stream"]["frames"] > 0 and stats["from_stream"]["frames"] > 0
        assert t.ns(t.parent, "nft", "list", "tables").stdout.strip() == "", "relay removed its table"
        assert "salmiac-" not in t.ns(t.parent, "ip", "link").stdout, "relay removed its TAP"
    finally:
        t.close()


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(b"echo:" + data + b" from " + peer[0].encode(), peer)
"""

UDP_ASK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(b"h" * int(sys.argv[3]) if len(sys.argv) > 3 else b"hello", (sys.argv[1], int(sys.argv[2])))
try:
    print(s.recv(65535).decode())
except TimeoutError:
    pass
"""


def test_default_uplink(transparent: Topology) -> None:
    t = transparent
    code = "from salmiac.parent.netrelay import default_uplink; print(default_uplink())"
    assert t.ns(t.parent, PY, "-c", code).stdout.strip() == "p0"


def test_mode_and_publish_errors() -> None:
    from salmiac.errors import RequestError
    from salmiac.parent.netrelay import NetRelay, PortMapping, parse_publish

    assert parse_publish("8080:80") == PortMapping(8080, 80, "tcp")
    assert parse_publish("53:5353/udp") == PortMapping(53, 5353, "udp")
    for bad in ("80", "0:80", "70000:80", "80:80/sctp", "a:b"):
        with pytest.raises(RequestError, match=re.escape(bad)):
            parse_publish(bad)
    with pytest.raises(RequestError, match="published mode"):
        NetRelay("transparent", "eth0", [PortMapping(1, 2)])


PORT_READ = """
import sys, time
from salmiac.framepump import PacketPort
from salmiac.protocol import vnet
from salmiac.protocol.frames import MAX_PAYLOAD, FrameDecoder, FrameEncoder
mode = sys.argv[1]
vnet_hdr = mode == "vnet"
port = PacketPort("p0", rx_ring=mode == "ring", vnet_hdr=vnet_hdr)
print("vnet" if vnet_hdr else "ring" if port._ring is not None else "recvmsg", flush=True)
enc, buf, got = FrameEncoder(MAX_PAYLOAD), memoryview(bytearray(1 << 18)), []
deadline = time.monotonic() + 10
while len(got) < 3 and time.monotonic() < deadline:
    n = port.read_into(buf, enc)
    dec = FrameDecoder(MAX_PAYLOAD)
    dec.receive_data(buf[:n])
    frames = [f[vnet.SIZE:] if vnet_hdr else f for f in dec.frames()]
    got += [f for f in frames if f[12:14] == b"\\x08\\x00" and f[23] == 1]
print(len(got), enc.stats.frames >= 3)
"""


@pytest.mark.parametrize("mode", ["ring", "recvmsg", "vnet"])
def test_packet_port_reads_framed_records(tmp_path: Path, mode: str) -> None:
    """Every receive path (TPACKET_V2 ring, recvmsg, readv with virtio-net headers) frames what arrives."""
    t = Topology(tmp_path, start_enclave=False)
    try:
        t.relay.terminate()
        t.relay.wait(timeout=10)
        reader = t.spawn(t.parent, PY, "-c", PORT_READ, mode, log="port.log")
        wait_until(lambda: t.log("port.log").startswith(mode), what="port open")
        t.ns(t.client, "ping", "-c", "3", "-i", "0.2", "-W", "1", PARENT_IP, check=False)
        reader.wait(timeout=15)
        assert t.log("port.log").split() == [mode, "3", "True"]
    finally:
        t.close()
