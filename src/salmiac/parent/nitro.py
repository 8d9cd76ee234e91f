"""Launch on a real Nitro host with nitro-cli; serve the control channel on vsock.

nitro-cli itself answers the enclave's heartbeat on vsock port 9000 during ``run-enclave``; we listen on the
control port (CID_ANY) before starting the enclave, accept its connection, and run the same ``ControlSession`` as
in emulation. The enclave is terminated when the app has exited or if anything fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
from pathlib import Path

from salmiac.errors import RuntimeFailure
from salmiac.parent.nbd_server import Export, serve_socket
from salmiac.parent.netrelay import NetRelay
from salmiac.parent.ports import BulkPort, vsock_listener
from salmiac.parent.session import ControlSession, StartParams
from salmiac.protocol.channels import CONTROL_PORT, NETWORK_PORT

log = logging.getLogger("salmiac.parent")

CONNECT_TIMEOUT = 300.0  # nitro-cli's own boot timeout is at least 180 s


async def _nitro_cli(*args: str) -> dict[str, object]:
    exe = shutil.which("nitro-cli")
    if exe is None:
        raise RuntimeFailure("nitro-cli not found on PATH: install aws-nitro-enclaves-cli on the parent instance")
    proc = await asyncio.create_subprocess_exec(exe, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeFailure(f"nitro-cli {args[0]} failed: {err.decode(errors='replace').strip()}")
    try:
        result = json.loads(out or b"{}")
    except ValueError:
        return {}
    return result if isinstance(result, dict) else {}


async def run_nitro(eif: Path, *, cpus: int, memory_mib: int, debug: bool, params: StartParams,
                    network: NetRelay | None = None, nbd_exports: dict[int, list[Export]] | None = None) -> int:
    conn: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future()
    )
    finished = asyncio.Event()

    async def on_connect(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if not conn.done():
            conn.set_result((r, w))
            await finished.wait()  # the session owns the streams until the run is over

    servers: list[asyncio.Server] = []
    bulk: list[BulkPort] = []
    argv = ["run-enclave", "--eif-path", str(eif), "--cpu-count", str(cpus), "--memory", str(memory_mib)]
    if debug:
        argv.append("--debug-mode")
    enclave_id = ""
    try:
        # Everything the enclave will connect to listens before it starts; all of it is undone in `finally`.
        for port, exports in (nbd_exports or {}).items():
            servers.append(await serve_socket(vsock_listener(port), exports))
        if network is not None:
            params.config["network"] = (await asyncio.to_thread(network.setup)).to_dict()
            bulk.append(BulkPort("network", vsock_listener(NETWORK_PORT), network.run, network.stop))
        for bp in bulk:
            bp.start()
        servers.append(await asyncio.start_server(on_connect, sock=vsock_listener(CONTROL_PORT)))
        info = await _nitro_cli(*argv)
        enclave_id = str(info.get("EnclaveID", ""))
        log.info("enclave %s started (CID %s)", enclave_id, info.get("EnclaveCID"))
        reader, writer = await asyncio.wait_for(conn, CONNECT_TIMEOUT)
        session = ControlSession(reader, writer, params, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer)
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Future[None]] = set()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            def forward(s: int = signum) -> None:
                task = asyncio.ensure_future(session.send_signal(s))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            loop.add_signal_handler(signum, forward)
        exited = await session.run()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(session.drain(), 30)
        return exited.status
    except TimeoutError:
        raise RuntimeFailure(f"the enclave did not connect to the control port within {CONNECT_TIMEOUT:.0f}s") \
            from None
    finally:
        finished.set()
        for server in servers:
            server.close()
        for bp in bulk:
            await asyncio.to_thread(bp.stop)
        if network is not None:
            network.close()
        if enclave_id:
            with contextlib.suppress(RuntimeFailure):
                await _nitro_cli("terminate-enclave", "--enclave-id", enclave_id)
