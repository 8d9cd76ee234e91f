"""Parent network relay: the enclave's Ethernet frames to and from the parent's network.

Two modes.

transparent (default, as in Fortanix Salmiac)
    The enclave takes the parent's identity on the uplink: same MAC, same IPv4 address/prefix, same
    gateway and routes, same MTU. The relay opens an AF_PACKET socket on the uplink, forwards to the
    enclave every frame addressed to this host (unicast to its MAC, broadcast, multicast) and injects the
    enclave's frames on the uplink as they are. Outbound needs no NAT and inbound connections to the
    parent's address reach the app unchanged, source address included.

    The parent's own kernel still receives those packets and would answer them (TCP RST for a port it
    does not listen on, ICMP port unreachable, duplicate echo replies). We stop that with one nftables
    table (``inet salmiac``): IPv4 arriving on the uplink is dropped at ``input``, except TCP/UDP to the
    parent's ephemeral port range, so the parent's own outbound connections keep working. Ports are split:
    the parent's kernel uses ``PARENT_PORTS`` (set by the relay), the enclave ``ENCLAVE_PORTS`` (in the offer),
    and the relay does not forward frames to ``PARENT_PORTS``, so the enclave never RSTs the parent's flows.
    ARP stays with both kernels; they answer identically (same MAC, same address).

    Fortanix Salmiac (vsock-proxy/parent) does the same in spirit: one libpcap capture per parent
    interface with the BPF filter "inbound", relayed as length-value records over one vsock port per
    interface; its enclave TAP takes the parent's MAC, address/netmask, MTU, gateway, routes and static
    ARP entries; it recomputes IPv4/TCP/UDP checksums of every captured packet; and the parent's entry
    script keeps its kernel quiet with ``iptables -A INPUT -m socket -j ACCEPT``, ``-i lo`` accepted and
    ``iptables -P INPUT DROP``. A second, private TAP pair carries parent<->enclave services (NBD, logs,
    a dnsmasq when the parent's resolv.conf points at 127.0.0.x). We differ in the split port ranges
    (``-m socket`` alone still lets the enclave receive, and RST, replies meant for the parent's own
    sockets), in computing no checksum at all (partial ones travel as such in the virtio-net header, see
    Offload), and in filtering with our own BPF program on a bare AF_PACKET socket instead of libpcap.

    Trade-offs: no address change on the parent (its own kernel keeps ARP, routes and the IP for its own
    outbound traffic), no NAT state, client addresses preserved; but the parent cannot serve any port
    outside ``PARENT_PORTS`` on that address, inbound ports in ``PARENT_PORTS`` never reach the enclave, and
    IPv6 stays with the parent. The alternative - moving the address off the uplink and bridging it to a
    TAP - takes the parent off the network and needs the uplink in promiscuous mode. Sysctls changed in the
    parent's namespace (``ip_local_port_range``, and ``ip_forward`` in published mode) and the nftables table
    are restored/removed by ``close()``.

Offload (the default, ``offload=True``). The link carries a virtio-net header with every frame
(``protocol.vnet``): the uplink's packet socket (PACKET_VNET_HDR) hands over GRO'd segments whole and sends
the enclave's 64 KiB TCP segments for the kernel (or the NIC) to cut; the TAPs on both ends take and give the
same. Without offload, GRO/LRO are turned off on the uplink (coalesced frames would exceed the MTU; the
setting is not restored), partial checksums are completed in Python, and a virtual uplink whose peer sends
with TSO hands over super-frames that are dropped and counted (``device_rx_dropped``).

published
    Like ``docker run -p``: the enclave lives on a private /30 behind a TAP in the parent (``salmiac-<tag>``);
    the parent routes (ip_forward), masquerades the enclave's outbound traffic, and DNATs each published
    ``HOST:ENCLAVE[/proto]`` port on its local addresses to the enclave. Only DNAT, no SNAT inbound, so the
    app sees the client's real address. Forwarding into the TAP is limited to DNATed flows and replies.

The relay itself is ``framepump.FramePump``: one poll loop, batched reads, large socket buffers, counters.
It is a thin driver: all framing rules are in ``protocol.frames``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, Literal

from salmiac.errors import RequestError, RuntimeFailure, SalmiacError
from salmiac.framepump import (
    FramePort,
    FramePump,
    PacketPort,
    TapPort,
    kernel_takes_udp_segments,
    open_tap,
)
from salmiac.protocol.frames import ETH_HEADER, VLAN_TAG
from salmiac.protocol.netconfig import (
    MAX_DNS_SERVERS,
    MAX_HOSTNAME,
    MAX_HOSTS_ENTRIES,
    MAX_NAMES_PER_HOST,
    MAX_SEARCH_DOMAINS,
    RESERVED_HOST_NAMES,
    HostEntry,
    NetConfigError,
    NetworkConfig,
    Route,
    is_hostname,
)

log = logging.getLogger("salmiac.parent")

Mode = Literal["transparent", "published"]
PARENT_PORTS = (32768, 49151)
"""Ephemeral ports of the parent's kernel in transparent mode (its own outbound connections)."""
ENCLAVE_PORTS = (49152, 65535)
"""Ephemeral ports of the enclave in transparent mode."""
PRIVATE_SUBNETS = (IPv4Network("100.127.254.0/24"), IPv4Network("10.254.254.0/24"), IPv4Network("192.168.254.0/24"))
"""Where published-mode links come from: the first /30 in them that overlaps nothing on the parent is used
(so concurrent runs on one host get distinct links)."""
NFT_TABLE_PREFIX = "salmiac"
TAP_PREFIX = "salmiac-"
MAX_PUBLISHED = 64


class RelayError(RuntimeFailure):
    """The parent could not set up or run the enclave's network."""


# --- published ports --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortMapping:
    host_port: int
    enclave_port: int
    proto: Literal["tcp", "udp"] = "tcp"

    def __str__(self) -> str:
        return f"{self.host_port}:{self.enclave_port}/{self.proto}"


_PUBLISH = re.compile(r"^(\d{1,5}):(\d{1,5})(?:/(tcp|udp))?$")


def parse_publish(spec: str) -> PortMapping:
    """``HOSTPORT:ENCLAVEPORT[/tcp|/udp]`` as given to ``-p``."""
    m = _PUBLISH.match(spec)
    if not m:
        raise RequestError(f"-p {spec!r}: expected HOSTPORT:ENCLAVEPORT[/tcp|/udp]")
    host, enclave = int(m.group(1)), int(m.group(2))
    if not (1 <= host <= 65535 and 1 <= enclave <= 65535):
        raise RequestError(f"-p {spec!r}: ports must be 1-65535")
    proto: Literal["tcp", "udp"] = "udp" if m.group(3) == "udp" else "tcp"
    return PortMapping(host, enclave, proto)


def check_publish(mode: str, publish: Sequence[PortMapping]) -> None:
    """``-p`` only goes with published mode (or auto, which it turns into published), and not too many."""
    if publish and mode == "none":
        raise RequestError("-p needs a network: drop --network none")
    if publish and mode == "transparent":
        raise RequestError("-p is only meaningful in published mode (transparent forwards every port)")
    if len(publish) > MAX_PUBLISHED:
        raise RequestError(f"at most {MAX_PUBLISHED} published ports")


# --- what the parent knows about its own network ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Uplink:
    ifname: str
    index: int
    mac: str
    address: IPv4Interface
    mtu: int
    gateway: IPv4Address | None
    routes: tuple[Route, ...]


def read_uplink(ifname: str) -> Uplink:
    from pyroute2.iproute.linux import IPRoute

    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise RequestError(f"uplink {ifname!r}: no such interface")
        idx = found[0]
        link = next(iter(ipr.get_links(idx)))
        addrs = [
            IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            for a in ipr.get_addr(index=idx, family=socket.AF_INET)
        ]
        if len(addrs) != 1:
            raise RelayError(f"uplink {ifname}: transparent mode needs exactly one IPv4 address, found {len(addrs)}")
        gateway: IPv4Address | None = None
        routes: list[Route] = []
        for r in ipr.get_routes(family=socket.AF_INET, oif=idx, table=254):
            via = r.get_attr("RTA_GATEWAY")
            if via is None:
                continue  # on-link routes: the enclave derives its own from the prefix
            if r["dst_len"] == 0:
                gateway = IPv4Address(via)
            else:
                routes.append(Route(IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}"), IPv4Address(via)))
        return Uplink(
            ifname=ifname,
            index=idx,
            mac=str(link.get_attr("IFLA_ADDRESS")).lower(),
            address=addrs[0],
            mtu=int(link.get_attr("IFLA_MTU")),
            gateway=gateway,
            routes=tuple(routes),
        )


def default_uplink() -> str:
    """The interface of the parent's IPv4 default route (what ``--uplink`` defaults to)."""
    from pyroute2.iproute.linux import IPRoute

    with IPRoute() as ipr:
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            if r["dst_len"] == 0 and r.get_attr("RTA_OIF") is not None:
                links = ipr.get_links(r.get_attr("RTA_OIF"))
                return str(next(iter(links)).get_attr("IFLA_IFNAME"))
    raise RelayError("network relay: the parent has no IPv4 default route; give the uplink explicitly")


@dataclass(frozen=True, slots=True)
class NameSettings:
    dns_servers: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    search_domains: tuple[str, ...] = ()
    hostname: str = "enclave"
    hosts: tuple[HostEntry, ...] = ()


def read_name_settings(etc: Path = Path("/etc"), hostname: str | None = None) -> NameSettings:
    """Nameservers, search list and /etc/hosts of the parent, filtered to what the enclave accepts.

    Loopback nameservers (systemd-resolved's 127.0.0.53, Docker's 127.0.0.11) are unreachable from the
    enclave and are left out; Salmiac runs a dnsmasq on the parent for that case, we do not (yet).
    """
    dns: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    search: list[str] = []
    with contextlib.suppress(OSError):
        for line in (etc / "resolv.conf").read_text(errors="replace").splitlines()[:200]:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver" and len(dns) < MAX_DNS_SERVERS:
                with contextlib.suppress(ValueError):
                    a = ipaddress.ip_address(words[1])
                    if not a.is_loopback and not a.is_unspecified:
                        dns.append(a)
            elif words and words[0] in ("search", "domain"):
                search = [w for w in words[1:] if is_hostname(w)][:MAX_SEARCH_DOMAINS]
    name = hostname if hostname is not None else socket.gethostname()
    if not is_hostname(name, max_len=MAX_HOSTNAME):
        name = "enclave"
    hosts: list[HostEntry] = []
    with contextlib.suppress(OSError):
        for line in (etc / "hosts").read_text(errors="replace").splitlines()[:1000]:
            words = line.split("#", 1)[0].split()
            if len(words) < 2 or len(hosts) >= MAX_HOSTS_ENTRIES:
                continue
            try:
                addr = ipaddress.ip_address(words[0])
            except ValueError:
                continue
            if addr.is_loopback or addr.is_multicast or addr.is_unspecified:
                continue
            names = [
                n
                for n in words[1:]
                if is_hostname(n) and n.lower() not in RESERVED_HOST_NAMES and n.lower() != name.lower()
            ][:MAX_NAMES_PER_HOST]
            if names:
                hosts.append(HostEntry(addr, tuple(names)))
    return NameSettings(tuple(dns), tuple(search), name, tuple(hosts))


def offer_transparent(uplink: Uplink, names: NameSettings) -> NetworkConfig:
    return NetworkConfig(
        mac=uplink.mac,
        ipv4=uplink.address,
        mtu=uplink.mtu,
        gateway=uplink.gateway,
        routes=uplink.routes,
        dns_servers=names.dns_servers,
        search_domains=names.search_domains,
        hostname=names.hostname,
        hosts=names.hosts,
        local_port_range=ENCLAVE_PORTS,
    )


def choose_private_subnet(in_use: Iterable[IPv4Network]) -> IPv4Network:
    used = list(in_use)
    for pool in PRIVATE_SUBNETS:
        for candidate in pool.subnets(new_prefix=30):
            if not any(candidate.overlaps(u) for u in used):
                return candidate
    raise RelayError("published mode: every private /30 candidate overlaps a parent network")


def offer_published(subnet: IPv4Network, mtu: int, names: NameSettings) -> NetworkConfig:
    parent_ip, enclave_ip = list(subnet.hosts())[:2]
    mac = "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))
    return NetworkConfig(
        mac=mac,
        ipv4=IPv4Interface(f"{enclave_ip}/{subnet.prefixlen}"),
        mtu=mtu,
        gateway=parent_ip,
        dns_servers=names.dns_servers,
        search_domains=names.search_domains,
        hostname=names.hostname,
        hosts=names.hosts,
    )


# --- nftables ---------------------------------------------------------------------------------------------


def _quote(ifname: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", ifname):
        raise RequestError(f"interface name {ifname!r} is not usable")
    return f'"{ifname}"'


def transparent_rules(uplink: str, keep: tuple[int, int] = PARENT_PORTS, table: str = NFT_TABLE_PREFIX) -> str:
    up = _quote(uplink)
    return f"""table inet {table} {{
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname {up} meta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport {keep[0]}-{keep[1]} accept
    iifname {up} meta nfproto ipv4 counter drop comment "the enclave answers for this address"
  }}
}}
"""


def published_rules(
    tap: str, enclave_ip: IPv4Address, subnet: IPv4Network, ports: Sequence[PortMapping], table: str = NFT_TABLE_PREFIX
) -> str:
    t = _quote(tap)
    dnat = "\n".join(
        f"    fib daddr type local {p.proto} dport {p.host_port} dnat to {enclave_ip}:{p.enclave_port}" for p in ports
    )
    return f"""table ip {table} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {t} return
{dnat}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
{dnat}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != {t} masquerade
    ip saddr 127.0.0.0/8 oifname {t} masquerade comment "localhost:PORT from the parent itself"
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    oifname {t} ct status dnat accept
    oifname {t} ct state established,related accept
    oifname {t} counter drop comment "only published ports reach the enclave"
  }}
}}
"""


def nft_apply(ruleset: str, table: str) -> None:
    nft_delete(table)
    try:
        subprocess.run(["nft", "-f", "-"], input=ruleset, text=True, check=True, capture_output=True)
    except FileNotFoundError as exc:
        raise RelayError("nft not found: install nftables") from exc
    except subprocess.CalledProcessError as exc:
        raise RelayError(f"nft: {exc.stderr.strip().splitlines()[-1] if exc.stderr else exc}") from exc


def nft_delete(table: str) -> None:
    for family in ("inet", "ip"):
        with contextlib.suppress(FileNotFoundError):
            subprocess.run(["nft", "delete", "table", family, table], capture_output=True, check=False)


def other_relay_tables(own: str) -> list[str]:
    """nftables tables of other salmiac relays running on this host (their sysctls must stay as they are)."""
    try:
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return []
    names = [line.split()[-1] for line in out.splitlines() if line.startswith("table ")]
    return [n for n in names if n.startswith(NFT_TABLE_PREFIX) and n != own]


def _sysctl(path: str, value: str) -> str | None:
    """Set a sysctl, returning the old value (to restore it)."""
    p = Path("/proc/sys") / path
    try:
        old = p.read_text().strip()
        p.write_text(value + "\n")
    except OSError as exc:
        raise RelayError(f"sysctl {path}={value}: {exc.strerror}") from exc
    return old


def _disable_offloads(ifname: str) -> None:
    """GRO/LRO would hand AF_PACKET frames larger than the MTU; the enclave's TAP could not take them."""
    for feature in ("gro", "lro"):
        subprocess.run(["ethtool", "-K", ifname, feature, "off"], capture_output=True, check=False)


# --- the relay --------------------------------------------------------------------------------------------


class NetRelay:
    """Set up one mode, hand out the enclave's offer, pump frames, undo everything on ``close()``."""

    def __init__(self, mode: Mode, uplink: str, publish: Sequence[PortMapping] = (), names: NameSettings | None = None,
                 *, offload: bool = True):
        if mode not in ("transparent", "published"):
            raise RequestError(f"network mode {mode!r}: expected transparent or published")
        check_publish(mode, publish)
        self.mode = mode
        self.uplink_name = uplink
        self.publish = tuple(publish)
        self.offload = offload
        self.names = names if names is not None else read_name_settings()
        self.offer: NetworkConfig | None = None
        self.port: FramePort | None = None
        self.pump: FramePump | None = None
        self._restore: list[tuple[str, str]] = []
        tag = secrets.token_hex(3)  # distinct names: several enclaves may run on one host
        self.table = f"{NFT_TABLE_PREFIX}_{tag}"
        self.tap_name = f"{TAP_PREFIX}{tag}"

    def setup(self) -> NetworkConfig:
        try:
            uplink = read_uplink(self.uplink_name)
            if self.mode == "transparent":
                self.offer = self._with_link_options(offer_transparent(uplink, self.names))
                if not self.offload:
                    _disable_offloads(uplink.ifname)
                self._set("net/ipv4/ip_local_port_range", f"{PARENT_PORTS[0]} {PARENT_PORTS[1]}")
                nft_apply(transparent_rules(uplink.ifname, table=self.table), self.table)
                self.port = PacketPort(uplink.ifname, self._max_frame(uplink.mtu), keep_port_range=PARENT_PORTS,
                                       vnet_hdr=self.offload)
            else:
                subnet = choose_private_subnet(self._networks_in_use())
                self.offer = self._with_link_options(offer_published(subnet, uplink.mtu, self.names))
                parent_ip = self.offer.gateway
                assert parent_ip is not None  # offer_published always sets it
                fd = open_tap(self.tap_name, vnet_hdr=self.offload, udp_segments=self.offer.udp_segments)
                self.port = TapPort(fd, self._max_frame(uplink.mtu), vnet_hdr=self.offload)
                self._configure_tap(IPv4Interface(f"{parent_ip}/{subnet.prefixlen}"), uplink.mtu)
                self._set("net/ipv4/ip_forward", "1")
                rules = published_rules(self.tap_name, self.offer.ipv4.ip, subnet, self.publish, self.table)
                nft_apply(rules, self.table)
        except NetConfigError as exc:
            self.close()
            raise RelayError(f"the parent's own network cannot be offered to the enclave: {exc}") from exc
        except OSError as exc:
            self.close()
            raise RelayError(f"network relay setup ({self.mode}, uplink {self.uplink_name}): {exc}") from exc
        except BaseException:
            self.close()
            raise
        return self.offer

    def run(self, stream: socket.socket) -> None:
        if self.port is None or self.offer is None:
            raise RelayError("network relay: run() before setup()")
        self.pump = FramePump(self.port, stream, max_frame=self.port.max_record)
        self.pump.run()

    def stop(self) -> None:
        if self.pump is not None:
            self.pump.stop()

    def stats(self) -> dict[str, object]:
        if self.pump is None:
            return {}
        return self.pump.stats.as_dict(self.port)

    def close(self) -> None:
        nft_delete(self.table)
        if other_relay_tables(self.table):
            self._restore.clear()  # another relay still relies on these settings; the last one restores
        for path, old in reversed(self._restore):
            with contextlib.suppress(RelayError):
                _sysctl(path, old)
        self._restore.clear()
        if self.port is not None:
            self.port.close()  # closing the TAP fd also deletes the (non-persistent) TAP
            self.port = None

    def _with_link_options(self, offer: NetworkConfig) -> NetworkConfig:
        """What the link carries: virtio-net headers with offload; UDP segments only if this kernel takes them
        back (the enclave's kernel is new enough; the parent's, on the host, may not be)."""
        return replace(offer, vnet_hdr=self.offload, udp_segments=self.offload and kernel_takes_udp_segments())

    @staticmethod
    def _max_frame(mtu: int) -> int:
        return mtu + ETH_HEADER + VLAN_TAG

    def _set(self, path: str, value: str) -> None:
        old = _sysctl(path, value)
        if old is not None:
            self._restore.append((path, old))

    def _networks_in_use(self) -> list[IPv4Network]:
        from pyroute2.iproute.linux import IPRoute

        nets: list[IPv4Network] = []
        with IPRoute() as ipr:
            for a in ipr.get_addr(family=socket.AF_INET):
                nets.append(IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}").network)
            for r in ipr.get_routes(family=socket.AF_INET, table=254):
                if r["dst_len"]:
                    nets.append(IPv4Network(f"{r.get_attr('RTA_DST')}/{r['dst_len']}"))
        return nets

    def _configure_tap(self, address: IPv4Interface, mtu: int) -> None:
        from pyroute2.iproute.linux import IPRoute

        with IPRoute() as ipr:
            (idx,) = ipr.link_lookup(ifname=self.tap_name)
            ipr.link("set", index=idx, mtu=mtu)
            ipr.addr("add", index=idx, address=str(address.ip), prefixlen=address.network.prefixlen)
            ipr.link("set", index=idx, state="up")
        # Connections to 127.0.0.1:HOSTPORT on the parent are DNATed into the TAP; the kernel drops a loopback
        # source leaving a non-loopback device unless route_localnet is on for it (Docker does the same for
        # its bridge). The TAP is ours and goes away with the relay: nothing to restore.
        _sysctl(f"net/ipv4/conf/{self.tap_name}/route_localnet", "1")


# --- choosing a mode for `salmiac run` -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkOptions:
    """``salmiac run --network MODE -p ... --uplink ... --dns ...``."""

    mode: Literal["auto", "transparent", "published", "none"] = "auto"
    publish: tuple[PortMapping, ...] = ()
    uplink: str | None = None
    dns: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None = None
    hostname: str | None = None

    def __post_init__(self) -> None:
        # Checked when the options are read, before any image is fetched or any device set up.
        check_publish(self.mode, self.publish)
        if self.hostname is not None and not is_hostname(self.hostname, max_len=MAX_HOSTNAME):
            raise RequestError(f"--hostname {self.hostname!r}: not a valid host name (RFC 1123, at most "
                               f"{MAX_HOSTNAME} characters)")


def network_unavailable() -> str | None:
    """Why this parent cannot relay frames (no root, no TUN, no nft), or None."""
    if os.geteuid() != 0:
        return "it needs root (CAP_NET_ADMIN)"
    if not Path("/dev/net/tun").exists():
        return "there is no /dev/net/tun"
    if shutil.which("nft") is None:
        return "nft (nftables) is not installed"
    return None


def choose_mode(opts: NetworkOptions, *, nitro: bool) -> Mode | None:
    """The mode to run, or None for no network.

    ``auto``: on Nitro, transparent (as Fortanix Salmiac: the parent is the enclave's container and its address
    is the enclave's). In emulation on an ordinary host, published (docker's default: NAT, only ``-p`` ports
    inbound): taking over a workstation's own address would cut its SSH and services off. Without root, auto
    means no network; an explicit mode then fails.
    """
    if opts.mode == "none":
        return None  # with -p refused by NetworkOptions already
    why = network_unavailable()
    if opts.mode == "auto":
        if why is not None:
            if opts.publish:
                raise RequestError(f"-p: the network relay cannot run here: {why}")
            log.info("no network for the enclave: %s", why)
            return None
        return "published" if opts.publish or not nitro else "transparent"
    if why is not None:
        raise RequestError(f"--network {opts.mode}: the network relay cannot run here: {why}")
    return opts.mode


def relay_for(opts: NetworkOptions, *, nitro: bool) -> NetRelay | None:
    mode = choose_mode(opts, nitro=nitro)
    return None if mode is None else build_relay(mode, opts)


def build_relay(mode: Mode, opts: NetworkOptions, etc: Path = Path("/etc"), *, offload: bool = True) -> NetRelay:
    """The relay for ``mode``: names from the parent's ``etc`` (``--dns``/``--hostname`` win), the default
    route's interface unless ``--uplink`` says otherwise."""
    names = read_name_settings(etc, opts.hostname)
    if opts.dns is not None:
        names = NameSettings(opts.dns, names.search_domains, names.hostname, names.hosts)
    return NetRelay(mode, opts.uplink or default_uplink(), opts.publish, names, offload=offload)


# --- listening for the enclave ----------------------------------------------------------------------------


def listen_stream(address: str) -> socket.socket:
    """``unix:PATH``, ``tcp:HOST:PORT`` or ``vsock:CID:PORT`` (CID usually VMADDR_CID_ANY)."""
    kind, _, rest = address.partition(":")
    try:
        if kind == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rest)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(rest)
        elif kind == "tcp":
            host, _, port = rest.rpartition(":")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
        elif kind == "vsock":
            cid, _, port = rest.partition(":")
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.bind((int(cid), int(port)))
        else:
            raise ValueError(f"unknown transport {kind!r}")
        s.listen(1)
    except (OSError, ValueError) as exc:
        raise RequestError(f"network relay: listen on {address}: {exc}") from exc
    return s


def main(argv: list[str] | None = None) -> int:
    """Development/test entry point. ``salmiac run`` builds a ``NetRelay`` itself and sends the offer over
    the control channel; here it is written to ``--offer-out`` as JSON instead."""
    p = argparse.ArgumentParser(prog="salmiac.parent.netrelay")
    p.add_argument("--mode", choices=["transparent", "published"], default="transparent")
    p.add_argument("--uplink", help="interface to relay (default: that of the default route)")
    p.add_argument("-p", "--publish", action="append", default=[], metavar="HOST:ENCLAVE[/proto]")
    p.add_argument("--listen", required=True, help="unix:PATH | tcp:HOST:PORT | vsock:CID:PORT")
    p.add_argument("--offer-out", type=Path, required=True)
    p.add_argument("--dns", action="append", default=None, help="nameserver for the enclave (default: resolv.conf)")
    p.add_argument("--hostname", default=None)
    p.add_argument("--etc", type=Path, default=Path("/etc"))
    p.add_argument("--stats-file", type=Path)
    p.add_argument("--no-offload", action="store_true", help="plain MTU-sized frames, no virtio-net header")
    args = p.parse_args(argv)
    relay: NetRelay | None = None
    stop = threading.Event()
    try:
        dns = None if args.dns is None else tuple(ipaddress.ip_address(a) for a in args.dns)
        opts = NetworkOptions(mode=args.mode, publish=tuple(parse_publish(s) for s in args.publish),
                              uplink=args.uplink, dns=dns, hostname=args.hostname)
        relay = build_relay(args.mode, opts, args.etc, offload=not args.no_offload)
        listener = listen_stream(args.listen)
        offer = relay.setup()
        tmp = args.offer_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(offer.to_dict()))
        tmp.replace(args.offer_out)

        def on_signal(signum: int, frame: Any) -> None:
            stop.set()
            if relay is not None:
                relay.stop()
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        conn, _ = listener.accept()
        listener.close()
        if not stop.is_set():
            relay.run(conn)
        conn.close()
    except SalmiacError as exc:
        print(f"salmiac: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ValueError, OSError) as exc:
        if not stop.is_set():  # after SIGTERM, a failing accept()/recv() is just the way out
            print(f"salmiac: network relay: {exc}", file=sys.stderr)
            return 1
    finally:
        if relay is not None:
            if args.stats_file:
                args.stats_file.write_text(json.dumps(relay.stats()))
            relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
