"""Command line: ``salmiac convert | run | inspect``. The only place that exits or configures logging."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from salmiac import __version__
from salmiac.errors import RequestError, SalmiacError

if TYPE_CHECKING:
    from salmiac.parent.nbd_server import Export
    from salmiac.parent.netrelay import NetworkOptions
    from salmiac.runconfig import RunConfig

log = logging.getLogger("salmiac")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise RequestError(f"usage: {message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="salmiac", description="Run unmodified container images inside AWS Nitro Enclaves.")
    p.add_argument("--version", action="version", version=f"salmiac {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add_tls(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--tls-verify", default="true", choices=["true", "false"],
                        help="verify registry TLS certificates (false also allows plain HTTP), as skopeo")
        sp.add_argument("--ca-file", help="extra CA certificate (PEM) for registries")
        sp.add_argument("--cache-dir", type=Path, help="cache directory (default: $SALMIAC_CACHE_DIR or "
                                                       "~/.cache/salmiac)")

    c = sub.add_parser("convert", help="convert an image into an enclave image (response JSON on stdout)")
    c.add_argument("request", help="conversion request JSON file, or - for standard input")
    c.add_argument("--quiet", action="store_true", help="no progress on stderr")
    c.add_argument("--insecure-dev-key", action="store_true",
                   help="INSECURE: key the persistent disk with a fixed public key (development only; measured)")
    add_tls(c)

    r = sub.add_parser("run", help="run a converted image (on Nitro, or emulated with --emulate)")
    r.add_argument("--emulate", action="store_true", default=os.environ.get("SALMIAC_EMULATE") == "1",
                   help="boot the enclave in QEMU instead of Nitro (also SALMIAC_EMULATE=1)")
    r.add_argument("--bundle", type=Path, help="run an unpacked bundle directory (inside the converted image)")
    r.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="set an app env var")
    r.add_argument("--cpus", type=int, help="enclave vCPUs (default from the image, env CPU_COUNT)")
    r.add_argument("--memory", help="enclave memory, e.g. 4096M (default from the image, env MEM_SIZE)")
    r.add_argument("--debug", action="store_true", help="debug mode: show the enclave console")
    r.add_argument("--console-log", type=Path, help="keep the emulated guest console in this file")
    r.add_argument("--network", choices=["auto", "transparent", "published", "none"], default="auto",
                   help="enclave networking: transparent (the enclave takes the parent's address; auto on Nitro), "
                        "published (NAT, only -p ports inbound; auto in emulation), none (auto without root)")
    r.add_argument("-p", "--publish", action="append", default=[], metavar="HOSTPORT:ENCLAVEPORT[/tcp|/udp]",
                   help="publish an enclave port on the parent, like docker run -p (published mode)")
    r.add_argument("--uplink", help="the parent's interface to relay (default: that of the default route)")
    r.add_argument("--dns", action="append", default=None, metavar="ADDRESS",
                   help="nameserver for the enclave (default: the parent's resolv.conf, loopback ones left out)")
    r.add_argument("--hostname", help="the enclave's hostname (default: the parent's)")
    r.add_argument("--storage-dir", type=Path, default=Path(os.environ.get("SALMIAC_STORAGE_DIR", "/var/lib/salmiac")),
                   help="where the encrypted RW disk file lives (default /var/lib/salmiac, the image's VOLUME)")
    r.add_argument("--insecure-dev-key", action="store_true",
                   help="allow running an image converted with --insecure-dev-key (its disk key is public)")
    add_tls(r)
    r.add_argument("rest", nargs=argparse.REMAINDER, metavar="IMAGE [ARGS...]")

    i = sub.add_parser("inspect", help="describe an EIF (or a converted image's EIF), like `nitro-cli describe-eif`")
    i.add_argument("eif", metavar="EIF|IMAGE", help="an .eif file, or a converted image (oci:DIR:TAG, ...)")
    add_tls(i)
    return p


def _cache_dir(args: argparse.Namespace) -> Path:
    from salmiac.convert import default_cache_dir

    return args.cache_dir or default_cache_dir()


def cmd_convert(args: argparse.Namespace) -> int:
    from salmiac.convert import convert
    from salmiac.progress import Progress
    from salmiac.request import ConversionRequest

    try:
        raw = sys.stdin.buffer.read() if args.request == "-" else Path(args.request).read_bytes()
    except OSError as exc:
        raise RequestError(f"request file {args.request}: {exc.strerror}") from exc
    req = ConversionRequest.from_json(raw)
    if args.insecure_dev_key:
        import dataclasses

        log.warning("INSECURE: --insecure-dev-key: the persistent disk of this image is keyed with a fixed, public "
                    "key; anyone with the disk file can read and change it. Never use it for real data.")
        req = dataclasses.replace(
            req, converter_options=dataclasses.replace(req.converter_options, insecure_dev_key=True))
    with Progress(enabled=not args.quiet) as progress:
        resp = convert(req, cache_dir=_cache_dir(args), progress=progress, tls_verify=args.tls_verify == "true",
                       ca_file=args.ca_file)
    sys.stdout.write(resp.to_json() + "\n")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from salmiac.parent.netrelay import relay_for
    from salmiac.parent.session import StartParams
    from salmiac.runconfig import RUN_CONFIG_NAME, RunConfig, parse_size_mib

    # Every option is checked before the image is fetched or unpacked: a typo should not cost a download.
    for entry in args.env:
        if "=" not in entry or entry.startswith("="):
            raise RequestError(f"-e {entry!r}: expected KEY=VALUE")
    memory_option = parse_size_mib(args.memory, "--memory") if args.memory else None
    network_options = _network_options(args)
    rest: list[str] = list(args.rest)
    if args.bundle is not None:
        bundle = args.bundle
        app_args = rest
    else:
        if not rest:
            raise RequestError("usage: salmiac run [OPTIONS] IMAGE [ARGS...]: IMAGE is missing")
        from salmiac.parent.bundle import extract_bundle

        bundle = extract_bundle(rest[0], _cache_dir(args), tls_verify=args.tls_verify == "true",
                                ca_file=args.ca_file)
        app_args = rest[1:]
    try:
        run_cfg = RunConfig.from_json((bundle / RUN_CONFIG_NAME).read_bytes())
    except OSError as exc:
        raise RequestError(f"{bundle / RUN_CONFIG_NAME}: {exc.strerror}") from exc
    run_cfg = run_cfg.with_env_overrides(os.environ)
    cpus = args.cpus if args.cpus is not None else run_cfg.cpu_count
    memory = memory_option if memory_option is not None else run_cfg.memory_mib
    params = StartParams(args=app_args or None, env=list(args.env))
    nbd_exports = _nbd_exports(bundle, run_cfg, args)
    relay = relay_for(network_options, nitro=not args.emulate)
    if not args.emulate:
        if not os.path.exists("/dev/nitro_enclaves"):
            raise RequestError("this host has no /dev/nitro_enclaves: run on a Nitro Enclaves-enabled instance, "
                               "or add --emulate for local emulation")
        from salmiac.parent.nitro import run_nitro

        return asyncio.run(run_nitro(bundle / run_cfg.eif, cpus=cpus, memory_mib=memory,
                                     debug=args.debug or run_cfg.debug, params=params, network=relay,
                                     nbd_exports=nbd_exports))
    # Imported only here: the EIF reader needs `cryptography`, which the parent runtime in the converted image
    # (Nitro path) does not ship.
    from salmiac.parent.emulator import EmulatedEnclave, EmulatorOptions

    opts = EmulatorOptions(cpus=cpus, memory_mib=memory, debug=args.debug or run_cfg.debug,
                           console_log=args.console_log)
    enclave = EmulatedEnclave(bundle / run_cfg.eif, opts, params, network=relay, nbd_exports=nbd_exports)
    return asyncio.run(enclave.run())


def _nbd_exports(bundle: Path, run_cfg: RunConfig, args: argparse.Namespace) -> dict[int, list[Export]]:
    """The block devices the enclave attaches over NBD: its verity rootfs (read-only) when it has one, and the RW
    disk (a sparse file in --storage-dir, created at RW_STORAGE_SIZE on first use) when it keeps data."""
    from salmiac.parent.nbd_server import Export
    from salmiac.protocol.appconfig import KEY_INSECURE_DEV
    from salmiac.protocol.channels import NBD_DISK_PORT, NBD_ROOTFS_PORT
    from salmiac.runconfig import DEFAULT_RW_STORAGE_MIB

    exports: dict[int, list[Export]] = {}
    if run_cfg.rootfs_image:
        image = bundle / run_cfg.rootfs_image
        if not image.is_file():
            raise RequestError(f"{image}: the bundle's rootfs image is missing")
        exports[NBD_ROOTFS_PORT] = [Export("rootfs", image, read_only=True)]
    if run_cfg.disk:
        if run_cfg.key_provider == KEY_INSECURE_DEV:
            if not args.insecure_dev_key:
                raise RequestError("this image keys its disk with the insecure development key: add "
                                   "--insecure-dev-key to run it anyway")
            log.warning("INSECURE: the enclave's persistent disk uses the public development key: anyone with "
                        "%s can read and change it", args.storage_dir)
        size_mib = run_cfg.rw_storage_mib or DEFAULT_RW_STORAGE_MIB
        try:
            args.storage_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise RequestError(f"--storage-dir {args.storage_dir}: {exc.strerror}") from exc
        disk = args.storage_dir / "disk.img"
        # The server grows the file (sparse) to the size; an existing larger disk keeps its size and data.
        size = max(size_mib << 20, disk.stat().st_size if disk.exists() else 0)
        exports[NBD_DISK_PORT] = [Export("disk", disk, read_only=False, size=size)]
    return exports


def _network_options(args: argparse.Namespace) -> NetworkOptions:
    import ipaddress

    from salmiac.parent.netrelay import NetworkOptions, parse_publish

    dns = None
    if args.dns is not None:
        try:
            dns = tuple(ipaddress.ip_address(a) for a in args.dns)
        except ValueError as exc:
            raise RequestError(f"--dns: {exc}") from None
    return NetworkOptions(mode=args.network, publish=tuple(parse_publish(p) for p in args.publish),
                          uplink=args.uplink, dns=dns, hostname=args.hostname)


def cmd_inspect(args: argparse.Namespace) -> int:
    from salmiac.eif.reader import read_eif
    from salmiac.runconfig import EIF_NAME

    eif = Path(args.eif)
    if not eif.is_file():
        if ":" not in args.eif:
            raise RequestError(f"{args.eif}: no such file (give an EIF, or a converted image such as oci:DIR:TAG)")
        from salmiac.parent.bundle import extract_bundle

        eif = extract_bundle(args.eif, _cache_dir(args), tls_verify=args.tls_verify == "true",
                             ca_file=args.ca_file) / EIF_NAME
    sys.stdout.write(json.dumps(read_eif(eif).describe(), indent=2) + "\n")
    return 0


def _setup_logging(verbosity: int) -> None:
    level_name = os.environ.get("SALMIAC_LOGLEVEL", "").upper()
    level = getattr(logging, level_name, None) if level_name else None
    if not isinstance(level, int):
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("salmiac: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    verbose = 0
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse reports these at the top level; the help that lists the options is the command's
            raise RequestError(f"usage: unrecognized arguments: {' '.join(unknown)} "
                               f"(see `salmiac {args.command} --help`)")
        verbose = args.verbose
        _setup_logging(verbose)
        handler = {"convert": cmd_convert, "run": cmd_run, "inspect": cmd_inspect}[args.command]
        return handler(args)
    except SalmiacError as exc:
        sys.stderr.write(f"salmiac: error: {exc}\n")
        if verbose and exc.diagnostics():
            sys.stderr.write(exc.diagnostics() + "\n")
        if verbose > 1 and exc.__cause__ is not None:
            sys.stderr.write(f"caused by: {exc.__cause__!r}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
