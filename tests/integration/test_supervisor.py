"""enclave.supervisor for real: busybox in a chroot, forked and supervised by this (root) test process.

The supervisor installs a SIGCHLD handler and a signal wakeup fd in the process that runs it (in the enclave that
is PID 1); the ``supervised`` fixture restores both after each test. Cgroup-dependent behaviour runs twice: with
a throwaway cgroup v2 directory (when this host has a writable cgroup2 mount; removed afterwards) and without
any cgroup (process-group kill only).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from salmiac.enclave.appspec import ProcessSpec, build_process_spec
from salmiac.enclave.supervisor import AppResult, Supervisor
from salmiac.protocol.control import Signal, Stream

BUSYBOX = "/bin/busybox"  # Debian's busybox-static: no shared libraries needed inside the chroot
APPLETS = ("sh", "echo", "id", "sleep", "kill", "cat", "printf", "seq", "setsid", "pwd", "true", "env", "rm", "[")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="chroot and setuid need root"),
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static (apt-get install busybox-static)"),
]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rootfs")
    root.chmod(0o755)  # mktemp makes it 0700: the app's uid must be able to enter its own root
    (root / "bin").mkdir()
    # busybox sh opens /dev/null for background jobs; in the enclave the init mounts devtmpfs there.
    (root / "dev").mkdir()
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (root / "dev/null").chmod(0o666)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1234:5678:app:/home/app:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\napp:x:5678:\nextra:x:99:app\n")
    (root / "work").mkdir()
    (root / "notexec").write_text("")
    return root


def cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    return None


@contextlib.contextmanager
def throwaway_cgroup() -> Iterator[str]:
    mount = cgroup2_mount()
    if mount is None or not os.access(os.path.join(mount, "cgroup.procs"), os.W_OK):
        pytest.skip("no writable cgroup v2 mount on this host")
    path = os.path.join(mount, f"salmiac-test-{uuid.uuid4().hex[:12]}")
    try:
        os.mkdir(path)  # the supervisor accepts an existing directory; this probes that we may create one
    except OSError as exc:
        pytest.skip(f"cannot create a cgroup under {mount}: {exc.strerror}")
    try:
        yield path
    finally:
        if os.path.isdir(path):
            assert wait_cgroup_empty(path), f"{path} still has processes"
            os.rmdir(path)


@pytest.fixture(params=["cgroup", "no-cgroup"])
def cgroup(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "no-cgroup":
        yield None
        return
    with throwaway_cgroup() as path:
        yield path


@pytest.fixture
def v2_cgroup() -> Iterator[str]:
    with throwaway_cgroup() as path:
        yield path


def wait_cgroup_empty(path: str, timeout: float = 10.0) -> bool:
    """Killed processes leave a cgroup asynchronously; cgroup.events signals POLLPRI when "populated" changes."""
    deadline = time.monotonic() + timeout
    fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            if b"populated 0" in os.pread(fd, 4096, 0):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
    finally:
        os.close(fd)


class Run:
    """One supervised app, with its output collected per stream."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.out: dict[Stream, bytearray] = {Stream.STDOUT: bytearray(), Stream.STDERR: bytearray()}
        self.on_output: Callable[[Run], None] = lambda _: None

    def collect(self, stream: Stream, data: bytes) -> None:
        self.out[stream] += data
        self.on_output(self)

    @property
    def stdout(self) -> bytes:
        return bytes(self.out[Stream.STDOUT])

    @property
    def stderr(self) -> bytes:
        return bytes(self.out[Stream.STDERR])


MakeRun = Callable[..., Run]


@pytest.fixture
def supervised(rootfs: Path) -> Iterator[MakeRun]:
    """Build supervisors; afterwards put SIGCHLD and the wakeup fd back and reap anything left."""
    previous_chld = signal.getsignal(signal.SIGCHLD)
    runs: list[Run] = []

    def make(script: str, *, user: str = "", env: list[str] | None = None, workdir: str = "/", **kw: object) -> Run:
        kw.setdefault("cgroup", None)  # never the default /sys/fs/cgroup/app of the enclave on a test host
        spec = build_process_spec(
            str(rootfs),
            entrypoint=["/bin/sh", "-c"],
            cmd=[script],
            image_env=env or [],
            working_dir=workdir,
            user=user,
            args=None,
            runtime_env=[],
            hostname="enclave",
        )
        run = Run(Supervisor(spec, str(rootfs), send_output=lambda s, d: run.collect(s, d), **kw))  # type: ignore[arg-type]
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.sup.close()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, previous_chld if previous_chld is not None else signal.SIG_DFL)
    for run in runs:
        # Only a pid that is still our unreaped child may be killed: a reaped one may belong to anyone now.
        with contextlib.suppress(ChildProcessError):
            if run.sup.pid and os.waitpid(run.sup.pid, os.WNOHANG) == (0, 0):
                os.kill(run.sup.pid, signal.SIGKILL)
                os.waitpid(run.sup.pid, 0)


def run_app(run: Run) -> tuple[AppResult, float]:
    started = time.monotonic()
    run.sup.start()
    result = run.sup.run()
    return result, time.monotonic() - started


def chroot_sh(rootfs: Path, script: str) -> subprocess.CompletedProcess[bytes]:
    """The oracle: the same script under the same busybox sh, run by chroot(8)."""
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert chroot is not None, "chroot(8) from coreutils"
    return subprocess.run(
        [chroot, str(rootfs), "/bin/sh", "-c", script],
        capture_output=True,
        env={"PATH": "/bin"},
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )


def is_gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for whoever inherited it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """Wait for a process that is not our child to end (a pidfd turns readable when it does)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


OUTPUT_SCRIPT = """
echo out1
echo err1 >&2
printf 'no newline'
echo err2 >&2
seq 1 30000
printf 'tail\\n' >&2
exit 3
"""


def test_output_and_status_match_sh(rootfs: Path, supervised: MakeRun) -> None:
    expected = chroot_sh(rootfs, OUTPUT_SCRIPT)
    assert expected.returncode == 3 and len(expected.stdout) > 64 * 1024  # several Output chunks
    run = supervised(OUTPUT_SCRIPT, cgroup=None)
    result, _ = run_app(run)
    assert result == AppResult(3, None)
    assert run.stdout == expected.stdout
    assert run.stderr == expected.stderr


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_code_passed_through(supervised: MakeRun, code: int) -> None:
    result, _ = run_app(supervised(f"exit {code}", cgroup=None))
    assert result == AppResult(code, None)


@pytest.mark.parametrize(("sig", "name"), [(9, "KILL"), (10, "USR1"), (15, "TERM"), (2, "INT")])
def test_killed_by_signal(supervised: MakeRun, sig: int, name: str) -> None:
    result, _ = run_app(supervised(f"kill -{name} $$; sleep 5", cgroup=None))
    assert result == AppResult(128 + sig, sig)


def deliver_when_ready(signum: int) -> Callable[[Run], None]:
    sent = False

    def hook(run: Run) -> None:
        nonlocal sent
        if not sent and b"ready\n" in run.stdout:
            sent = True
            run.sup.deliver(Signal(signum))

    return hook


WAITING = "echo ready; while true; do sleep 0.05; done"


def test_sigterm_uses_the_stop_signal(supervised: MakeRun) -> None:
    run = supervised(f"trap 'echo got-int; exit 7' INT; {WAITING}", stop_signal=signal.SIGINT, cgroup=None)
    run.on_output = deliver_when_ready(15)
    result, _ = run_app(run)
    assert result == AppResult(7, None)
    assert run.stdout == b"ready\ngot-int\n"


def test_sigterm_default_stop_signal(supervised: MakeRun) -> None:
    run = supervised(WAITING, cgroup=None)
    run.on_output = deliver_when_ready(15)
    result, _ = run_app(run)
    assert result == AppResult(143, 15)


def test_sigkill_after_stop_timeout_when_term_is_trapped(supervised: MakeRun) -> None:
    run = supervised(f"trap 'echo ignored' TERM; {WAITING}", stop_timeout=1.0, cgroup=None)
    run.on_output = deliver_when_ready(15)
    result, elapsed = run_app(run)
    assert result == AppResult(137, 9)
    assert b"ignored" in run.stdout  # TERM did arrive, and was ignored
    assert 1.0 <= elapsed < 10


def test_other_signals_are_forwarded_as_is(supervised: MakeRun) -> None:
    run = supervised(f"trap 'echo usr1; exit 5' USR1; {WAITING}", stop_signal=signal.SIGINT, cgroup=None)
    run.on_output = deliver_when_ready(10)
    result, _ = run_app(run)
    assert result == AppResult(5, None)
    assert run.stdout == b"ready\nusr1\n"


def test_control_reader_callback(supervised: MakeRun) -> None:
    """The driver's control channel: a readable fd whose callback delivers the parent's Signal."""
    run = supervised(WAITING, cgroup=None)
    r, w = os.pipe()
    try:

        def on_control() -> None:
            if os.read(r, 1) == b"\x0f":
                run.sup.deliver(Signal(15))

        run.sup.start()
        run.sup.add_reader(r, on_control)
        os.write(w, b"\x0f")
        assert run.sup.run() == AppResult(143, 15)
        run.sup.remove_reader(r)
    finally:
        os.close(r)
        os.close(w)


def background(command: str) -> str:
    """A script whose background job surely runs (it says so, holding stdout) before the app exits."""
    return f"""
(echo bg-started; : > /work/ready.$$; exec {command}) &
bg=$!
until [ -e /work/ready.$$ ]; do sleep 0.01; done
rm /work/ready.$$
echo $bg
"""


def kill_if_alive(pid: int) -> None:
    """A failed test must not leave its `sleep 1000` behind (and must not kill whoever reused the pid)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = f.read() == b"sleep\x001000\x00"
        if ours:  # checked after pidfd_open, so the pidfd is that process
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
    finally:
        os.close(fd)


def background_pid(run: Run) -> int:
    started, pid = run.stdout.decode().split()
    assert started == "bg-started"
    return int(pid)


def test_background_child_holding_the_pipe_does_not_hang(supervised: MakeRun, cgroup: str | None) -> None:
    run = supervised(background("sleep 1000"), cgroup=cgroup, drain_timeout=30)
    result, elapsed = run_app(run)
    pid = background_pid(run)
    try:
        assert result == AppResult(0, None), run.stderr
        assert elapsed < 10  # killed with the app's process group (or cgroup), not waited for
        assert wait_gone(pid)
    finally:
        kill_if_alive(pid)


def test_escaped_daemon(supervised: MakeRun, cgroup: str | None) -> None:
    """A child in its own session escapes killpg; only the cgroup gets it, else the drain times out."""
    # With a cgroup the drain timeout is long and must not be reached; without one it must be.
    drain_timeout = 30.0 if cgroup is not None else 1.0
    run = supervised(background("setsid sleep 1000"), cgroup=cgroup, drain_timeout=drain_timeout)
    result, elapsed = run_app(run)
    pid = background_pid(run)
    try:
        assert result == AppResult(0, None)
        if cgroup is not None:
            assert elapsed < 10
            assert wait_gone(pid)
        else:
            assert 1.0 <= elapsed < 10
            assert not is_gone(pid)
    finally:
        kill_if_alive(pid)


def test_cgroup_is_used_and_emptied(supervised: MakeRun, v2_cgroup: str) -> None:
    cgroup = v2_cgroup
    run = supervised("sleep 1000 & sleep 1000", cgroup=cgroup)
    run.sup.start()
    # /proc is not mounted in the test rootfs: look at the app from the host side.
    with open(f"/proc/{run.sup.pid}/cgroup") as f:
        assert "0::/" + os.path.basename(cgroup) + "\n" in f.read()
    run.sup.deliver(Signal(15))
    assert run.sup.run() == AppResult(143, 15)
    assert wait_cgroup_empty(cgroup)  # the background sleep went with it


def test_not_a_cgroup_filesystem_creates_nothing_and_still_kills(
    supervised: MakeRun, tmp_path: Path
) -> None:
    """Where /sys/fs/cgroup is a tmpfs (cgroup v1 hosts), the supervisor must not fake a cgroup with plain files."""
    fake_root = tmp_path / "cgroupfs"
    fake_root.mkdir()
    (fake_root / "cgroup.controllers").write_text("")  # even a stray file that looks like a v2 root
    app_cgroup = fake_root / "app"
    run = supervised(background("sleep 1000"), cgroup=str(app_cgroup), drain_timeout=30)
    result, elapsed = run_app(run)
    pid = background_pid(run)
    try:
        assert result == AppResult(0, None)
        assert elapsed < 10
        assert wait_gone(pid)
    finally:
        kill_if_alive(pid)
    assert not (app_cgroup / "cgroup.procs").exists()
    assert not (app_cgroup / "cgroup.kill").exists()


def test_uid_gid_groups_env_and_cwd(supervised: MakeRun) -> None:
    run = supervised(
        'id -u; id -g; id -G; pwd; echo "$GREETING $HOME $HOSTNAME"', user="app", env=["GREETING=hi"], workdir="/work"
    )
    result, _ = run_app(run)
    assert result == AppResult(0, None), run.stderr
    uid, gid, groups, cwd, env = run.stdout.decode().splitlines()
    assert (uid, gid) == ("1234", "5678")
    assert sorted(groups.split()) == ["5678", "99"]
    assert cwd == "/work"
    assert env == "hi /home/app enclave"


def test_stdin_is_dev_null(supervised: MakeRun) -> None:
    result, elapsed = run_app(supervised("cat; echo done", cgroup=None))
    assert result == AppResult(0, None)
    assert elapsed < 10


def spec_for(rootfs: Path, path: str, cwd: str = "/") -> ProcessSpec:
    return ProcessSpec(path=path, argv=[path], env={}, cwd=cwd, uid=0, gid=0, groups=[0])


@pytest.mark.parametrize(
    ("path", "cwd", "err"),
    [
        ("/missing", "/", errno.ENOENT),
        ("/notexec", "/", errno.EACCES),
        ("/bin", "/", errno.EACCES),
        ("/bin/sh", "/no-such-dir", errno.ENOENT),
    ],
)
def test_exec_failure_raises_oserror(rootfs: Path, path: str, cwd: str, err: int) -> None:
    previous_chld = signal.getsignal(signal.SIGCHLD)
    sup = Supervisor(spec_for(rootfs, path, cwd), str(rootfs), send_output=lambda s, d: None, cgroup=None)
    try:
        with pytest.raises(OSError) as info:
            sup.start()
        assert info.value.errno == err
        with pytest.raises(ChildProcessError):  # the failed child was reaped, no zombie left
            os.waitpid(sup.pid, os.WNOHANG)
    finally:
        sup.close()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, previous_chld if previous_chld is not None else signal.SIG_DFL)


def test_close_detaches_the_wakeup_fd(supervised: MakeRun) -> None:
    run = supervised("true", cgroup=None)
    run_app(run)
    run.sup.close()
    assert signal.set_wakeup_fd(-1) == -1  # close() already detached it
