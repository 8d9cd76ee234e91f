"""How the parent builds its offer from its own files and interface facts (pure parts of parent.netrelay)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from salmiac.errors import RequestError
from salmiac.parent.netrelay import (
    ENCLAVE_PORTS,
    PRIVATE_SUBNETS,
    NameSettings,
    PortMapping,
    RelayError,
    Uplink,
    choose_private_subnet,
    offer_published,
    offer_transparent,
    published_rules,
    read_name_settings,
    transparent_rules,
)
from salmiac.protocol.netconfig import NetworkConfig, Route


def test_name_settings_filtered(tmp_path: Path) -> None:
    (tmp_path / "resolv.conf").write_text(
        "# comment\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver bogus\n"
        "nameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\nsearch ec2.internal bad_domain ok.example\n"
    )
    (tmp_path / "hosts").write_text(
        "127.0.0.1 localhost\n::1 ip6-localhost\n10.0.0.5 db db.internal # the database\n"
        "10.0.0.6 localhost evil\n10.0.0.7 myhost\nnot-an-ip name\n10.0.0.8 bad_name\n"
    )
    names = read_name_settings(tmp_path, hostname="myhost")
    assert [str(a) for a in names.dns_servers] == ["10.0.0.2", "1.1.1.1", "8.8.8.8"]
    assert names.search_domains == ("ec2.internal", "ok.example")
    assert [(str(h.address), h.names) for h in names.hosts] == [
        ("10.0.0.5", ("db", "db.internal")),
        ("10.0.0.6", ("evil",)),
    ]
    assert names.hostname == "myhost"
    assert read_name_settings(tmp_path, hostname="bad_host!").hostname == "enclave"


def test_offers_are_valid_and_roundtrip() -> None:
    uplink = Uplink(
        "eth0",
        2,
        "0a:9d:f6:91:fb:73",
        IPv4Interface("172.31.40.12/20"),
        9001,
        IPv4Address("172.31.32.1"),
        (Route(IPv4Network("10.0.0.0/8"), IPv4Address("172.31.32.1")),),
    )
    names = NameSettings((IPv4Address("172.31.0.2"),), ("ec2.internal",), "ip-172-31-40-12", ())
    t = offer_transparent(uplink, names)
    assert t.mac == uplink.mac and t.ipv4 == uplink.address and t.local_port_range == ENCLAVE_PORTS
    assert NetworkConfig.from_dict(t.to_dict()) == t
    p = offer_published(IPv4Network("100.127.254.0/30"), 1500, names)
    assert str(p.ipv4) == "100.127.254.2/30" and str(p.gateway) == "100.127.254.1"
    assert int(p.mac[:2], 16) & 0b11 == 0b10  # locally administered unicast
    assert NetworkConfig.from_dict(p.to_dict()) == p


def test_private_subnet_avoids_parent_networks() -> None:
    assert choose_private_subnet([]) == IPv4Network("100.127.254.0/30")
    assert choose_private_subnet([IPv4Network("100.64.0.0/10")]) == IPv4Network("10.254.254.0/30")
    # a second enclave on the same host: the first one's link is in use, the next /30 is taken
    assert choose_private_subnet([IPv4Network("100.127.254.0/30")]) == IPv4Network("100.127.254.4/30")
    assert all(pool.prefixlen == 24 for pool in PRIVATE_SUBNETS)
    with pytest.raises(RelayError):
        choose_private_subnet([IPv4Network("0.0.0.0/0")])


def test_rules_text() -> None:
    r = transparent_rules("eth0")
    assert 'iifname "eth0" meta nfproto ipv4 meta l4proto { tcp, udp } th dport 32768-49151 accept' in r
    pub = published_rules(
        "salmiac-0a1b2c", IPv4Address("100.127.254.2"), IPv4Network("100.127.254.0/30"),
        [PortMapping(8080, 80, "tcp")], table="salmiac_0a1b2c",
    )
    assert pub.startswith("table ip salmiac_0a1b2c {")
    assert "tcp dport 8080 dnat to 100.127.254.2:80" in pub
    assert "masquerade" in pub
    with pytest.raises(RequestError):
        transparent_rules('eth0" ; flush ruleset')


def test_choose_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from salmiac.parent import netrelay
    from salmiac.parent.netrelay import NetworkOptions, choose_mode

    monkeypatch.setattr(netrelay, "network_unavailable", lambda: None)
    assert choose_mode(NetworkOptions(), nitro=True) == "transparent"
    assert choose_mode(NetworkOptions(), nitro=False) == "published"
    assert choose_mode(NetworkOptions(publish=(PortMapping(80, 80),)), nitro=True) == "published"
    assert choose_mode(NetworkOptions(mode="transparent"), nitro=False) == "transparent"
    assert choose_mode(NetworkOptions(mode="none"), nitro=True) is None
    with pytest.raises(RequestError, match="-p needs a network"):
        choose_mode(NetworkOptions(mode="none", publish=(PortMapping(80, 80),)), nitro=False)
    monkeypatch.setattr(netrelay, "network_unavailable", lambda: "it needs root (CAP_NET_ADMIN)")
    assert choose_mode(NetworkOptions(), nitro=False) is None, "auto without root: no network, not an error"
    with pytest.raises(RequestError, match="needs root"):
        choose_mode(NetworkOptions(mode="published"), nitro=False)
    with pytest.raises(RequestError, match="needs root"):
        choose_mode(NetworkOptions(publish=(PortMapping(80, 80),)), nitro=False)
