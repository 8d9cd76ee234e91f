"""enclave.appspec: docker's USER/ENV/CMD/PATH semantics, resolved inside a rootfs directory and never on the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from salmiac.enclave.appspec import (
    DEFAULT_PATH,
    AppSpecError,
    ProcessSpec,
    build_process_spec,
    find_executable,
    merge_env,
    resolve_in_root,
    resolve_user,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment line
app:x:1000:1000:App User:/home/app:/bin/sh
nohome:x:1001:1001:::/bin/sh
broken:x:abc:1:bad uid:/:/bin/sh
short:x:7
"""
GROUP = """\
root:x:0:
wheel:x:10:root
daemon:x:1:
app:x:1000:
staff:x:50:app,other
audio:x:29:app
video:x:44:other
brokengroup:x:zz:app
"""


def write(path: Path, content: str = "", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "rootfs"
    write(r / "etc/passwd", PASSWD)
    write(r / "etc/group", GROUP)
    # usr-merge: /bin and /sbin are symlinks (one relative, one absolute) into /usr
    write(r / "usr/bin/tool", "#!/bin/sh\n", 0o755)
    write(r / "usr/bin/busybox", "", 0o755)
    write(r / "usr/sbin/admin", "", 0o755)
    write(r / "usr/bin/notexec", "", 0o644)
    (r / "usr/bin/adir").mkdir()
    (r / "bin").symlink_to("usr/bin")
    (r / "sbin").symlink_to("/usr/sbin")
    (r / "usr/bin/sh").symlink_to("busybox")
    write(r / "app/run.sh", "", 0o755)
    write(r / "app/bin/x", "", 0o700)
    write(r / "app/data", "", 0o600)
    return r


# --- USER ----------------------------------------------------------------------------------------------------

USERS = [
    # user, uid, gid, supplementary groups, home
    ("", 0, 0, [0, 10], "/root"),
    ("root", 0, 0, [0, 10], "/root"),
    ("0", 0, 0, [0, 10], "/root"),
    ("app", 1000, 1000, [1000, 50, 29], "/home/app"),
    ("1000", 1000, 1000, [1000, 50, 29], "/home/app"),
    ("1000:50", 1000, 50, [50], "/home/app"),
    ("app:staff", 1000, 50, [50], "/home/app"),
    ("app:44", 1000, 44, [44], "/home/app"),
    ("daemon", 1, 1, [1], "/usr/sbin"),
    ("5000", 5000, 0, [0], "/"),  # numeric uid absent from passwd: gid 0, HOME /
    ("5000:5000", 5000, 5000, [5000], "/"),
    ("5000:video", 5000, 44, [44], "/"),
    ("nohome", 1001, 1001, [1001], "/"),
]


@pytest.mark.parametrize(("user", "uid", "gid", "groups", "home"), USERS, ids=[u[0] or "default" for u in USERS])
def test_resolve_user(root: Path, user: str, uid: int, gid: int, groups: list[int], home: str) -> None:
    assert resolve_user(str(root), user) == (uid, gid, groups, home)


@pytest.mark.parametrize(
    ("user", "match"),
    [
        ("nobody", "unable to find user nobody"),
        ("app:nogroup", "unable to find group nogroup"),
        ("broken", "unable to find user broken"),  # its uid field is not a number: the entry is skipped
        ("short", "unable to find user short"),
        ("app:brokengroup", "unable to find group brokengroup"),
        ("\u00b2", "unable to find user"),  # a superscript digit is not a uid
        ("\u0661", "unable to find user"),  # ARABIC-INDIC DIGIT ONE neither
        ("4294967295", "out of range"),
        ("1:4294967295", "out of range"),
    ],
)
def test_resolve_user_errors(root: Path, user: str, match: str) -> None:
    with pytest.raises(AppSpecError, match=match) as info:
        resolve_user(str(root), user)
    assert info.value.status == 125


def test_resolve_user_without_passwd(tmp_path: Path) -> None:
    assert resolve_user(str(tmp_path), "") == (0, 0, [0], "/")
    assert resolve_user(str(tmp_path), "33:33") == (33, 33, [33], "/")
    with pytest.raises(AppSpecError):
        resolve_user(str(tmp_path), "www-data")


def test_passwd_is_read_inside_the_root_through_symlinks(tmp_path: Path) -> None:
    r = tmp_path / "r"
    write(r / "real/etc/passwd", "svc:x:77:78::/srv:/bin/sh\n")
    write(r / "real/etc/group", "extra:x:90:svc\n")
    (r / "etc").symlink_to("/real/etc")  # absolute: must mean <root>/real/etc, not the host's /real/etc
    assert resolve_user(str(r), "svc") == (77, 78, [78, 90], "/srv")


# --- env -----------------------------------------------------------------------------------------------------


def test_merge_env_later_layers_win_and_malformed_entries_are_dropped() -> None:
    assert merge_env(["A=1", "B=2", "NOEQ", "=x"], ["A=3", "C=x=y", "D="]) == {
        "A": "3",
        "B": "2",
        "C": "x=y",
        "D": "",
    }


def spec(root: Path, **overrides: object) -> ProcessSpec:
    kwargs: dict[str, object] = {
        "entrypoint": [],
        "cmd": ["tool"],
        "image_env": [],
        "working_dir": "/",
        "user": "",
        "args": None,
        "runtime_env": [],
        "hostname": "enclave",
    }
    kwargs.update(overrides)
    return build_process_spec(str(root), **kwargs)  # type: ignore[arg-type]


def test_env_defaults(root: Path) -> None:
    s = spec(root, user="app")
    assert s.env == {"PATH": DEFAULT_PATH, "HOSTNAME": "enclave", "HOME": "/home/app"}
    assert (s.uid, s.gid, s.groups) == (1000, 1000, [1000, 50, 29])


def test_env_merge_image_then_runtime(root: Path) -> None:
    s = spec(
        root,
        image_env=["PATH=/usr/bin", "A=image", "B=image", "HOME=/data"],
        runtime_env=["A=run", "C=run", "HOSTNAME=custom"],
    )
    assert s.env == {"PATH": "/usr/bin", "A": "run", "B": "image", "C": "run", "HOME": "/data", "HOSTNAME": "custom"}


def test_runtime_path_is_the_one_searched(root: Path) -> None:
    # The image has no `admin` in its PATH; the run-time PATH adds /sbin (an absolute symlink to /usr/sbin).
    with pytest.raises(AppSpecError) as info:
        spec(root, cmd=["admin"], image_env=["PATH=/bin"])
    assert info.value.status == 127
    s = spec(root, cmd=["admin"], image_env=["PATH=/bin"], runtime_env=["PATH=/bin:/sbin"])
    assert s.path == "/sbin/admin"


# --- argv ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entrypoint", "cmd", "args", "argv"),
    [
        (["tool"], ["--default"], None, ["tool", "--default"]),
        (["tool"], ["--default"], ["--x", "y"], ["tool", "--x", "y"]),  # ARGS replace CMD, not ENTRYPOINT
        (["tool"], ["--default"], [], ["tool"]),
        ([], ["tool", "a"], None, ["tool", "a"]),
        ([], ["sh"], ["tool", "b"], ["tool", "b"]),
        (["tool", "-e"], [], None, ["tool", "-e"]),
    ],
)
def test_argv(root: Path, entrypoint: list[str], cmd: list[str], args: list[str] | None, argv: list[str]) -> None:
    s = spec(root, entrypoint=entrypoint, cmd=cmd, args=args)
    assert s.argv == argv
    assert s.path == "/usr/bin/tool"  # DEFAULT_PATH has /usr/bin before /bin


@pytest.mark.parametrize(("entrypoint", "cmd", "args"), [([], [], None), ([], ["tool"], [])])
def test_no_command(root: Path, entrypoint: list[str], cmd: list[str], args: list[str] | None) -> None:
    with pytest.raises(AppSpecError, match="no command") as info:
        spec(root, entrypoint=entrypoint, cmd=cmd, args=args)
    assert info.value.status == 125


@pytest.mark.parametrize(
    ("working_dir", "cwd"),
    [("/", "/"), ("", "/"), ("/app", "/app"), ("/app/", "/app"), ("//app", "/app"), ("/app/./bin", "/app/bin")],
)
def test_cwd_is_clean_and_absolute(root: Path, working_dir: str, cwd: str) -> None:
    assert spec(root, working_dir=working_dir).cwd == cwd


# --- executable search ---------------------------------------------------------------------------------------

FOUND = [
    # name, PATH, WORKDIR, in-root path
    ("tool", "/bin", "/", "/bin/tool"),  # through the relative usr-merge symlink
    ("tool", "/usr/bin:/bin", "/", "/usr/bin/tool"),
    ("admin", "/sbin", "/", "/sbin/admin"),  # through the absolute symlink, resolved inside the root
    ("sh", "/bin", "/", "/bin/sh"),  # the program itself is a symlink (busybox applet)
    ("tool", "/nonexistent:/usr/bin/notexec:/bin", "/", "/bin/tool"),
    ("x", "/usr/bin:/app/bin", "/", "/app/bin/x"),
    ("run.sh", ":/nothing", "/app", "/app/run.sh"),  # an empty PATH entry is the working directory
    ("x", "bin", "/app", "/app/bin/x"),  # a relative PATH entry is relative to the working directory
    ("./run.sh", "/bin", "/app", "/app/run.sh"),  # has a slash: against WORKDIR, no PATH search
    ("bin/x", "/bin", "/app", "/app/bin/x"),
    ("/usr/bin/tool", "", "/app", "/usr/bin/tool"),
    ("/bin/../bin/tool", "", "/", "/bin/../bin/tool"),  # ".." is left to the kernel, not folded lexically
]


@pytest.mark.parametrize(("name", "path_env", "cwd", "found"), FOUND)
def test_find_executable(root: Path, name: str, path_env: str, cwd: str, found: str) -> None:
    assert find_executable(str(root), name, cwd, path_env) == found


NOT_FOUND = [
    # name, PATH, WORKDIR, status
    ("missing", DEFAULT_PATH, "/", 127),
    ("notexec", "/usr/bin", "/", 127),  # PATH search skips what it cannot run, as execvp does
    ("adir", "/usr/bin", "/", 127),  # and directories
    ("/usr/bin/missing", DEFAULT_PATH, "/", 127),
    ("./missing", DEFAULT_PATH, "/app", 127),
    ("/usr/bin/notexec", DEFAULT_PATH, "/", 126),
    ("./data", DEFAULT_PATH, "/app", 126),
    ("/usr/bin/adir", DEFAULT_PATH, "/", 126),
    ("/app", DEFAULT_PATH, "/", 126),
    ("/bin", DEFAULT_PATH, "/", 126),  # a symlink to a directory
    ("/usr/bin/tool/x", DEFAULT_PATH, "/", 127),  # a file used as a directory
]


@pytest.mark.parametrize(("name", "path_env", "cwd", "status"), NOT_FOUND)
def test_find_executable_failures(root: Path, name: str, path_env: str, cwd: str, status: int) -> None:
    with pytest.raises(AppSpecError) as info:
        find_executable(str(root), name, cwd, path_env)
    assert info.value.status == status


def test_never_resolves_on_the_host(root: Path) -> None:
    # /usr/bin/env and /usr/lib/os-release exist on the host but not inside the root.
    assert os.path.exists("/usr/bin/env") and os.path.exists("/usr/lib/os-release")
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/hostsh").symlink_to("/usr/bin/env")  # absolute target: inside the root it is missing
    (root / "usr/local/bin/escape").symlink_to("../../../../../../../../../../usr/bin/env")
    (root / "opt").symlink_to("/usr/bin/../../usr/lib")
    for name in ("hostsh", "escape", "env"):
        with pytest.raises(AppSpecError) as info:
            find_executable(str(root), name, "/", "/usr/local/bin:/usr/bin")
        assert info.value.status == 127
    for path in ("/usr/local/bin/hostsh", "/usr/local/bin/escape", "/opt/os-release", "/usr/bin/env"):
        with pytest.raises(AppSpecError) as info:
            find_executable(str(root), path, "/", DEFAULT_PATH)
        assert info.value.status == 127
    # ".." at the root stays at the root; the result is always under it.
    assert resolve_in_root(str(root), "/../../etc/passwd") == str(root / "etc/passwd")
    assert resolve_in_root(str(root), "/usr/local/bin/escape") == str(root / "usr/bin/env")
    assert resolve_in_root(str(root), "/opt/os-release") == str(root / "usr/lib/os-release")


def test_symlink_loop(root: Path) -> None:
    (root / "loop").symlink_to("loop")
    (root / "a").symlink_to("b")
    (root / "b").symlink_to("/a")
    for name in ("/loop", "/a/x"):
        with pytest.raises(AppSpecError, match="too many levels") as info:
            find_executable(str(root), name, "/", DEFAULT_PATH)
        assert info.value.status == 127


def test_dotdot_after_a_symlink_follows_the_kernel(root: Path) -> None:
    # /sbin -> /usr/sbin, so /sbin/../bin is /usr/bin (the kernel's answer), not /bin (the lexical one).
    (root / "usr/bin/only-in-usr-bin").write_text("")
    (root / "usr/bin/only-in-usr-bin").chmod(0o755)
    assert resolve_in_root(str(root), "/sbin/../bin/only-in-usr-bin") == str(root / "usr/bin/only-in-usr-bin")


def test_host_path_is_ignored(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/sbin:/sbin")  # the init's own PATH must not matter
    assert spec(root, cmd=["tool"], image_env=["PATH=/bin"]).path == "/bin/tool"


def test_full_spec(root: Path) -> None:
    s = spec(
        root,
        entrypoint=["./run.sh"],
        cmd=["serve"],
        image_env=["MODE=prod"],
        working_dir="/app",
        user="app:audio",
        args=["debug"],
        runtime_env=["MODE=dev"],
        hostname="h1",
    )
    assert s == ProcessSpec(
        path="/app/run.sh",
        argv=["./run.sh", "debug"],
        env={"MODE": "dev", "PATH": DEFAULT_PATH, "HOSTNAME": "h1", "HOME": "/home/app"},
        cwd="/app",
        uid=1000,
        gid=29,
        groups=[29],
    )
