"""Three network namespaces joined the way salmiac joins them, for tests and the benchmark.

    client netns                parent netns                         enclave netns
    c0 10.77.0.1/24  <--veth-->  p0 10.77.0.2/24 (uplink)             salmiac0 (TAP)
    dnsmasq, servers             salmiac.parent.netrelay  <--Unix-->  salmiac.enclave.network

Only namespaces created here are touched; ``close()`` kills what runs in them (by pid) and deletes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PY = sys.executable
CLIENT_IP = "10.77.0.1"
PARENT_IP = "10.77.0.2"
PREFIX = 24


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def have_netns_tools() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nft", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    return None


class Topology:
    def __init__(
        self,
        workdir: Path,
        mode: str = "transparent",
        publish: Sequence[str] = (),
        mtu: int = 1500,
        client_offloads: bool = False,
        client_csum_offload: bool = False,
        start_enclave: bool = True,
        offload: bool = True,
    ) -> None:
        tag = secrets.token_hex(3)
        self.client, self.parent, self.enclave = (f"salm-{r}-{tag}" for r in ("c", "p", "e"))
        self.dir = workdir
        self.mode = mode
        self.offload = offload
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sock = workdir / "relay.sock"
        self.offer_file = workdir / "offer.json"
        self.relay_stats = workdir / "relay-stats.json"
        self.enclave_stats = workdir / "enclave-stats.json"
        self.root = workdir / "root"
        self.root.mkdir(exist_ok=True)
        self.created: list[str] = []
        try:
            for ns in (self.client, self.parent, self.enclave):
                self.sh("ip", "netns", "add", ns)
                self.created.append(ns)
                self.ns(ns, "ip", "link", "set", "lo", "up")
            self.sh("ip", "link", "add", "c0", "netns", self.client, "type", "veth", "peer", "name", "p0",
                    "netns", self.parent)  # fmt: skip
            self.ns(self.client, "ip", "addr", "add", f"{CLIENT_IP}/{PREFIX}", "dev", "c0")
            self.ns(self.parent, "ip", "addr", "add", f"{PARENT_IP}/{PREFIX}", "dev", "p0")
            for ns, dev in ((self.client, "c0"), (self.parent, "p0")):
                self.ns(ns, "ip", "link", "set", dev, "mtu", str(mtu), "up")
            self.ns(self.parent, "ip", "route", "add", "default", "via", CLIENT_IP)
            if not client_offloads:
                # A real NIC hands the host <= MTU frames with complete checksums; a veth peer with
                # TSO/checksum offload would hand the relay 64 KiB frames with partial checksums.
                tx = "on" if client_csum_offload else "off"
                self.ns(self.client, "ethtool", "-K", "c0", "tx", tx, "tso", "off", "gso", "off")
            (workdir / "etc").mkdir(exist_ok=True)
            (workdir / "etc" / "resolv.conf").write_text(f"nameserver {CLIENT_IP}\nsearch test\n")
            (workdir / "etc" / "hosts").write_text(f"127.0.0.1 localhost\n{CLIENT_IP} client.test\n")
            self.start_relay(publish)
            if start_enclave:
                self.start_enclave()
        except BaseException:
            self.close()
            raise

    # --- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, check=check, capture_output=True, text=True)

    def ns(self, ns: str, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *cmd], check=check, capture_output=True, text=True, timeout=timeout
        )

    def spawn(self, ns: str, *cmd: str, log: str | None = None) -> subprocess.Popen[bytes]:
        out = open(self.dir / log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out, stderr=subprocess.STDOUT)
        if log:
            assert not isinstance(out, int)
            out.close()
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        path = self.dir / name
        return path.read_text(errors="replace") if path.exists() else ""

    # --- the two halves of salmiac ----------------------------------------------------------------------

    def start_relay(self, publish: Sequence[str] = ()) -> None:
        args = ["--mode", self.mode, "--uplink", "p0", "--listen", f"unix:{self.sock}"]
        args += ["--offer-out", str(self.offer_file), "--etc", str(self.dir / "etc"), "--hostname", "encl"]
        args += ["--stats-file", str(self.relay_stats)]
        if not self.offload:
            args.append("--no-offload")
        for p in publish:
            args += ["-p", p]
        self.relay = self.spawn(self.parent, PY, "-m", "salmiac.parent.netrelay", *args, log="relay.log")
        wait_until(lambda: self.offer_file.exists() or self.relay.poll() is not None, what="relay offer")
        if not self.offer_file.exists():
            raise RuntimeError(f"relay failed: {self.log('relay.log')}")
        self.offer: dict[str, Any] = json.loads(self.offer_file.read_text())

    def start_enclave(self) -> None:
        ready = self.dir / "ready.json"
        self.enclave_proc = self.spawn(
            self.enclave, "unshare", "--uts", PY, "-m", "salmiac.enclave.network", "--config", str(self.offer_file),
            "--connect", f"unix:{self.sock}", "--root", str(self.root), "--ready-file", str(ready),
            "--stats-file", str(self.enclave_stats), "--ip", "busybox ip", log="enclave.log",
        )  # fmt: skip
        wait_until(lambda: ready.exists() or self.enclave_proc.poll() is not None, what="enclave network")
        if not ready.exists():
            raise RuntimeError(f"enclave network failed: {self.log('enclave.log')}")
        self.ready = json.loads(ready.read_text())
        # `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc: the enclave's rendered files become real.
        etc = Path("/etc/netns") / self.enclave
        etc.mkdir(parents=True, exist_ok=True)
        for name in ("resolv.conf", "hosts"):
            shutil.copyfile(self.root / "etc" / name, etc / name)

    def stop_relay(self) -> dict[str, Any]:
        self.relay.terminate()
        self.relay.wait(timeout=10)
        return dict(json.loads(self.relay_stats.read_text()))

    # --- teardown ---------------------------------------------------------------------------------------

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for ns in self.created:
            pids = self.sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
        for ns in self.created:
            self.sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(Path("/etc/netns") / self.enclave, ignore_errors=True)
        self.created.clear()
