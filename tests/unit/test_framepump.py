"""Pure helpers of the frame pump: RFC 1071 checksum, completing offloaded checksums, the uplink's BPF filter
(run by a reference interpreter here, by the kernel in tests/integration/test_netrelay.py); and the pump itself
over a socketpair with a fake device."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from salmiac import framepump
from salmiac.framepump import FdStream, FramePump, complete_checksum, ones_complement_checksum, packet_filter
from salmiac.protocol.frames import LENGTH_SIZE, FrameDecoder, FrameEncoder, encode_raw


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f">{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data: bytes) -> None:
    ours, ref = ones_complement_checksum(data), reference_checksum(data)
    # 0x0000 and 0xFFFF are the same number in one's complement; both verify.
    assert ours == ref or {ours, ref} == {0, 0xFFFF}


def tcp_frame(payload: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2", dport: int = 80) -> bytearray:
    tcp = struct.pack(">HHIIBBHHH", 40000, dport, 1, 0, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return bytearray(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp)


def pseudo_sum(frame: bytearray) -> int:
    ip = frame[14:34]
    l4_len = len(frame) - 34
    pseudo = ip[12:20] + struct.pack(">BBH", 0, 6, l4_len)
    total = int(sum(struct.unpack(">6H", pseudo)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=1460))
def test_complete_partial_tcp_checksum(payload: bytes) -> None:
    frame = tcp_frame(payload)
    # What an offloading sender leaves: the (uncomplemented) pseudo-header sum in the field.
    frame[50:52] = pseudo_sum(frame).to_bytes(2, "big")
    complete_checksum(frame, 14)
    # A receiver verifies: pseudo header + segment sums to 0xFFFF.
    seg = bytes(frame[34:])
    pseudo = bytes(frame[26:34]) + struct.pack(">BBH", 0, 6, len(seg))
    assert reference_checksum(pseudo + seg) == 0


def run_bpf(program: list[tuple[int, int, int, int]], frame: bytes, pkttype: int = 0) -> int:
    """Classic BPF as the kernel runs it (net/core/filter.c), for the opcodes ``packet_filter`` uses. An out
    of bounds load ends the program with 0 (drop), as in the kernel."""
    a = x = pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        try:
            if code == framepump.BPF_LD_B_ABS:
                a = pkttype if k == framepump.SKF_AD_PKTTYPE else frame[k]
            elif code == framepump.BPF_LD_H_ABS:
                if k + 2 > len(frame):
                    return 0
                a = int.from_bytes(frame[k : k + 2], "big")
            elif code == framepump.BPF_LD_H_IND:
                if x + k + 2 > len(frame):
                    return 0
                a = int.from_bytes(frame[x + k : x + k + 2], "big")
            elif code == framepump.BPF_LDX_B_MSH:
                x = (frame[k] & 0x0F) * 4
            elif code == framepump.BPF_JA:
                pc += k
            elif code == framepump.BPF_RET_K:
                return k
            else:
                taken = {framepump.BPF_JEQ_K: a == k, framepump.BPF_JGT_K: a > k, framepump.BPF_JGE_K: a >= k,
                         framepump.BPF_JSET_K: bool(a & k)}[code]
                pc += jt if taken else jf
        except IndexError:
            return 0


def udp6_frame(dport: int, next_header: int = 17) -> bytes:
    ip6 = struct.pack(">IHBB16s16s", 6 << 28, 8, next_header, 64, b"\xfd" + b"\0" * 15, b"\xfd" + b"\0" * 14 + b"\1")
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ip6 + struct.pack(">HHHH", 5353, dport, 8, 0)


@pytest.mark.parametrize(("frame", "pkttype", "passes"), [
    (tcp_frame(b"x", dport=80), 0, True),
    (tcp_frame(b"x", dport=40000), 0, False),  # the parent's own connection
    (tcp_frame(b"x", dport=32768), 0, False),
    (tcp_frame(b"x", dport=49151), 0, False),
    (tcp_frame(b"x", dport=49152), 0, True),  # the enclave's ephemeral range
    (tcp_frame(b"x", dport=80), 1, True),  # broadcast
    (tcp_frame(b"x", dport=80), 2, True),  # multicast
    (tcp_frame(b"x", dport=80), 3, False),  # another host's (promiscuous uplink)
    (tcp_frame(b"x", dport=80), 4, False),  # our own outgoing frame
    (udp6_frame(40000), 0, False),
    (udp6_frame(53), 0, True),
    (udp6_frame(40000, next_header=0), 0, True),  # behind an extension header: not looked into
    (bytes.fromhex("ffffffffffff020000000001" "0806") + bytes(28), 0, True),  # ARP
], ids=["tcp-80", "parent-port", "parent-low", "parent-high", "enclave-port", "broadcast", "multicast",
        "otherhost", "outgoing", "udp6-parent-port", "udp6-53", "ipv6-ext", "arp"])
def test_uplink_filter(frame: bytes, pkttype: int, passes: bool) -> None:
    assert (run_bpf(packet_filter((32768, 49151)), bytes(frame), pkttype) != 0) == passes


def test_uplink_filter_ports_past_ip_options_and_in_fragments() -> None:
    with_options = tcp_frame(b"x", dport=40000)
    with_options[14] = 0x46  # IHL 6: four bytes of options before TCP
    with_options[34:34] = b"\x01\x01\x01\x00"
    program = packet_filter((32768, 49151))
    assert run_bpf(program, bytes(with_options)) == 0, "the port is found past the options"
    later_fragment = tcp_frame(b"x", dport=40000)
    later_fragment[20:22] = b"\x00\x10"  # offset 128 bytes: no TCP header in this one
    assert run_bpf(program, bytes(later_fragment)) != 0
    assert run_bpf(packet_filter(None), bytes(tcp_frame(b"x", dport=40000))) != 0, "no range: only pkttype"
    assert run_bpf(packet_filter(None), bytes(tcp_frame(b"x")), pkttype=4) == 0


class FakePort:
    """A device over a socketpair of SOCK_SEQPACKET: one message is one frame."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)

    def fileno(self) -> int:
        return self.ours.fileno()

    def read_into(self, buf: memoryview, encoder: FrameEncoder) -> int:
        pos = 0
        while pos <= len(buf) - LENGTH_SIZE - 65536:
            try:
                n = self.ours.recv_into(buf[pos + LENGTH_SIZE : pos + LENGTH_SIZE + 65536])
            except BlockingIOError:
                break
            pos = encoder.seal(buf, pos, n)
        return pos

    def write_frames(self, frames: list[bytes]) -> int:
        refused = 0
        for frame in frames:
            if len(frame) > 1000:
                refused += 1  # like a TAP refusing a frame bigger than its MTU
            else:
                self.ours.send(frame)
        return refused

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


@pytest.mark.parametrize("fd_stream", [False, True], ids=["socket", "fd-stream"])
@pytest.mark.parametrize("threads", [True, False], ids=["two-threads", "event-loop"])
def test_pump_both_ways_counts_and_survives_garbage(threads: bool, fd_stream: bool) -> None:
    """``fd_stream``: the stream as the enclave has it in emulation (a virtio-serial port: plain read/write on an
    fd, no socket calls); a socket's fd stands in for the port."""
    port = FakePort()
    near, far = socket.socketpair()
    stream = FdStream(near.fileno()) if fd_stream else near
    pump = FramePump(port, stream, batch_bytes=1 << 17, threads=threads)
    t = threading.Thread(target=pump.run)
    t.start()
    frames = [bytes([i]) * (20 + i) for i in range(50)]
    # stream -> device, with garbage and a frame the device refuses in between
    far.sendall(encode_raw([b"\x01" * 9999, b""]) + FrameEncoder().encode([*frames[:25], b"\x07" * 1200, *frames[25:]]))
    got = [port.theirs.recv(65536) for _ in frames]
    assert got == frames
    # device -> stream
    for f in frames:
        port.theirs.send(f)
    dec = FrameDecoder()
    out: list[bytes] = []
    while len(out) < len(frames):
        dec.receive_data(far.recv(65536))
        out += dec.frames()
    assert out == frames
    far.close()  # end of stream ends the pump (read() gives 0 on a serial port's fd as on a socket)
    t.join(timeout=10)
    assert not t.is_alive()
    assert pump.stats.from_stream.dropped_oversize == 1
    assert pump.stats.from_stream.dropped_empty == 1
    assert pump.stats.device_tx_refused == 1
    assert pump.stats.to_stream.frames == 50
    port.close()
