"""Run the app as the enclave's only workload and relay it to the parent.

The init (PID 1) forks the app into a chroot of its rootfs with its own uid/gid, then multiplexes, on one thread:
the app's stdout/stderr pipes (sent as Output messages), the parent's control messages (Signal), and SIGCHLD
(every orphan is reaped, since we are PID 1). When the app exits, the rest of its processes are killed (as
`docker` does when a container's main process ends), its pipes are drained to EOF so that no line written
before exit is lost, and only then is Exited sent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from salmiac.enclave.appspec import ProcessSpec
from salmiac.protocol.control import MAX_OUTPUT_CHUNK, Signal, Stream

CGROUP_ROOT = "/sys/fs/cgroup"
APP_CGROUP = CGROUP_ROOT + "/app"
DRAIN_TIMEOUT = 5.0  # after the app exits, how long its pipes may stay open (held by escaped daemons)


@dataclass(frozen=True, slots=True)
class AppResult:
    status: int  # shell-style: exit code, or 128+N when killed by signal N
    signal: int | None


def _set_nonblocking(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


def _write_cgroup_file(path: str, value: str) -> None:
    # No O_CREAT: on a host where /sys/fs/cgroup is a tmpfs (cgroup v1 or hybrid), open(path, "w") would
    # create a plain file there and the write would "succeed" without any cgroup behind it.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _prepare_cgroup(path: str) -> bool:
    """Create the app's cgroup under a cgroup v2 hierarchy; False when there is none (then killpg is all we have)."""
    if not os.path.exists(os.path.join(os.path.dirname(path), "cgroup.controllers")):
        return False  # not cgroup v2 (a tmpfs, sysfs, or a v1 hierarchy): mkdir would not make a cgroup
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError:
        return False
    return os.path.exists(os.path.join(path, "cgroup.procs"))


def _child_exec(
    spec: ProcessSpec, rootfs: str, cgroup: str | None, stdout_w: int, stderr_w: int, err_w: int
) -> None:
    """Runs in the forked child. Never returns."""
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.setsid()
        if cgroup is not None:
            with contextlib.suppress(OSError):
                _write_cgroup_file(cgroup + "/cgroup.procs", "0")
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdout_w, 1)
        os.dup2(stderr_w, 2)
        os.chroot(rootfs)
        os.chdir(spec.cwd)
        os.setgroups(spec.groups)
        os.setgid(spec.gid)
        os.setuid(spec.uid)
        os.execve(spec.path, spec.argv, spec.env)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(err_w, f"{exc.errno}:{exc.strerror}".encode())
    except BaseException:
        with contextlib.suppress(OSError):
            os.write(err_w, b"0:internal error")
    os._exit(127)


class Supervisor:
    """Owns the app process. ``send_output`` and ``add_reader`` callbacks are the driver's hooks.

    ``cgroup``: the cgroup v2 directory the app and its descendants are put in, so that all of them can be killed
    when the app ends (None: process group only). ``drain_timeout``: how long, after the app exited, pipes held
    open by escaped processes are still read.
    """

    def __init__(
        self,
        spec: ProcessSpec,
        rootfs: str,
        *,
        send_output: Callable[[Stream, bytes], None],
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 10.0,
        cgroup: str | None = APP_CGROUP,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.spec = spec
        self.rootfs = rootfs
        self.send_output = send_output
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.cgroup = cgroup
        self.drain_timeout = drain_timeout
        self._cgroup_ready = False
        self.pid = 0
        self._pipes: dict[int, Stream] = {}
        self._kill_at: float | None = None
        self._result: AppResult | None = None
        self._sel = selectors.DefaultSelector()
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False

    def start(self) -> None:
        """Fork and exec the app; raises OSError with the exec error if it could not start."""
        self._cgroup_ready = self.cgroup is not None and _prepare_cgroup(self.cgroup)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        exec_r, exec_w = os.pipe2(os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        pid = os.fork()
        if pid == 0:
            _child_exec(self.spec, self.rootfs, self.cgroup if self._cgroup_ready else None, out_w, err_w, exec_w)
        self.pid = pid
        for fd in (out_w, err_w, exec_w):
            os.close(fd)
        failure = os.read(exec_r, 4096)  # EOF (b"") means exec succeeded: the pipe was close-on-exec
        os.close(exec_r)
        if failure:
            code, _, message = failure.decode(errors="replace").partition(":")
            self._reap(block=True)
            for fd in (out_r, err_r):
                os.close(fd)
            raise OSError(int(code) if code.isdigit() else errno.EIO, message)
        for fd, stream in ((out_r, Stream.STDOUT), (err_r, Stream.STDERR)):
            _set_nonblocking(fd)
            self._pipes[fd] = stream
            self._sel.register(fd, selectors.EVENT_READ, "pipe")
        self._sel.register(self._wakeup_r, selectors.EVENT_READ, "signal")

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self._sel.register(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fd)

    def deliver(self, msg: Signal) -> None:
        """A signal from the parent. SIGTERM means "stop": the image's STOPSIGNAL, then SIGKILL after a grace."""
        if self._result is not None or not self.pid:
            return
        signum = msg.signum
        if signum == signal.SIGTERM:
            signum = self.stop_signal
            if self._kill_at is None:
                self._kill_at = time.monotonic() + self.stop_timeout
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def _reap(self, *, block: bool = False) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid and self._result is None:
                code = os.waitstatus_to_exitcode(status)
                self._result = AppResult(128 - code, -code) if code < 0 else AppResult(code, None)
                if block:
                    return

    def _read_pipe(self, fd: int) -> None:
        try:
            data = os.read(fd, MAX_OUTPUT_CHUNK)
        except BlockingIOError:
            return
        if data:
            self.send_output(self._pipes[fd], data)
        else:
            self._sel.unregister(fd)
            os.close(fd)
            del self._pipes[fd]

    def _kill_rest(self) -> None:
        """The app's main process is gone: end every process it left behind."""
        if self._cgroup_ready and self.cgroup is not None:
            with contextlib.suppress(OSError):  # cgroup.kill needs Linux 5.14
                _write_cgroup_file(self.cgroup + "/cgroup.kill", "1")
        # Also the process group: if joining the cgroup failed in the child, cgroup.kill found nobody.
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)

    def run(self) -> AppResult:
        """Multiplex until the app has exited and its output is drained."""
        drain_deadline: float | None = None
        while True:
            if self._result is not None and drain_deadline is None:
                self._kill_rest()
                drain_deadline = time.monotonic() + self.drain_timeout
            if drain_deadline is not None and (not self._pipes or time.monotonic() >= drain_deadline):
                break
            timeout = None
            now = time.monotonic()
            if self._kill_at is not None and self._result is None:
                timeout = max(0.0, self._kill_at - now)
            if drain_deadline is not None:
                timeout = max(0.0, drain_deadline - now)
            for key, _ in self._sel.select(timeout):
                if key.data == "pipe":
                    self._read_pipe(key.fd)
                elif key.data == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wakeup_r, 512)
                    self._reap()
                else:
                    key.data()
            self._reap()
            if self._kill_at is not None and self._result is None and time.monotonic() >= self._kill_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self._kill_at = None
        for fd in list(self._pipes):
            self._sel.unregister(fd)
            os.close(fd)
        self._pipes.clear()
        assert self._result is not None  # loop exits only after the app was reaped
        return self._result

    def close(self) -> None:
        """Release the selector and the wakeup pipe; stop signals writing to it (SIGCHLD's handler stays)."""
        if self._closed:  # closing fds twice could close someone else's file that reused the number
            return
        self._closed = True
        # A closed wakeup fd would be written to on every signal, and its number may be reused by another file.
        with contextlib.suppress(ValueError):  # not the main thread: start() could not have set it either
            previous = signal.set_wakeup_fd(-1)
            if previous != self._wakeup_w:
                signal.set_wakeup_fd(previous)
        for fd in list(self._pipes):
            os.close(fd)
        self._pipes.clear()
        self._sel.close()
        for fd in (self._wakeup_r, self._wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)
