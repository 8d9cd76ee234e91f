from __future__ import annotations

import json
from pathlib import Path

import pytest

from salmiac.enclave import kmod


def _index(root: Path, modules: dict[str, tuple[str, list[str]]], builtin: list[str]) -> None:
    doc = {
        "kernel": "test",
        "modules": {n: {"path": p, "deps": d} for n, (p, d) in modules.items()},
        "builtin": builtin,
    }
    (root / kmod.INDEX_NAME).write_text(json.dumps(doc))


def test_dependencies_load_first_once_and_builtins_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _index(
        tmp_path,
        {
            "dm_verity": ("kernel/md/dm-verity.ko", ["dm_bufio", "dm_mod", "crc16"]),
            "dm_bufio": ("kernel/md/dm-bufio.ko", ["dm_mod"]),
            "dm_mod": ("kernel/md/dm-mod.ko", []),
            "dm_crypt": ("kernel/md/dm-crypt.ko", ["dm_mod"]),
        },
        ["crc16", "ext4"],
    )
    calls: list[str] = []

    def fake_finit(path: str, params: str = "") -> bool:
        calls.append(path)
        return not path.endswith("dm-mod.ko")  # pretend dm_mod was already there (EEXIST)

    monkeypatch.setattr(kmod, "finit_module", fake_finit)
    inserted = kmod.load_modules(["dm-verity", "ext4", "dm_crypt"], root=str(tmp_path))
    rel = [str(Path(c).relative_to(tmp_path)) for c in calls]
    assert rel == ["kernel/md/dm-mod.ko", "kernel/md/dm-bufio.ko", "kernel/md/dm-verity.ko", "kernel/md/dm-crypt.ko"]
    assert inserted == ["dm_bufio", "dm_verity", "dm_crypt"]


def test_unknown_module_and_bad_index(tmp_path: Path) -> None:
    _index(tmp_path, {"a": ("kernel/a.ko", [])}, [])
    with pytest.raises(kmod.ModuleLoadError, match="nope is not in"):
        kmod.load_modules(["nope"], root=str(tmp_path))
    _index(tmp_path, {"a": ("../../etc/a.ko", [])}, [])
    with pytest.raises(kmod.ModuleLoadError, match="leaves the modules directory"):
        kmod.load_modules(["a"], root=str(tmp_path))
    (tmp_path / kmod.INDEX_NAME).write_text('{"modules": []}')
    with pytest.raises(kmod.ModuleLoadError, match="malformed"):
        kmod.load_modules(["a"], root=str(tmp_path))
    with pytest.raises(kmod.ModuleLoadError, match="cannot read"):
        kmod.load_modules(["a"], root=str(tmp_path / "missing"))


def test_dependency_cycle_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _index(tmp_path, {"a": ("a.ko", ["b"]), "b": ("b.ko", ["a"])}, [])
    monkeypatch.setattr(kmod, "finit_module", lambda path, params="": True)
    # a cycle terminates (each module visited once); the index comes from our own build, which refuses cycles
    assert kmod.load_modules(["a"], root=str(tmp_path)) == ["b", "a"]


def test_real_syscall_rejects_a_file_that_is_not_a_module(tmp_path: Path) -> None:
    # Never loads anything: the kernel refuses garbage (ENOEXEC/EINVAL, or EPERM without CAP_SYS_MODULE).
    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"not an ELF module" * 8)
    with pytest.raises(kmod.ModuleLoadError, match=r"loading junk\.ko"):
        kmod.finit_module(str(junk))
