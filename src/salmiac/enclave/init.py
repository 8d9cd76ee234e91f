"""The enclave's PID 1: boot, talk to the parent, run the app, shut down.

Sequence (each step's failure is reported to the parent if the control channel is up, then the VM powers off):
 1. mount /dev (devtmpfs: the kernel has no DEVTMPFS_MOUNT), /proc, /sys; stdio on /dev/console
 2. detect the transport (vsock on Nitro, virtio-serial in emulation) and load only the modules it needs
 3. heartbeat (0xB7 on port 9000, as nitro-cli expects), then the control channel: Hello → Start
 4. set the clock from Start, prepare the app rootfs (in the measured initramfs, or a verity image over NBD whose
    root hash is measured), bring up the network
    if the parent offered one (TAP salmiac0, frames over the network port; the offer is validated first)
 5. run the app under the Supervisor; send Exited with its status
 6. sync, unmount, power off
What comes from the parent (Start) is validated in ``protocol.control`` before we see it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import NoReturn

from salmiac import __version__
from salmiac.enclave import channel, storage, sysutil
from salmiac.enclave.appspec import AppSpecError, build_process_spec, resolve_in_root
from salmiac.enclave.supervisor import CGROUP_ROOT, Supervisor
from salmiac.errors import SalmiacError
from salmiac.protocol import control
from salmiac.protocol.appconfig import APP_CONFIG_PATH, AppConfig
from salmiac.protocol.channels import CONTROL_PORT, HEARTBEAT_BYTE, HEARTBEAT_PORT, NETWORK_PORT

DEFAULT_HOSTNAME = "enclave"
# virtio_mmio first: without it no virtio device (and so no transport) is visible. Then only what the
# transport needs; loading modules costs ~50-100 ms each under TCG.
BUS_MODULES = ("virtio_mmio",)
MODULES_BY_TRANSPORT = {
    channel.SERIAL: ("virtio_console", "virtio_rng"),
    channel.VSOCK: ("vmw_vsock_virtio_transport", "nsm"),
}
DEVICE_SETTLE_SECONDS = 10.0
STATUS_SETUP_FAILED = 125  # docker's status when the container could not be started


def console(msg: str) -> None:
    with contextlib.suppress(OSError):
        sys.stderr.write(f"salmiac-init: {msg}\n")
        sys.stderr.flush()


class ParentLink:
    """The control channel, driven synchronously (the supervisor's loop owns timing)."""

    def __init__(self, ch: channel.Channel) -> None:
        self.ch = ch
        self.conn = control.ControlConnection(control.Role.ENCLAVE)
        self._send_lock = threading.Lock()  # the network thread logs too; messages must not interleave

    def send(self, msg: control.Message) -> None:
        with self._send_lock:
            self.ch.write_all(self.conn.send(msg))

    def log(self, level: str, message: str) -> None:
        console(message)
        with contextlib.suppress(OSError, control.ProtocolError):
            self.send(control.Log(level, message[: control.MAX_LOG_BYTES]))

    def next_message(self) -> control.Message | None:
        """Blocking: the next message, or None at EOF."""
        while True:
            event = self.conn.next_event()
            if event is None or isinstance(event, control.Message):
                return event
            self.conn.receive_data(self.ch.read())

    def pump(self) -> tuple[list[control.Message], bool]:
        """Read once (the fd is readable); the complete messages, and whether the channel is finished
        (EOF, or a protocol violation by the parent, which is logged: either way nothing more is read)."""
        out: list[control.Message] = []
        try:
            self.conn.receive_data(self.ch.read())
            while True:
                event = self.conn.next_event()
                if event is None:
                    return out, True
                if not isinstance(event, control.Message):
                    return out, False
                out.append(event)
        except (control.ProtocolError, OSError) as exc:
            console(f"control channel: {exc}")
            return out, True


def early_mounts() -> None:
    for path, fstype, flags in (
        ("/dev", "devtmpfs", sysutil.MS_NOSUID),
        ("/proc", "proc", sysutil.MS_NOSUID | sysutil.MS_NODEV | sysutil.MS_NOEXEC),
        ("/sys", "sysfs", sysutil.MS_NOSUID | sysutil.MS_NODEV | sysutil.MS_NOEXEC),
    ):
        os.makedirs(path, exist_ok=True)
        if not sysutil.mounted(path):
            with contextlib.suppress(OSError):  # devtmpfs may already be there (EBUSY)
                sysutil.mount(fstype, path, fstype, flags)
    with contextlib.suppress(OSError):
        os.makedirs(CGROUP_ROOT, exist_ok=True)
        sysutil.mount("cgroup2", CGROUP_ROOT, "cgroup2", sysutil.MS_NOSUID | sysutil.MS_NODEV)
    with contextlib.suppress(OSError):
        # Non-blocking: the emulated UART drains slowly, and a full console must never stall PID 1 (everything
        # it logs also goes to the parent over the control channel); a message that would block is dropped.
        fd = os.open("/dev/console", os.O_RDWR | os.O_NONBLOCK)
        for target in (0, 1, 2):
            os.dup2(fd, target)
        if fd > 2:
            os.close(fd)


def load_modules(names: tuple[str, ...]) -> None:
    from salmiac.enclave import kmod

    kmod.load_modules(list(names))


def find_transport() -> str:
    """Load the virtio bus, wait for its devices to be probed, and pick the transport they offer."""
    load_modules(BUS_MODULES)
    deadline = time.monotonic() + DEVICE_SETTLE_SECONDS
    while True:
        ids = channel.virtio_device_ids()
        if channel.VIRTIO_ID_CONSOLE in ids or channel.VIRTIO_ID_VSOCK in ids or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    transport = channel.detect_transport(ids)
    load_modules(MODULES_BY_TRANSPORT[transport])
    return transport


def heartbeat(transport: str) -> None:
    ch = channel.connect(HEARTBEAT_PORT, transport)
    try:
        ch.write_all(bytes([HEARTBEAT_BYTE]))
        reply = ch.read(1)
        if reply != bytes([HEARTBEAT_BYTE]):
            raise channel.ChannelError(0, f"bad heartbeat reply {reply!r}")
    finally:
        ch.close()


def prepare_rootfs(root: str) -> list[str]:
    """Kernel filesystems inside the app's root, as a container runtime provides them; returns the mount points."""
    mounts = (
        ("proc", "proc", "proc", sysutil.MS_NOSUID | sysutil.MS_NODEV | sysutil.MS_NOEXEC, None),
        ("sysfs", "sys", "sysfs", sysutil.MS_NOSUID | sysutil.MS_NODEV | sysutil.MS_NOEXEC, None),
        ("devtmpfs", "dev", "devtmpfs", sysutil.MS_NOSUID, None),
        ("devpts", "dev/pts", "devpts", sysutil.MS_NOSUID | sysutil.MS_NOEXEC, "newinstance,ptmxmode=0666"),
        ("shm", "dev/shm", "tmpfs", sysutil.MS_NOSUID | sysutil.MS_NODEV, "mode=1777"),
    )
    mounted: list[str] = []
    for source, rel, fstype, flags, data in mounts:
        target = os.path.join(root, rel)
        if os.path.islink(target):  # never let the image redirect a kernel mount
            os.unlink(target)
        os.makedirs(target, exist_ok=True)
        sysutil.mount(source, target, fstype, flags, data)
        mounted.append(target)
    etc = os.path.join(root, "etc")
    if not os.path.islink(etc):
        os.makedirs(etc, exist_ok=True)
        for name, content in (
            ("hostname", f"{DEFAULT_HOSTNAME}\n"),
            ("hosts", f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                      f"127.0.1.1\t{DEFAULT_HOSTNAME}\n"),
        ):
            path = os.path.join(etc, name)
            if not os.path.lexists(path):
                with open(path, "w") as f:
                    f.write(content)
    return mounted


def start_network(link: ParentLink, start: control.Start, transport: str, root: str) -> str:
    """Bring up the network the parent offered (if any); returns the hostname the app gets."""
    raw = start.config.get("network")
    if raw is None:
        return DEFAULT_HOSTNAME
    from salmiac.enclave import network
    from salmiac.protocol.netconfig import NetworkConfig

    cfg = NetworkConfig.from_dict(raw)  # hostile input: validated before anything is configured
    load_modules(("tun",))
    ch = channel.connect(NETWORK_PORT, transport)
    pump = network.start_network(cfg, ch.stream(), Path(root))

    def pump_frames() -> None:
        try:
            pump.run()
        except OSError as exc:
            link.log("warning", f"network: the frame stream ended: {exc}")

    threading.Thread(target=pump_frames, name="network", daemon=True).start()
    link.log("info", f"network: {network.ENCLAVE_IFNAME} {cfg.ipv4} mtu {cfg.mtu} gateway {cfg.gateway}")
    return cfg.hostname


def run_app(link: ParentLink, start: control.Start, app: AppConfig, transport: str) -> control.Exited:
    """Storage up (rootfs, disk, volumes), the app run, storage closed cleanly before the exit is reported.
    ``AppConfig.from_json`` has refused rootfs types this init does not know."""
    store = storage.prepare_root(app, transport, link.log)
    try:
        return _run_in_root(link, start, app, transport, store)
    finally:
        store.close()


def _run_in_root(link: ParentLink, start: control.Start, app: AppConfig, transport: str,
                 store: storage.Storage) -> control.Exited:
    root = store.root
    args, runtime_env = start.args, start.env
    if not app.allow_cmdline_args and (args is not None or runtime_env):
        link.log("warning", "run-time arguments and environment ignored: the image was converted with "
                            "allow_cmdline_args=false")
        args, runtime_env = None, []
    store.mounts.extend(prepare_rootfs(root))
    hostname = start_network(link, start, transport, root)
    spec = build_process_spec(
        root,
        entrypoint=app.entrypoint,
        cmd=app.cmd,
        image_env=app.env,
        working_dir=app.working_dir,
        user=app.user,
        args=args,
        runtime_env=runtime_env,
        hostname=hostname,
    )
    workdir = resolve_in_root(root, spec.cwd)  # symlinks in the image resolve inside its root, never out
    if not os.path.isdir(workdir):
        os.makedirs(workdir, exist_ok=True)
    sup = Supervisor(
        spec,
        root,
        send_output=lambda stream, data: link.send(control.Output(int(stream), data)),
        stop_signal=app.stop_signal,
        stop_timeout=app.stop_timeout,
    )
    try:
        sup.start()
    except OSError as exc:
        status = 127 if exc.errno == 2 else 126
        raise AppSpecError(f"exec {spec.argv[0]}: {exc.strerror}", status) from exc

    def on_control() -> None:
        messages, finished = link.pump()
        for msg in messages:
            if isinstance(msg, control.Signal):
                sup.deliver(msg)
        if finished:
            # The parent went away or broke the protocol: nobody can receive the app's output or status,
            # so stop the app as `docker stop` would.
            sup.remove_reader(link.ch.fileno())
            sup.deliver(control.Signal(15))

    sup.add_reader(link.ch.fileno(), on_control)
    try:
        result = sup.run()
    finally:
        sup.remove_reader(link.ch.fileno())
        sup.close()
    return control.Exited(result.status, result.signal)


def boot() -> ParentLink | None:
    early_mounts()
    transport = find_transport()
    with contextlib.suppress(OSError):
        socket.sethostname(DEFAULT_HOSTNAME)
    heartbeat(transport)
    link = ParentLink(channel.connect(CONTROL_PORT, transport))
    link.send(control.Hello(control.PROTOCOL_VERSION, __version__))
    try:
        msg = link.next_message()
        if not isinstance(msg, control.Start):
            raise control.RemoteProtocolError("the parent closed the channel before Start")
        time.clock_settime_ns(time.CLOCK_REALTIME, msg.time_ns)
        with open("/" + APP_CONFIG_PATH, "rb") as f:
            app = AppConfig.from_json(f.read())
        exited = run_app(link, msg, app, transport)
    except AppSpecError as exc:
        link.log("error", str(exc))
        exited = control.Exited(exc.status)
    except SalmiacError as exc:  # e.g. a network offer the enclave refuses, a TAP that cannot be set up
        link.log("error", str(exc))
        exited = control.Exited(STATUS_SETUP_FAILED)
    except Exception as exc:
        link.log("error", f"enclave init failed: {type(exc).__name__}: {exc}")
        console(traceback.format_exc())
        exited = control.Exited(STATUS_SETUP_FAILED)
    with contextlib.suppress(OSError, control.ProtocolError):
        link.send(exited)
    return link


def shutdown(link: ParentLink | None) -> NoReturn:
    os.sync()
    if link is not None:
        with contextlib.suppress(OSError):
            link.ch.close()
    transport_is_serial = os.path.isdir(channel.VIRTIO_PORTS_SYSFS)
    while True:
        with contextlib.suppress(OSError):
            # In the emulator, power-off ends QEMU; on Nitro the hypervisor ends the enclave on reboot, as AWS's
            # own init does.
            sysutil.reboot(sysutil.RB_POWER_OFF if transport_is_serial else sysutil.RB_AUTOBOOT)
        time.sleep(1)


def main() -> NoReturn:
    link: ParentLink | None = None
    try:
        link = boot()
    except BaseException:
        console(traceback.format_exc())
    shutdown(link)


if __name__ == "__main__":
    main()
