"""The network parameters the parent offers the enclave, validated as hostile input.

The parent is untrusted. What it can make the enclave do with a ``NetworkConfig`` is limited to things a
network attacker on the parent's side could do anyway (the parent sees and forges every frame), except
that it must not be able to reach *inside* the enclave: no route that captures loopback, no nameserver
on the enclave's own loopback, no ``/etc/hosts`` line that remaps ``localhost``, no hostname or domain
that smuggles control characters, newlines or options into files we render, no unbounded lists.

``from_dict()`` is the one entry point for untrusted data (plain dicts as carried by the CBOR control
protocol): unknown keys, wrong types, oversized strings and lists are rejected before anything is
parsed. ``to_dict()`` is its inverse. Rendering (`render_resolv_conf` etc.) is pure.

Routing rules:
- at most one default route, and it is implied by ``gateway`` (a route entry to ``0.0.0.0/0`` or ``::/0``
  is refused);
- every next hop is on-link (inside the interface's network) and is not our own address;
- no route to loopback, multicast, "this network" (0/8) or reserved (240/4) space;
- at most ``MAX_ROUTES`` routes, no duplicate destinations.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

from salmiac.errors import RequestError

MIN_MTU_V4 = 576
MIN_MTU_V6 = 1280
MAX_MTU = 9001
MAX_ROUTES = 32
MAX_DNS_SERVERS = 3
"""glibc's MAXNS: further nameserver lines are ignored by the resolver anyway."""
MAX_SEARCH_DOMAINS = 6
MAX_SEARCH_CHARS = 256
MAX_HOSTS_ENTRIES = 64
MAX_NAMES_PER_HOST = 8
MAX_HOSTNAME = 64
"""Linux HOST_NAME_MAX."""
MAX_DOMAIN = 253
MAX_STRING = 300
"""Any string field is refused beyond this before it is parsed."""
RESERVED_HOST_NAMES = frozenset(
    {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "ip6-allnodes", "ip6-allrouters"}
)
"""Names the parent may not remap in /etc/hosts: they must stay on the enclave's loopback."""

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAC = re.compile(r"^[0-9a-f]{2}(?::[0-9a-f]{2}){5}$")
_FORBIDDEN_V4 = (
    IPv4Network("0.0.0.0/8"),
    IPv4Network("127.0.0.0/8"),
    IPv4Network("224.0.0.0/4"),
    IPv4Network("240.0.0.0/4"),
)
_FORBIDDEN_V6 = (IPv6Network("::/128"), IPv6Network("::1/128"), IPv6Network("ff00::/8"))

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network


class NetConfigError(RequestError):
    """The offered network configuration is malformed or outside what the enclave accepts."""


@dataclass(frozen=True, slots=True)
class Route:
    destination: IPNetwork
    via: IPAddress


@dataclass(frozen=True, slots=True)
class HostEntry:
    address: IPAddress
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """Everything needed to bring up ``salmiac0`` and name resolution in the enclave."""

    mac: str
    ipv4: IPv4Interface
    mtu: int
    gateway: IPv4Address | None = None
    routes: tuple[Route, ...] = ()
    ipv6: IPv6Interface | None = None
    gateway6: IPv6Address | None = None
    dns_servers: tuple[IPAddress, ...] = ()
    search_domains: tuple[str, ...] = ()
    hostname: str = "enclave"
    hosts: tuple[HostEntry, ...] = ()
    local_port_range: tuple[int, int] | None = None
    """The enclave's ephemeral port range, kept disjoint from the parent's in transparent mode."""
    vnet_hdr: bool = False
    """Frames on the link carry a virtio-net header: segmentation and checksum offload (``protocol.vnet``)."""
    udp_segments: bool = False
    """With ``vnet_hdr``: the parent's kernel takes UDP segments (GSO_UDP_L4, Linux >= 6.2), so the enclave's TAP
    may hand them over whole; otherwise its kernel cuts UDP to the MTU before the TAP."""

    def __post_init__(self) -> None:
        _validate(self)

    # --- untrusted dicts -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, unsafe: Mapping[str, Any]) -> NetworkConfig:
        if not isinstance(unsafe, Mapping):
            raise NetConfigError("network config: expected a map")
        unknown = set(unsafe) - _ALL_KEYS
        if unknown:
            raise NetConfigError(f"network config: unknown key {sorted(map(str, unknown))[0]!r}")
        missing = _REQUIRED_KEYS - set(unsafe)
        if missing:
            raise NetConfigError(f"network config: missing key {sorted(missing)[0]!r}")
        try:
            return cls(
                mac=_mac(_str(unsafe, "mac")),
                ipv4=_iface4(_str(unsafe, "ipv4")),
                mtu=_int(unsafe, "mtu"),
                gateway=_opt(unsafe, "gateway", lambda v: IPv4Address(_s("gateway", v))),
                routes=tuple(_route(r) for r in _list(unsafe, "routes", MAX_ROUTES)),
                ipv6=_opt(unsafe, "ipv6", lambda v: IPv6Interface(_s("ipv6", v))),
                gateway6=_opt(unsafe, "gateway6", lambda v: IPv6Address(_s("gateway6", v))),
                dns_servers=tuple(
                    ipaddress.ip_address(_s("dns_servers", v)) for v in _list(unsafe, "dns_servers", MAX_DNS_SERVERS)
                ),
                search_domains=tuple(
                    _s("search_domains", v) for v in _list(unsafe, "search_domains", MAX_SEARCH_DOMAINS)
                ),
                hostname=_str(unsafe, "hostname") if "hostname" in unsafe else "enclave",
                hosts=tuple(_host(h) for h in _list(unsafe, "hosts", MAX_HOSTS_ENTRIES)),
                local_port_range=_opt(unsafe, "local_port_range", _port_range),
                vnet_hdr=_bool(unsafe, "vnet_hdr") if "vnet_hdr" in unsafe else False,
                udp_segments=_bool(unsafe, "udp_segments") if "udp_segments" in unsafe else False,
            )
        except ValueError as exc:  # ipaddress parse errors
            raise NetConfigError(f"network config: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mac": self.mac, "ipv4": str(self.ipv4), "mtu": self.mtu}
        if self.gateway is not None:
            out["gateway"] = str(self.gateway)
        out["routes"] = [{"destination": str(r.destination), "via": str(r.via)} for r in self.routes]
        if self.ipv6 is not None:
            out["ipv6"] = str(self.ipv6)
        if self.gateway6 is not None:
            out["gateway6"] = str(self.gateway6)
        out["dns_servers"] = [str(a) for a in self.dns_servers]
        out["search_domains"] = list(self.search_domains)
        out["hostname"] = self.hostname
        out["hosts"] = [{"address": str(h.address), "names": list(h.names)} for h in self.hosts]
        if self.local_port_range is not None:
            out["local_port_range"] = list(self.local_port_range)
        if self.vnet_hdr:
            out["vnet_hdr"] = True
        if self.udp_segments:
            out["udp_segments"] = True
        return out

    # --- rendering -------------------------------------------------------------------------------------

    def render_resolv_conf(self) -> str:
        lines = ["# written by salmiac from the parent's offer"]
        lines += [f"nameserver {a}" for a in self.dns_servers]
        if self.search_domains:
            lines.append("search " + " ".join(self.search_domains))
        return "\n".join(lines) + "\n"

    def render_hosts(self) -> str:
        lines = [
            "127.0.0.1\tlocalhost",
            "::1\tlocalhost ip6-localhost ip6-loopback",
            f"{self.ipv4.ip}\t{self.hostname}",
        ]
        lines += [f"{h.address}\t{' '.join(h.names)}" for h in self.hosts]
        return "\n".join(lines) + "\n"

    def render_hostname(self) -> str:
        return self.hostname + "\n"


_REQUIRED_KEYS = frozenset({"mac", "ipv4", "mtu"})
_ALL_KEYS = _REQUIRED_KEYS | {
    "gateway",
    "routes",
    "ipv6",
    "gateway6",
    "dns_servers",
    "search_domains",
    "hostname",
    "hosts",
    "local_port_range",
    "vnet_hdr",
    "udp_segments",
}


# --- field parsers (untrusted) ---------------------------------------------------------------------------


def _s(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise NetConfigError(f"network config: {name}: expected a string, got {type(value).__name__}")
    if len(value) > MAX_STRING:
        raise NetConfigError(f"network config: {name}: string longer than {MAX_STRING}")
    if not value.isascii() or not value.isprintable():
        raise NetConfigError(f"network config: {name}: non-printable or non-ASCII characters")
    return value


def _str(d: Mapping[str, Any], key: str) -> str:
    return _s(key, d[key])


def _int(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise NetConfigError(f"network config: {key}: expected an integer")
    return value


def _bool(d: Mapping[str, Any], key: str) -> bool:
    value = d[key]
    if not isinstance(value, bool):
        raise NetConfigError(f"network config: {key}: expected true or false")
    return value


def _list(d: Mapping[str, Any], key: str, limit: int) -> list[Any]:
    value = d.get(key, [])
    if not isinstance(value, list | tuple):
        raise NetConfigError(f"network config: {key}: expected a list")
    if len(value) > limit:
        raise NetConfigError(f"network config: {key}: more than {limit} entries")
    return list(value)


def _opt(d: Mapping[str, Any], key: str, parse: Any) -> Any:
    value = d.get(key)
    return None if value is None else parse(value)


def _mac(value: str) -> str:
    mac = value.lower()
    if not _MAC.match(mac):
        raise NetConfigError(f"network config: mac: {value!r} is not a MAC address")
    return mac


def _iface4(value: str) -> IPv4Interface:
    if "/" not in value:
        raise NetConfigError(f"network config: ipv4: {value!r} needs a prefix length")
    return IPv4Interface(value)


def _route(unsafe: object) -> Route:
    if not isinstance(unsafe, Mapping) or set(unsafe) != {"destination", "via"}:
        raise NetConfigError("network config: routes: each route is a map with destination and via")
    dest = ipaddress.ip_network(_s("route destination", unsafe["destination"]), strict=True)
    via = ipaddress.ip_address(_s("route via", unsafe["via"]))
    return Route(dest, via)


def _host(unsafe: object) -> HostEntry:
    if not isinstance(unsafe, Mapping) or set(unsafe) != {"address", "names"}:
        raise NetConfigError("network config: hosts: each entry is a map with address and names")
    names = unsafe["names"]
    if not isinstance(names, list | tuple) or not 1 <= len(names) <= MAX_NAMES_PER_HOST:
        raise NetConfigError(f"network config: hosts: 1 to {MAX_NAMES_PER_HOST} names per address")
    return HostEntry(
        ipaddress.ip_address(_s("hosts address", unsafe["address"])),
        tuple(_s("hosts name", n) for n in names),
    )


def _port_range(unsafe: object) -> tuple[int, int]:
    if (
        not isinstance(unsafe, list | tuple)
        or len(unsafe) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in unsafe)
    ):
        raise NetConfigError("network config: local_port_range: expected [low, high]")
    return (unsafe[0], unsafe[1])


# --- semantic validation (runs for every construction, trusted or not) -----------------------------------


def is_hostname(name: str, *, max_len: int = MAX_DOMAIN) -> bool:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens."""
    if not name or len(name) > max_len or name.endswith("."):
        return False
    return all(_LABEL.match(label) for label in name.split("."))


def _forbidden(addr: IPAddress | IPNetwork) -> bool:
    if isinstance(addr, IPv4Address | IPv4Network):
        nets4: Sequence[IPv4Network] = _FORBIDDEN_V4
        return any((addr in n) if isinstance(addr, IPv4Address) else addr.overlaps(n) for n in nets4)
    nets6: Sequence[IPv6Network] = _FORBIDDEN_V6
    return any((addr in n) if isinstance(addr, IPv6Address) else addr.overlaps(n) for n in nets6)


def _validate(cfg: NetworkConfig) -> None:
    fail = NetConfigError
    if not _MAC.match(cfg.mac):
        raise fail(f"network config: mac: {cfg.mac!r} is not a lower-case MAC address")
    first = int(cfg.mac[:2], 16)
    if first & 1 or cfg.mac == "00:00:00:00:00:00":
        raise fail(f"network config: mac: {cfg.mac} is multicast or zero")
    if cfg.udp_segments and not cfg.vnet_hdr:
        raise fail("network config: udp_segments needs vnet_hdr")

    min_mtu = MIN_MTU_V6 if cfg.ipv6 is not None else MIN_MTU_V4
    if isinstance(cfg.mtu, bool) or not min_mtu <= cfg.mtu <= MAX_MTU:
        raise fail(f"network config: mtu: {cfg.mtu} outside [{min_mtu}, {MAX_MTU}]")

    net4 = cfg.ipv4.network
    ip4 = cfg.ipv4.ip
    if _forbidden(ip4) or ip4.is_link_local:
        raise fail(f"network config: ipv4: {ip4} is not a usable unicast address")
    if net4.prefixlen < 8:
        raise fail(f"network config: ipv4: prefix /{net4.prefixlen} is wider than /8")
    if net4.prefixlen <= 30 and ip4 in (net4.network_address, net4.broadcast_address):
        raise fail(f"network config: ipv4: {ip4} is the network or broadcast address of {net4}")
    if cfg.gateway is not None and (cfg.gateway not in net4 or cfg.gateway == ip4):
        raise fail(f"network config: gateway: {cfg.gateway} is not another address on {net4}")

    net6 = cfg.ipv6.network if cfg.ipv6 is not None else None
    if cfg.ipv6 is not None:
        if _forbidden(cfg.ipv6.ip) or cfg.ipv6.ip.is_link_local:
            raise fail(f"network config: ipv6: {cfg.ipv6.ip} is not a usable unicast address")
        if cfg.ipv6.network.prefixlen < 16:
            raise fail(f"network config: ipv6: prefix /{cfg.ipv6.network.prefixlen} is wider than /16")
    if cfg.gateway6 is not None:
        on_link = cfg.gateway6.is_link_local or (net6 is not None and cfg.gateway6 in net6)
        if net6 is None or not on_link or (cfg.ipv6 is not None and cfg.gateway6 == cfg.ipv6.ip):
            raise fail(f"network config: gateway6: {cfg.gateway6} is not an on-link router")

    if len(cfg.routes) > MAX_ROUTES:
        raise fail(f"network config: routes: more than {MAX_ROUTES}")
    seen: set[IPNetwork] = set()
    for r in cfg.routes:
        where = f"network config: route {r.destination} via {r.via}"
        if r.destination.prefixlen == 0:
            raise fail(f"{where}: the default route comes only from the gateway")
        if r.destination in seen:
            raise fail(f"{where}: duplicate destination")
        seen.add(r.destination)
        if _forbidden(r.destination):
            raise fail(f"{where}: destination overlaps loopback, multicast or reserved space")
        if isinstance(r.via, IPv4Address):
            if not isinstance(r.destination, IPv4Network) or r.via not in net4 or r.via == ip4:
                raise fail(f"{where}: next hop is not another address on {net4}")
        else:
            ok6 = r.via.is_link_local or (net6 is not None and r.via in net6)
            if not isinstance(r.destination, IPv6Network) or net6 is None or not ok6:
                raise fail(f"{where}: next hop is not an on-link IPv6 router")

    if len(cfg.dns_servers) > MAX_DNS_SERVERS:
        raise fail(f"network config: dns_servers: more than {MAX_DNS_SERVERS}")
    for a in cfg.dns_servers:
        if _forbidden(a) or (isinstance(a, IPv4Address) and a.is_unspecified):
            raise fail(f"network config: dns_servers: {a} is loopback, multicast or unspecified")

    if len(cfg.search_domains) > MAX_SEARCH_DOMAINS:
        raise fail(f"network config: search_domains: more than {MAX_SEARCH_DOMAINS}")
    if len(" ".join(cfg.search_domains)) > MAX_SEARCH_CHARS:
        raise fail(f"network config: search_domains: longer than {MAX_SEARCH_CHARS} characters")
    for d in cfg.search_domains:
        if not is_hostname(d):
            raise fail(f"network config: search_domains: {d!r} is not a domain name")

    if not is_hostname(cfg.hostname, max_len=MAX_HOSTNAME):
        raise fail(f"network config: hostname: {cfg.hostname!r} is not an RFC 1123 host name")

    if len(cfg.hosts) > MAX_HOSTS_ENTRIES:
        raise fail(f"network config: hosts: more than {MAX_HOSTS_ENTRIES} entries")
    for h in cfg.hosts:
        if not 1 <= len(h.names) <= MAX_NAMES_PER_HOST:
            raise fail(f"network config: hosts: {h.address}: 1 to {MAX_NAMES_PER_HOST} names")
        if h.address.is_loopback or h.address.is_multicast or h.address.is_unspecified:
            raise fail(f"network config: hosts: {h.address} is loopback, multicast or unspecified")
        for n in h.names:
            if not is_hostname(n):
                raise fail(f"network config: hosts: {n!r} is not a host name")
            if n.lower() in RESERVED_HOST_NAMES or n.lower() == cfg.hostname.lower():
                raise fail(f"network config: hosts: {n!r} may not be remapped")

    if cfg.local_port_range is not None:
        lo, hi = cfg.local_port_range
        if not 1024 <= lo < hi <= 65535 or hi - lo < 1023:
            raise fail(f"network config: local_port_range: {lo}-{hi} must be a span of >= 1024 in 1024-65535")
