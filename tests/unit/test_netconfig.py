"""NetworkConfig: the parent's offer is hostile input; table tests of what is refused, and rendering."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.errors import RequestError
from salmiac.protocol.netconfig import NetConfigError, NetworkConfig, is_hostname

GOOD: dict[str, Any] = {
    "mac": "0a:9d:f6:91:fb:73",
    "ipv4": "172.31.40.12/20",
    "mtu": 9001,
    "gateway": "172.31.32.1",
    "routes": [{"destination": "10.0.0.0/8", "via": "172.31.32.1"}],
    "dns_servers": ["172.31.0.2", "2001:db8::53"],
    "search_domains": ["ec2.internal", "corp.example"],
    "hostname": "ip-172-31-40-12",
    "hosts": [{"address": "10.1.2.3", "names": ["db", "db.corp.example"]}],
    "local_port_range": [49152, 60999],
}


def with_(**changes: Any) -> dict[str, Any]:
    d = dict(GOOD)
    for k, v in changes.items():
        if v is KeyError:
            d.pop(k)
        else:
            d[k] = v
    return d


def test_roundtrip_and_render() -> None:
    cfg = NetworkConfig.from_dict(GOOD)
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == GOOD
    assert cfg.render_resolv_conf().splitlines()[1:] == [
        "nameserver 172.31.0.2",
        "nameserver 2001:db8::53",
        "search ec2.internal corp.example",
    ]
    hosts = cfg.render_hosts().splitlines()
    assert hosts[0] == "127.0.0.1\tlocalhost"
    assert "172.31.40.12\tip-172-31-40-12" in hosts
    assert hosts[-1] == "10.1.2.3\tdb db.corp.example"
    assert cfg.render_hostname() == "ip-172-31-40-12\n"


def test_minimal() -> None:
    cfg = NetworkConfig.from_dict({"mac": "02:00:00:00:00:01", "ipv4": "10.0.0.2/24", "mtu": 1500})
    assert cfg.gateway is None and cfg.routes == () and cfg.hostname == "enclave"


BAD = [
    ("unknown key", with_(evil=1), "unknown key 'evil'"),
    ("missing mtu", with_(mtu=KeyError), "missing key 'mtu'"),
    ("mac multicast", with_(mac="01:00:5e:00:00:01"), "multicast"),
    ("mac zero", with_(mac="00:00:00:00:00:00"), "zero"),
    ("mac junk", with_(mac="0a:9d:f6:91:fb"), "not a MAC"),
    ("mac type", with_(mac=123), "expected a string"),
    ("mtu small", with_(mtu=575), "mtu"),
    ("mtu big", with_(mtu=9002), "mtu"),
    ("mtu bool", with_(mtu=True), "integer"),
    ("mtu v6 min", with_(mtu=1000, ipv6="2001:db8::5/64"), "mtu"),
    ("ip loopback", with_(ipv4="127.0.0.2/8", gateway=KeyError, routes=[]), "usable"),
    ("ip no prefix", with_(ipv4="172.31.40.12"), "prefix"),
    ("ip network addr", with_(ipv4="172.31.32.0/20"), "network or broadcast"),
    ("ip too wide", with_(ipv4="10.0.0.2/4", gateway=KeyError, routes=[]), "wider"),
    ("gateway off-link", with_(gateway="192.168.1.1"), "gateway"),
    ("gateway self", with_(gateway="172.31.40.12"), "gateway"),
    ("second default", with_(routes=[{"destination": "0.0.0.0/0", "via": "172.31.32.1"}]), "default"),
    ("half default", with_(routes=[{"destination": "0.0.0.0/1", "via": "172.31.32.1"}]), "overlaps"),
    ("route loopback", with_(routes=[{"destination": "127.0.0.0/8", "via": "172.31.32.1"}]), "loopback"),
    ("route mcast", with_(routes=[{"destination": "224.0.0.0/8", "via": "172.31.32.1"}]), "multicast"),
    ("route off-link", with_(routes=[{"destination": "10.0.0.0/8", "via": "10.0.0.1"}]), "next hop"),
    ("route host bits", with_(routes=[{"destination": "10.0.0.1/8", "via": "172.31.32.1"}]), "host bits"),
    ("route extra key", with_(routes=[{"destination": "10.0.0.0/8", "via": "172.31.32.1", "x": 1}]), "map"),
    (
        "route dup",
        with_(routes=[{"destination": "10.0.0.0/8", "via": "172.31.32.1"}] * 2),
        "duplicate",
    ),
    (
        "too many routes",
        with_(routes=[{"destination": f"10.{i}.0.0/16", "via": "172.31.32.1"} for i in range(33)]),
        "more than 32",
    ),
    ("dns loopback", with_(dns_servers=["127.0.0.53"]), "loopback"),
    ("dns too many", with_(dns_servers=["1.1.1.1", "1.0.0.1", "8.8.8.8", "9.9.9.9"]), "more than 3"),
    ("dns junk", with_(dns_servers=["1.1.1.1\nnameserver 6.6.6.6"]), "non-printable"),
    ("search option", with_(search_domains=["a.com options ndots:15"]), "not a domain"),
    ("search too many", with_(search_domains=[f"d{i}.com" for i in range(7)]), "more than 6"),
    ("hostname ctl", with_(hostname="bad\x1bname"), "non-printable"),
    ("hostname underscore", with_(hostname="my_host"), "RFC 1123"),
    ("hostname long", with_(hostname="a" * 65), "RFC 1123"),
    ("hostname hyphen", with_(hostname="-lead"), "RFC 1123"),
    ("hosts localhost", with_(hosts=[{"address": "10.0.0.9", "names": ["localhost"]}]), "remapped"),
    ("hosts own name", with_(hosts=[{"address": "10.0.0.9", "names": ["ip-172-31-40-12"]}]), "remapped"),
    ("hosts loopback", with_(hosts=[{"address": "127.0.0.1", "names": ["x"]}]), "loopback"),
    ("hosts no names", with_(hosts=[{"address": "10.0.0.9", "names": []}]), "names"),
    ("hosts bad name", with_(hosts=[{"address": "10.0.0.9", "names": ["a b"]}]), "host name"),
    ("ports narrow", with_(local_port_range=[60000, 60010]), "local_port_range"),
    ("ports low", with_(local_port_range=[80, 5000]), "local_port_range"),
    ("ports type", with_(local_port_range="1-2"), "local_port_range"),
    ("long string", with_(hostname="a" * 10_000), "longer than"),
    ("v6 gw no v6", with_(gateway6="fe80::1"), "gateway6"),
    ("not a map", [], "expected a map"),
    ("vnet_hdr string", with_(vnet_hdr="true"), "vnet_hdr: expected true or false"),
    ("vnet_hdr int", with_(vnet_hdr=1), "vnet_hdr: expected true or false"),
    ("udp_segments alone", with_(udp_segments=True), "udp_segments needs vnet_hdr"),
]


@pytest.mark.parametrize(("data", "needle"), [(d, n) for _, d, n in BAD], ids=[i for i, _, _ in BAD])
def test_refused(data: Any, needle: str) -> None:
    with pytest.raises(NetConfigError, match=needle) as err:
        NetworkConfig.from_dict(data)
    assert isinstance(err.value, RequestError)
    assert "\n" not in str(err.value)


def test_link_options_round_trip_and_default_off() -> None:
    assert not NetworkConfig.from_dict(GOOD).vnet_hdr, "an older parent's offer: plain frames"
    cfg = NetworkConfig.from_dict(with_(vnet_hdr=True, udp_segments=True))
    assert cfg.vnet_hdr and cfg.udp_segments
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(("release", "takes"), [
    ("6.12.9+bpo-cloud-amd64", True), ("6.2.0", True), ("6.1.0-28-amd64", False),
    ("5.10.230-223.885.amzn2.x86_64", False), ("7.0", True), ("unknown", False),
])
def test_udp_segments_need_linux_6_2(release: str, takes: bool) -> None:
    from salmiac.framepump import kernel_takes_udp_segments

    assert kernel_takes_udp_segments(release) is takes


def test_ipv6_accepted() -> None:
    cfg = NetworkConfig.from_dict(
        with_(
            ipv6="2001:db8:1::12/64",
            gateway6="fe80::1",
            routes=[{"destination": "2001:db8:2::/48", "via": "2001:db8:1::1"}],
        )
    )
    assert str(cfg.gateway6) == "fe80::1"
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg


def test_hostname_rules() -> None:
    assert is_hostname("a-b.c1")
    assert not is_hostname("a..b")
    assert not is_hostname("a.")
    assert not is_hostname("x" * 64)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*GOOD, "x"]), json_like, max_size=12))
def test_fuzz_only_netconfigerror(data: dict[str, Any]) -> None:
    merged = {**GOOD, **data}
    try:
        cfg = NetworkConfig.from_dict(merged)
    except NetConfigError:
        return
    # Whatever is accepted renders to lines without control characters.
    for text in (cfg.render_resolv_conf(), cfg.render_hosts(), cfg.render_hostname()):
        assert text.replace("\t", " ").replace("\n", "").isprintable()
