"""The virtio-net header on the link: layout against the kernel's header, and what the enclave refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac.protocol import vnet

HEADER = Path("/usr/include/linux/virtio_net.h")
ETH_IP_TCP = bytes(14 + 20 + 20)  # where the checksum offsets below point
MTU_FRAME = 1500 + 18


@pytest.mark.skipif(not HEADER.exists(), reason="linux-libc-dev headers not installed")
def test_layout_and_constants_match_the_kernel_header() -> None:
    text = HEADER.read_text()
    body = re.search(r"struct virtio_net_hdr \{(.*?)\};", text, re.S)
    assert body
    fields = re.findall(r"(__u8|__virtio16)\s+(\w+);", body.group(1))
    assert fields == [("__u8", "flags"), ("__u8", "gso_type"), ("__virtio16", "hdr_len"),
                      ("__virtio16", "gso_size"), ("__virtio16", "csum_start"), ("__virtio16", "csum_offset")]
    assert vnet.SIZE == 10
    defined = dict(re.findall(r"#define\s+VIRTIO_NET_HDR_(\w+)\s+(0x[0-9a-fA-F]+|\d+)", text))
    assert int(defined["F_NEEDS_CSUM"], 0) == vnet.F_NEEDS_CSUM
    assert int(defined["F_DATA_VALID"], 0) == vnet.F_DATA_VALID
    assert int(defined["GSO_TCPV4"], 0) == vnet.GSO_TCPV4
    assert int(defined["GSO_TCPV6"], 0) == vnet.GSO_TCPV6
    assert int(defined["GSO_ECN"], 0) == vnet.GSO_ECN


def test_byte_exact_little_endian() -> None:
    header = vnet.pack(flags=vnet.F_NEEDS_CSUM, gso_type=vnet.GSO_TCPV4, hdr_len=66, gso_size=1448,
                       csum_start=34, csum_offset=16)
    assert header == bytes.fromhex("01 01 4200 a805 2200 1000")
    assert not any(vnet.PLAIN) and len(vnet.PLAIN) == 10


def tcp_segment(length: int = 65000, **fields: int) -> bytes:
    values = {"flags": vnet.F_NEEDS_CSUM, "gso_type": vnet.GSO_TCPV4, "hdr_len": 66, "gso_size": 1448,
              "csum_start": 34, "csum_offset": 16} | fields
    return vnet.pack(**values) + ETH_IP_TCP + bytes(length - len(ETH_IP_TCP))


@pytest.mark.parametrize("record", [
    vnet.PLAIN + bytes(60),
    vnet.PLAIN + bytes(MTU_FRAME),
    vnet.pack(flags=vnet.F_DATA_VALID) + bytes(1514),
    vnet.pack(flags=vnet.F_NEEDS_CSUM, csum_start=34, csum_offset=6) + ETH_IP_TCP,  # UDP checksum, no GSO
    tcp_segment(),
    tcp_segment(vnet.MAX_SEGMENT_FRAME),
    tcp_segment(gso_type=vnet.GSO_TCPV6 | vnet.GSO_ECN, csum_start=54),
    tcp_segment(gso_type=vnet.GSO_UDP_L4, hdr_len=42, gso_size=1000, csum_offset=6),  # UDP_SEGMENT senders
], ids=["small", "mtu", "data-valid", "partial-csum", "segment", "largest-segment", "tcpv6-ecn", "udp-l4"])
def test_what_linux_produces_is_accepted(record: bytes) -> None:
    assert vnet.refusal(record, MTU_FRAME) is None


@pytest.mark.parametrize(("record", "why"), [
    (bytes(23), "shorter than"),
    (vnet.pack(flags=4) + bytes(60), "unknown flags 0x4"),
    (vnet.pack(gso_type=vnet.GSO_ECN) + bytes(60), "ECN without segmentation"),
    (vnet.PLAIN + bytes(MTU_FRAME + 1), "1519-byte frame without segmentation"),
    (tcp_segment(gso_type=3), "segmentation type 0x3"),  # UFO: never offered
    (tcp_segment(gso_type=vnet.GSO_UDP_L4 | vnet.GSO_ECN), "segmentation type 0x85"),  # ECN is TCP's
    (tcp_segment(flags=0), "without a partial checksum"),
    (tcp_segment(gso_size=0), "segment size 0"),
    (tcp_segment(gso_size=9000), "segment size 9000"),
    (tcp_segment(vnet.MAX_SEGMENT_FRAME + 1), "at most 65553"),
    (tcp_segment(hdr_len=65001), "header length 65001"),
    (tcp_segment(csum_start=10), "checksum at 10+16"),
    (tcp_segment(csum_start=64999), "checksum at 64999+16"),
    (tcp_segment(csum_start=64982, csum_offset=17), "checksum at 64982+17"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_hostile_headers_are_refused_with_the_reason(record: bytes, why: str) -> None:
    assert why in str(vnet.refusal(record, MTU_FRAME))


def test_checksum_field_may_end_exactly_at_the_frame_end() -> None:
    assert vnet.refusal(tcp_segment(csum_start=64982, csum_offset=16), MTU_FRAME) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(min_value=14, max_value=9019))
def test_any_bytes_get_an_answer_never_an_exception(record: bytes, max_plain: int) -> None:
    answer = vnet.refusal(record, max_plain)
    if answer is None:
        flags, gso_type, _, _, start, offset = vnet.HEADER.unpack_from(record)
        assert not flags & ~3 and gso_type in (0, 1, 4, 5, 0x81, 0x84)
        if flags & vnet.F_NEEDS_CSUM:
            assert start + offset + 2 <= len(record) - vnet.SIZE
