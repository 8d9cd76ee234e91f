"""The virtio-net header that carries segmentation and checksum offload across the link: sans-IO.

With offload, every frame on the link is ``virtio_net_hdr + Ethernet frame``, exactly what a TAP opened with
IFF_VNET_HDR reads and writes, and what an AF_PACKET socket with PACKET_VNET_HDR receives and sends. A frame
can then be one 64 KiB TCP or UDP segment ("GSO": the receiving kernel or NIC cuts it to the MTU) with its checksum
left for the receiver to finish ("NEEDS_CSUM"), so the relay moves one record where it would move 45, and
no one computes a checksum in Python. Without offload the link carries plain Ethernet frames.

Layout (struct virtio_net_hdr, the legacy 10-byte form; fields in the byte order Linux uses for it on
little-endian hosts, which is what x86-64 and arm64 Nitro hosts are)::

    u8   flags        NEEDS_CSUM (1): checksum from csum_start, stored at csum_start + csum_offset
                      DATA_VALID (2): the sender already verified the checksum (AF_PACKET reports it)
    u8   gso_type     NONE (0), TCPV4 (1), TCPV6 (4), UDP_L4 (5: UDP segmentation, IPv4 or IPv6); | ECN (0x80)
    le16 hdr_len      bytes of Ethernet + IP + TCP headers
    le16 gso_size     payload bytes per segment (the MSS)
    le16 csum_start   from the start of the Ethernet frame
    le16 csum_offset  from csum_start

The enclave's kernel parses these headers from the parent, which is not trusted, so the enclave refuses
(``refusal``) any header outside the few shapes its own kernel and a Linux parent produce: only those two
flags, TCP or UDP segmentation only (no UFO: IP fragmentation), ECN only on TCP, a checksum field inside the
frame, a segment size and frame length within bounds. Kernel parsers of this header have had bugs (malformed
GSO packets); a narrow door keeps them out of reach.
"""

from __future__ import annotations

import struct
from typing import Final

from salmiac.protocol.frames import ETH_HEADER, VLAN_TAG

HEADER: Final = struct.Struct("<BBHHHH")
SIZE: Final = HEADER.size
"""10 bytes: TUNSETVNETHDRSZ's default, and what PACKET_VNET_HDR uses."""

F_NEEDS_CSUM: Final = 1
F_DATA_VALID: Final = 2
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
GSO_UDP_L4: Final = 5
GSO_ECN: Final = 0x80

MAX_IP_PACKET: Final = 65535
"""An IPv4 total length (and an IPv6 payload length without jumbograms) is 16 bits: the largest segment."""
MAX_SEGMENT_FRAME: Final = MAX_IP_PACKET + ETH_HEADER + VLAN_TAG
MAX_RECORD: Final = SIZE + MAX_SEGMENT_FRAME
"""The largest frame on an offload link, header included."""

PLAIN: Final = bytes(SIZE)
"""The header of a frame with nothing to offload."""

_FLAGS: Final = F_NEEDS_CSUM | F_DATA_VALID
_GSO_TYPES: Final = frozenset({GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4})


def refusal(record: bytes | bytearray | memoryview, max_plain_frame: int) -> str | None:
    """Why ``record`` (virtio-net header + Ethernet frame) from an untrusted peer must not reach a TAP, or None.

    ``max_plain_frame``: the largest Ethernet frame without segmentation (MTU + Ethernet and VLAN headers).
    """
    if len(record) < SIZE + ETH_HEADER:
        return "shorter than a virtio-net and an Ethernet header"
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = HEADER.unpack_from(record)
    length = len(record) - SIZE
    if flags & ~_FLAGS:
        return f"unknown flags {flags:#x}"
    if flags & F_NEEDS_CSUM and not ETH_HEADER <= csum_start <= length - 2 - csum_offset:
        return f"checksum at {csum_start}+{csum_offset} outside the {length}-byte frame"
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if gso_type:
            return "ECN without segmentation"
        if length > max_plain_frame:
            return f"{length}-byte frame without segmentation (at most {max_plain_frame})"
        return None
    if gso not in _GSO_TYPES or (gso_type & GSO_ECN and gso == GSO_UDP_L4):
        return f"segmentation type {gso_type:#x}"
    if not flags & F_NEEDS_CSUM:
        return "segmentation without a partial checksum"
    if not 1 <= gso_size <= max_plain_frame:
        return f"segment size {gso_size}"
    if length > MAX_SEGMENT_FRAME:
        return f"{length}-byte segment (at most {MAX_SEGMENT_FRAME})"
    if hdr_len > length:
        return f"header length {hdr_len} beyond the {length}-byte frame"
    return None


def pack(flags: int = 0, gso_type: int = GSO_NONE, hdr_len: int = 0, gso_size: int = 0, csum_start: int = 0,
         csum_offset: int = 0) -> bytes:
    return HEADER.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
