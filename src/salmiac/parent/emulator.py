"""Run an EIF in local emulation: QEMU + the parent's servers on Unix sockets standing in for vsock ports.

Boots are retried: under TCG about one boot in eight stalls before the kernel prints anything (DESIGN.md), so a
boot that shows no console output within STALL_SECONDS, or no heartbeat within the boot timeout, is killed and
started again, and the reason is logged with the console's last lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from salmiac.eif.reader import read_eif
from salmiac.errors import RuntimeFailure
from salmiac.parent.nbd_server import Export, serve_unix
from salmiac.parent.netrelay import NetRelay
from salmiac.parent.ports import BulkPort, unix_listener
from salmiac.parent.qemu import QemuConfig, find_qemu, qemu_argv
from salmiac.parent.session import ControlSession, StartParams, serve_heartbeat
from salmiac.protocol.channels import CONTROL_PORT, HEARTBEAT_PORT, NETWORK_PORT

log = logging.getLogger("salmiac.parent")

BOOT_ATTEMPTS = 3
STALL_SECONDS = 45.0  # no console output at all by then: the known TCG stall
BOOT_TIMEOUT = float(os.environ.get("SALMIAC_BOOT_TIMEOUT", "240"))  # QEMU start → heartbeat
SHUTDOWN_TIMEOUT = 30.0  # Exited → QEMU gone


class BootStalled(Exception):
    pass


@dataclass
class EmulatorOptions:
    cpus: int
    memory_mib: int
    debug: bool = False
    console_log: Path | None = None  # where to keep the guest console (default: temp, shown on failure)


PortHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In QEMU's child before exec: SIGKILL it when the parent dies, even by SIGKILL. A QEMU that outlived its
    parent would keep the enclave running with nobody serving its disk or reading its output."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def prepare_boot_files(eif_path: Path, workdir: Path) -> tuple[Path, Path, str]:
    """Kernel, one initrd (the EIF's ramdisks concatenated, as Nitro loads them), cmdline."""
    image = read_eif(eif_path)
    kernel, cmdline, ramdisks = image.extract_boot_parts(workdir)
    initrd = workdir / "initrd.img"
    with open(initrd, "wb") as out:
        for rd in ramdisks:
            with open(rd, "rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            rd.unlink()
    return kernel, initrd, cmdline


class EmulatedEnclave:
    def __init__(self, eif_path: Path, opts: EmulatorOptions, params: StartParams,
                 *, stdout: BinaryIO | None = None, stderr: BinaryIO | None = None,
                 network: NetRelay | None = None, nbd_exports: dict[int, list[Export]] | None = None) -> None:
        self.eif_path = eif_path
        self.network = network
        self.nbd_exports = nbd_exports or {}
        self.opts = opts
        self.params = params
        self.stdout = stdout if stdout is not None else sys.stdout.buffer
        self.stderr = stderr if stderr is not None else sys.stderr.buffer
        self.session: ControlSession | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._pending_signals: list[int] = []
        self.extra_ports: dict[int, PortHandler] = {}
        self._signal_tasks: set[asyncio.Future[None]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, self._on_signal, signum)
        try:
            if self.network is not None:
                # pyroute2 runs its own event loop: not in this thread. Undone in the finally below.
                offer = await asyncio.to_thread(self.network.setup)
                self.params.config["network"] = offer.to_dict()
                log.info("network: %s mode, enclave %s", self.network.mode, offer.ipv4)
            with tempfile.TemporaryDirectory(prefix="salmiac-emu-") as tmp:
                workdir = Path(tmp)
                kernel, initrd, cmdline = prepare_boot_files(self.eif_path, workdir)
                last: Exception | None = None
                for attempt in range(1, BOOT_ATTEMPTS + 1):
                    try:
                        return await self._boot_once(workdir, kernel, initrd, cmdline, attempt)
                    except BootStalled as exc:
                        last = exc
                        log.warning("emulated boot attempt %d/%d failed: %s", attempt, BOOT_ATTEMPTS, exc)
                raise RuntimeFailure(f"the emulated enclave did not boot after {BOOT_ATTEMPTS} attempts: {last}")
        finally:
            if self.network is not None:
                self.network.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        if self.session is not None and self.session.started.is_set():
            task = asyncio.ensure_future(self.session.send_signal(signum))
            self._signal_tasks.add(task)
            task.add_done_callback(self._signal_tasks.discard)
        elif self._proc is not None and self._proc.returncode is None:
            # Still booting: nothing to stop gracefully yet.
            self._pending_signals.append(signum)
            self._proc.kill()

    async def _boot_once(self, workdir: Path, kernel: Path, initrd: Path, cmdline: str, attempt: int) -> int:
        sockdir = workdir / f"boot{attempt}"
        sockdir.mkdir()
        console = self.opts.console_log or (workdir / f"console{attempt}.log")
        console.write_bytes(b"")
        heartbeat_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        control_conn: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_heartbeat(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                await serve_heartbeat(r, w)
                if not heartbeat_done.done():
                    heartbeat_done.set_result(None)
            except (asyncio.IncompleteReadError, ConnectionError, RuntimeFailure) as exc:
                if not heartbeat_done.done():
                    heartbeat_done.set_exception(BootStalled(f"heartbeat failed: {exc}"))

        boot_over = asyncio.Event()

        async def on_control(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if not control_conn.done():
                control_conn.set_result((r, w))
                await boot_over.wait()  # the session owns the streams until this boot is over

        handlers: dict[int, PortHandler] = {HEARTBEAT_PORT: on_heartbeat, CONTROL_PORT: on_control}
        handlers.update(self.extra_ports)
        servers = []
        ports: dict[int, Path] = {}
        for port, handler in handlers.items():
            path = sockdir / f"{port}.sock"
            servers.append(await asyncio.start_unix_server(handler, path=str(path)))
            ports[port] = path
        for port, exports in self.nbd_exports.items():
            path = sockdir / f"{port}.sock"
            servers.append(await serve_unix(path, exports))
            ports[port] = path
        bulk: list[BulkPort] = []
        if self.network is not None:
            path = sockdir / f"{NETWORK_PORT}.sock"
            bulk.append(BulkPort("network", unix_listener(str(path)), self.network.run, self.network.stop))
            ports[NETWORK_PORT] = path
        for bp in bulk:
            bp.start()
        cfg = QemuConfig(
            kernel=kernel, initrd=initrd, cmdline=cmdline, memory_mib=self.opts.memory_mib,
            cpus=self.opts.cpus, ports=ports, console_log=console,
        )
        argv = qemu_argv(cfg, find_qemu())
        log.debug("starting %s", " ".join(argv))
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent,
            # Its own session: Ctrl-C in a terminal signals the whole foreground group, and QEMU must not die
            # of it; we forward the signal to the app and QEMU ends when the enclave powers off (or with us).
            start_new_session=True,
        )
        self._proc = proc
        try:
            await self._wait_boot(proc, heartbeat_done, console)
            reader, writer = await asyncio.wait_for(control_conn, BOOT_TIMEOUT)
            session = ControlSession(reader, writer, self.params, stdout=self.stdout, stderr=self.stderr)
            self.session = session
            run_task = asyncio.ensure_future(session.run())
            exit_task = asyncio.ensure_future(proc.wait())
            await asyncio.wait({run_task, exit_task}, return_when=asyncio.FIRST_COMPLETED)
            if not run_task.done():
                # QEMU ended first: let the session read what is left in the socket, then judge.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(run_task), 5)
            if not run_task.done():
                run_task.cancel()
                stderr = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
                raise RuntimeFailure(
                    f"the emulated enclave stopped without an exit status (QEMU status {proc.returncode})"
                    f"{': ' + stderr.strip() if stderr.strip() else ''}\n{_tail(console)}"
                )
            exited = run_task.result()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(session.drain(), SHUTDOWN_TIMEOUT)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), SHUTDOWN_TIMEOUT)
            if self.opts.debug:
                sys.stderr.write(_tail(console, 200) + "\n")
            return exited.status
        finally:
            boot_over.set()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            for server in servers:
                server.close()
            for bp in bulk:
                await asyncio.to_thread(bp.stop)
            self.session = None
            self._proc = None

    async def _wait_boot(self, proc: asyncio.subprocess.Process, heartbeat: asyncio.Future[None],
                         console: Path) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        exit_task = asyncio.ensure_future(proc.wait())
        try:
            while not heartbeat.done():
                pending: set[asyncio.Future[object]] = {heartbeat, exit_task}  # type: ignore[arg-type]
                await asyncio.wait(pending, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if heartbeat.done():
                    break
                if exit_task.done():
                    if self._pending_signals:
                        raise RuntimeFailure("interrupted while the enclave was booting")
                    stderr = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
                    raise RuntimeFailure(
                        f"QEMU exited with status {proc.returncode} before the enclave was up: "
                        f"{stderr.strip()}\n{_tail(console)}"
                    )
                elapsed = loop.time() - started
                if elapsed > STALL_SECONDS and console.stat().st_size == 0:
                    raise BootStalled(f"no console output after {STALL_SECONDS:.0f}s")
                if elapsed > BOOT_TIMEOUT:
                    raise BootStalled(f"no heartbeat after {BOOT_TIMEOUT:.0f}s; console:\n{_tail(console)}")
            heartbeat.result()
        finally:
            exit_task.cancel()
            if not heartbeat.done():
                heartbeat.cancel()
