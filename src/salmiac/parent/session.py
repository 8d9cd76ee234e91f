"""Parent side of the control channel: hand the enclave its runtime parameters, relay its output and status.

The enclave is not trusted by the parent either: every message is decoded and bounded by ``protocol.control``;
output is written as bytes, never interpreted; the exit status is range-checked there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from salmiac.errors import RuntimeFailure
from salmiac.protocol import control
from salmiac.protocol.channels import HEARTBEAT_BYTE

log = logging.getLogger("salmiac.parent")

READ_CHUNK = 256 * 1024


@dataclass
class StartParams:
    args: list[str] | None = None
    env: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    clock: Callable[[], int] = time.time_ns


async def serve_heartbeat(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo the enclave's ready byte, as nitro-cli does on vsock port 9000."""
    data = await reader.readexactly(1)
    if data[0] != HEARTBEAT_BYTE:
        raise RuntimeFailure(f"enclave sent heartbeat byte {data[0]:#04x}, expected {HEARTBEAT_BYTE:#04x}")
    writer.write(data)
    await writer.drain()


class ControlSession:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        params: StartParams,
        *,
        stdout: BinaryIO,
        stderr: BinaryIO,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._params = params
        self._stdout = stdout
        self._stderr = stderr
        self._conn = control.ControlConnection(control.Role.PARENT)
        self.exited: control.Exited | None = None
        self.started = asyncio.Event()
        self.failure_logs: list[str] = []

    def _send(self, msg: control.Message) -> None:
        self._writer.write(self._conn.send(msg))

    async def send_signal(self, signum: int) -> None:
        if self._conn.state in (control.State.RUNNING, control.State.EXITED) and signum in control.ALLOWED_SIGNALS:
            self._send(control.Signal(signum))
            await self._writer.drain()

    def _handle(self, msg: control.Message) -> None:
        match msg:
            case control.Hello():
                log.debug("enclave init %s (protocol %d) is up", msg.init_version, msg.version)
                p = self._params
                self._send(control.Start(time_ns=p.clock(), args=p.args, env=list(p.env), config=p.config))
                self.started.set()
            case control.Output(stream=stream, data=data):
                out = self._stdout if stream == control.Stream.STDOUT else self._stderr
                out.write(data)
                out.flush()
            case control.Log(level=level, message=message):
                if level == "error":
                    self.failure_logs.append(message)
                log.log(logging.getLevelName(level.upper()), "enclave: %s", message)
            case control.Exited():
                self.exited = msg

    async def run(self) -> control.Exited:
        """Until the enclave reports Exited; raises RuntimeFailure if the channel closes first."""
        await self._pump(until_exited=True)
        if self.exited is None:
            raise RuntimeFailure("the enclave closed its control channel without reporting an exit status")
        return self.exited

    async def drain(self) -> None:
        """After Exited: relay the init's shutdown logs until the channel closes."""
        await self._pump(until_exited=False)

    async def _pump(self, *, until_exited: bool) -> None:
        while not (until_exited and self.exited is not None):
            try:
                event = self._conn.next_event()
            except control.RemoteProtocolError as exc:
                raise RuntimeFailure(f"enclave broke the control protocol: {exc}") from exc
            try:
                if isinstance(event, control.Message):
                    self._handle(event)
                    await self._writer.drain()
                    continue
                if event is None:
                    break
                data = await self._reader.read(READ_CHUNK)
            except ConnectionError:
                data = b""  # QEMU (or the enclave) went away: the same as end of stream, judged by the caller
            self._conn.receive_data(data)
