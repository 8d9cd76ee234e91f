"""Enclave networking: TAP ``salmiac0`` configured from the parent's (validated) offer, frames to the stream.

A bare Nitro enclave has no NIC. We give it a TAP device whose frames travel, length-prefixed
(``protocol.frames``), over one stream to the parent, which relays them to its own network. The offer
arrives as a dict on the control channel; ``NetworkConfig.from_dict`` has validated it before anything
here runs.

Order matters: the TAP exists and is configured (lo up, MAC, MTU, address, link up, routes) before the
pump starts, so the first frames the app sends already carry the right MAC and source address.

Netlink: the ``ip`` command (in the enclave, busybox's applet; on a host, iproute2's), not a Python netlink
library. pyroute2 0.9 imports ~160 modules and with them sqlite3, asyncio, ssl, ctypes and unittest (0.2 s of
CPU on a host, seconds under TCG, and stdlib parts the enclave base prunes); five ``ip`` invocations of a
static busybox cost a few milliseconds each and nothing in the initramfs. Every argument was validated by
``NetworkConfig.from_dict`` and is passed as its own argv element (no shell). The parent side, which runs
on an ordinary host, uses pyroute2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from salmiac.enclave.sysutil import run_tool
from salmiac.errors import RuntimeFailure, SalmiacError
from salmiac.framepump import FramePump, Stream, TapPort, open_tap
from salmiac.protocol.frames import ETH_HEADER, VLAN_TAG
from salmiac.protocol.netconfig import NetworkConfig

ENCLAVE_IFNAME = "salmiac0"
PROC_SYS = Path("/proc/sys")


class NetworkSetupError(RuntimeFailure):
    """The enclave could not bring its network up."""


def create_tap(ifname: str = ENCLAVE_IFNAME, *, vnet_hdr: bool = False, udp_segments: bool = False) -> int:
    try:
        return open_tap(ifname, vnet_hdr=vnet_hdr, udp_segments=udp_segments)
    except OSError as exc:
        raise NetworkSetupError(f"create TAP {ifname}: {exc.strerror} (is the tun module loaded?)") from exc


def _sysctl(path: str, value: str) -> None:
    target = PROC_SYS / path
    try:
        target.write_text(value + "\n")
    except OSError as exc:
        raise NetworkSetupError(f"sysctl {path}={value}: {exc.strerror}") from exc


IP_SEARCH_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # PID 1 starts with no PATH


def find_ip_command() -> tuple[str, ...]:
    path = shutil.which("ip", path=IP_SEARCH_PATH)
    if path is None:
        raise NetworkSetupError("network: no `ip` command (busybox or iproute2) in " + IP_SEARCH_PATH)
    return (path,)


def _ip(ip_cmd: Sequence[str], *args: str) -> None:
    run_tool([*ip_cmd, *args], f"network: ip {' '.join(args)}", NetworkSetupError, env=None, timeout=30)


def configure_interface(cfg: NetworkConfig, ifname: str = ENCLAVE_IFNAME, ip_cmd: Sequence[str] | None = None) -> None:
    """lo up; ``ifname``: MAC, MTU, addresses, up; default route via the gateway, then the extra routes."""
    ip = tuple(ip_cmd) if ip_cmd is not None else find_ip_command()
    if cfg.ipv6 is None:
        # The enclave may carry the parent's MAC: its automatic link-local address would collide with
        # the parent's (DAD failure, noise on the wire). Without an IPv6 offer, IPv6 stays off.
        _sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")
    if cfg.local_port_range is not None:
        _sysctl("net/ipv4/ip_local_port_range", f"{cfg.local_port_range[0]} {cfg.local_port_range[1]}")
    _ip(ip, "link", "set", "dev", "lo", "up")
    _ip(ip, "link", "set", "dev", ifname, "address", cfg.mac, "mtu", str(cfg.mtu))
    _ip(ip, "addr", "add", str(cfg.ipv4), "broadcast", str(cfg.ipv4.network.broadcast_address), "dev", ifname)
    if cfg.ipv6 is not None:
        _ip(ip, "-6", "addr", "add", str(cfg.ipv6), "dev", ifname)
    _ip(ip, "link", "set", "dev", ifname, "up")
    if cfg.gateway is not None:
        _ip(ip, "route", "add", "default", "via", str(cfg.gateway), "dev", ifname)
    if cfg.gateway6 is not None:
        _ip(ip, "-6", "route", "add", "default", "via", str(cfg.gateway6), "dev", ifname)
    for r in cfg.routes:
        family = "-4" if r.destination.version == 4 else "-6"
        _ip(ip, family, "route", "add", str(r.destination), "via", str(r.via), "dev", ifname)


def write_name_files(cfg: NetworkConfig, root: Path) -> None:
    """/etc/resolv.conf, /etc/hosts, /etc/hostname under ``root`` (the app's root, before it starts).

    Written through a temporary file and rename, replacing whatever the image shipped (a symlink there
    is replaced, never followed).
    """
    etc = root / "etc"
    try:
        etc.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name, text in (
            ("resolv.conf", cfg.render_resolv_conf()),
            ("hosts", cfg.render_hosts()),
            ("hostname", cfg.render_hostname()),
        ):
            tmp = etc / f".{name}.salmiac-tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, etc / name)
    except OSError as exc:
        raise NetworkSetupError(f"network: write {etc}: {exc.strerror}") from exc


def apply_config(
    cfg: NetworkConfig,
    root: Path,
    *,
    ifname: str = ENCLAVE_IFNAME,
    set_hostname: bool = True,
    ip_cmd: Sequence[str] | None = None,
) -> None:
    configure_interface(cfg, ifname, ip_cmd)
    write_name_files(cfg, root)
    if set_hostname:
        try:
            socket.sethostname(cfg.hostname)
        except OSError as exc:
            raise NetworkSetupError(f"network: sethostname {cfg.hostname}: {exc.strerror}") from exc


def start_network(
    cfg: NetworkConfig,
    stream: Stream,
    root: Path,
    *,
    ifname: str = ENCLAVE_IFNAME,
    set_hostname: bool = True,
    ip_cmd: Sequence[str] | None = None,
) -> FramePump:
    """Create and configure the TAP, then return a pump (call ``run()`` in a thread; ``stop()`` to end).

    ``stream``: a connected socket (vsock on Nitro) or an ``FdStream`` (a virtio-serial port in emulation).
    """
    fd = create_tap(ifname, vnet_hdr=cfg.vnet_hdr, udp_segments=cfg.udp_segments)
    try:
        apply_config(cfg, root, ifname=ifname, set_hostname=set_hostname, ip_cmd=ip_cmd)
    except BaseException:
        os.close(fd)
        raise
    port = TapPort(fd, cfg.mtu + ETH_HEADER + VLAN_TAG, vnet_hdr=cfg.vnet_hdr)
    return FramePump(port, stream, max_frame=port.max_record)


def connect_stream(address: str) -> socket.socket:
    """``unix:PATH``, ``tcp:HOST:PORT`` or ``vsock:CID:PORT``."""
    kind, _, rest = address.partition(":")
    try:
        if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(rest)
        elif kind == "tcp":
            host, _, port = rest.rpartition(":")
            s = socket.create_connection((host, int(port)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif kind == "vsock":
            cid, _, port = rest.partition(":")
            s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            s.connect((int(cid), int(port)))
        else:
            raise ValueError(kind)
    except (OSError, ValueError) as exc:
        raise NetworkSetupError(f"network: connect to parent at {address}: {exc}") from exc
    return s


def main(argv: list[str] | None = None) -> int:
    """Development/test entry point: ``python -m salmiac.enclave.network --config OFFER.json --connect ADDR``.

    The real enclave init receives the offer on the control channel and calls ``start_network``.
    """
    p = argparse.ArgumentParser(prog="salmiac.enclave.network")
    p.add_argument("--config", required=True, type=Path, help="JSON file holding the parent's offer")
    p.add_argument("--connect", required=True, help="unix:PATH | tcp:HOST:PORT | vsock:CID:PORT")
    p.add_argument("--root", type=Path, default=Path("/"), help="where etc/resolv.conf etc. are written")
    p.add_argument("--ifname", default=ENCLAVE_IFNAME)
    p.add_argument("--no-hostname", action="store_true", help="do not call sethostname")
    p.add_argument("--ip", default=None, help="the ip command, e.g. 'busybox ip' (default: ip on the PATH)")
    p.add_argument("--ready-file", type=Path, help="written once the interface is up")
    p.add_argument("--stats-file", type=Path, help="counters written here as JSON at exit")
    args = p.parse_args(argv)
    try:
        cfg = NetworkConfig.from_dict(json.loads(args.config.read_text()))
        stream = connect_stream(args.connect)
        pump = start_network(cfg, stream, args.root, ifname=args.ifname, set_hostname=not args.no_hostname,
                             ip_cmd=args.ip.split() if args.ip else None)
        if args.ready_file:
            args.ready_file.write_text(json.dumps({"hostname": socket.gethostname()}))
        try:
            pump.run()
        finally:
            if args.stats_file:
                args.stats_file.write_text(json.dumps(pump.stats.as_dict(pump.port)))
    except SalmiacError as exc:
        print(f"salmiac: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
