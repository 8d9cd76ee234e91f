"""What ships in the initramfs as our own code: closed under its own imports, nothing from the host side."""

from __future__ import annotations

import ast

from salmiac.enclave_base.package import enclave_sources

# Third-party packages are not in the enclave base: only the stdlib of Debian's python3.11 is.
HOST_ONLY = ("cbor2", "cryptography", "pyroute2", "rich", "zstandard")


def _imports(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_shipped_modules_import_only_shipped_modules() -> None:
    shipped = {rel[: -len(".py")].replace("/", ".").removesuffix(".__init__") for rel, _ in enclave_sources()}
    packages = {name.rsplit(".", 1)[0] for name in shipped}
    for rel, path in enclave_sources():
        for name in _imports(path.read_text()):
            top = name.split(".")[0]
            assert top not in HOST_ONLY, f"{rel} imports {name}, which the enclave base does not have"
            if top != "salmiac":
                continue
            # "from salmiac.enclave import channel" names a module; "from salmiac.errors import X" a symbol.
            assert name in shipped or name in packages or name.rsplit(".", 1)[0] in shipped, (
                f"{rel} imports {name}, which is not shipped in the initramfs"
            )


def test_the_frame_pump_and_errors_ship() -> None:
    rels = {rel for rel, _ in enclave_sources()}
    assert {"salmiac/framepump.py", "salmiac/errors.py", "salmiac/enclave/network.py"} <= rels
    assert not any(rel.startswith(("salmiac/parent/", "salmiac/image/", "salmiac/eif/")) for rel in rels)
