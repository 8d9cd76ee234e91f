"""Enclave networking: TAP ``salmiac0`` configured from the parent's (validated) offer, frames to the stream.

A bare Nitro enclave has no NIC. We give it a TAP device whose frames travel, length-prefixed
(``protocol.frames``), over one stream to the parent, which relays them to its own network. The offer
arrives as a dict on the control channel; ``NetworkConfig.from_dict`` has validated it before anything
here runs.

Order matters: the TAP exists and is configured (lo up, MAC, MTU, address, link up, routes) before the
pump starts, so the first frames the app sends already carry the right MAC and source address.

pyroute2: only ``pyroute2.iproute.linux.IPRoute`` is used (link/addr/route over rtnetlink). Importing it
still runs ``pyroute2/__init__`` which loads ~160 of its modules (~0.1 s on a host, more under TCG), so the
initramfs needs the whole ``pyroute2`` package unless ``enclave_base`` prunes that ``__init__``.
The import is deferred to ``configure_interface`` so that merely importing this module is cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

from salmiac.errors import RuntimeFailure, SalmiacError
from salmiac.framepump import FramePump, TapPort, open_tap
from salmiac.protocol.frames import ETH_HEADER, VLAN_TAG
from salmiac.protocol.netconfig import NetworkConfig

ENCLAVE_IFNAME = "salmiac0"
PROC_SYS = Path("/proc/sys")


class NetworkSetupError(RuntimeFailure):
    """The enclave could not bring its network up."""


def create_tap(ifname: str = ENCLAVE_IFNAME) -> int:
    try:
        return open_tap(ifname)
    except OSError as exc:
        raise NetworkSetupError(f"create TAP {ifname}: {exc.strerror} (is the tun module loaded?)") from exc


def _sysctl(path: str, value: str) -> None:
    target = PROC_SYS / path
    try:
        target.write_text(value + "\n")
    except OSError as exc:
        raise NetworkSetupError(f"sysctl {path}={value}: {exc.strerror}") from exc


def configure_interface(cfg: NetworkConfig, ifname: str = ENCLAVE_IFNAME) -> None:
    """lo up; ``ifname``: MAC, MTU, addresses, up; default route via the gateway, then the extra routes."""
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if cfg.ipv6 is None:
        # The enclave may carry the parent's MAC: its automatic link-local address would collide with
        # the parent's (DAD failure, noise on the wire). Without an IPv6 offer, IPv6 stays off.
        _sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")
    if cfg.local_port_range is not None:
        _sysctl("net/ipv4/ip_local_port_range", f"{cfg.local_port_range[0]} {cfg.local_port_range[1]}")
    step = "open rtnetlink"
    try:
        with IPRoute() as ipr:
            step = "lo up"
            (lo,) = ipr.link_lookup(ifname="lo")
            ipr.link("set", index=lo, state="up")
            step = f"find {ifname}"
            found = ipr.link_lookup(ifname=ifname)
            if not found:
                raise NetworkSetupError(f"network: interface {ifname} does not exist")
            idx = found[0]
            step = f"{ifname} mac {cfg.mac} mtu {cfg.mtu}"
            ipr.link("set", index=idx, address=cfg.mac, mtu=cfg.mtu)
            step = f"{ifname} address {cfg.ipv4}"
            ipr.addr(
                "add",
                index=idx,
                address=str(cfg.ipv4.ip),
                prefixlen=cfg.ipv4.network.prefixlen,
                broadcast=str(cfg.ipv4.network.broadcast_address),
            )
            if cfg.ipv6 is not None:
                step = f"{ifname} address {cfg.ipv6}"
                ipr.addr(
                    "add",
                    index=idx,
                    family=socket.AF_INET6,
                    address=str(cfg.ipv6.ip),
                    prefixlen=cfg.ipv6.network.prefixlen,
                )
            step = f"{ifname} up"
            ipr.link("set", index=idx, state="up")
            if cfg.gateway is not None:
                step = f"default route via {cfg.gateway}"
                ipr.route("add", dst="0.0.0.0/0", gateway=str(cfg.gateway), oif=idx)
            if cfg.gateway6 is not None:
                step = f"default route via {cfg.gateway6}"
                ipr.route("add", family=socket.AF_INET6, dst="::/0", gateway=str(cfg.gateway6), oif=idx)
            for r in cfg.routes:
                step = f"route {r.destination} via {r.via}"
                family = socket.AF_INET if r.destination.version == 4 else socket.AF_INET6
                ipr.route("add", family=family, dst=str(r.destination), gateway=str(r.via), oif=idx)
    except NetlinkError as exc:
        raise NetworkSetupError(f"network: {step}: {os.strerror(exc.code)}") from exc
    except OSError as exc:
        raise NetworkSetupError(f"network: {step}: {exc}") from exc


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


def apply_config(cfg: NetworkConfig, root: Path, *, ifname: str = ENCLAVE_IFNAME, set_hostname: bool = True) -> None:
    configure_interface(cfg, ifname)
    write_name_files(cfg, root)
    if set_hostname:
        try:
            socket.sethostname(cfg.hostname)
        except OSError as exc:
            raise NetworkSetupError(f"network: sethostname {cfg.hostname}: {exc.strerror}") from exc


def start_network(
    cfg: NetworkConfig, stream: socket.socket, root: Path, *, ifname: str = ENCLAVE_IFNAME, set_hostname: bool = True
) -> FramePump:
    """Create and configure the TAP, then return a pump (call ``run()`` in a thread; ``stop()`` to end)."""
    fd = create_tap(ifname)
    try:
        apply_config(cfg, root, ifname=ifname, set_hostname=set_hostname)
    except BaseException:
        os.close(fd)
        raise
    max_frame = cfg.mtu + ETH_HEADER + VLAN_TAG
    return FramePump(TapPort(fd, max_frame), stream, max_frame=max_frame)


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
    p.add_argument("--ready-file", type=Path, help="written once the interface is up")
    p.add_argument("--stats-file", type=Path, help="counters written here as JSON at exit")
    args = p.parse_args(argv)
    try:
        cfg = NetworkConfig.from_dict(json.loads(args.config.read_text()))
        stream = connect_stream(args.connect)
        pump = start_network(cfg, stream, args.root, ifname=args.ifname, set_hostname=not args.no_hostname)
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
