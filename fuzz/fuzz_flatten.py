"""atheris fuzz target for image.flatten: what a hostile image can put in its layer blobs.

Run (atheris is not a project dependency; install it where you fuzz):
    pip install atheris
    python fuzz/fuzz_flatten.py -max_len=65536 -runs=1000000 [CORPUS_DIR]
A good seed corpus is a few small layer tars (e.g. from `umoci raw add-layer` inputs or tests/unit builders).

The first input byte picks how many layers the rest is cut into (1-3) and how each is wrapped (plain, gzip,
zstd, or raw bytes as given), so whiteouts/opaque dirs/hardlinks that span layers are explored too. The only
exception allowed out of flatten is ImageError; a tree that is not well formed (paths not cleaned, a parent
that is not a directory, a whiteout name left in the tree) or that does not survive write_tar → flatten is a
finding. Limits are small so bombs are cut short instead of timing out.
"""

from __future__ import annotations

import gzip
import io
import sys

import atheris  # type: ignore[import-untyped]  # installed only where fuzzing runs

with atheris.instrument_imports():
    import zstandard

    from salmiac.errors import ImageError
    from salmiac.image.flatten import Limits, flatten
    from salmiac.image.tarout import write_tar
    from salmiac.image.tree import ROOT, Kind, Tree

LIMITS = Limits(
    max_total_bytes=4 << 20,
    max_file_bytes=1 << 20,
    max_entries=2000,
    max_depth=32,
    max_path_bytes=512,
    max_ratio=100,
    ratio_grace_bytes=1 << 18,
)


def _wrap(kind: int, payload: bytes) -> bytes:
    if kind == 1:
        return gzip.compress(payload, mtime=0)
    if kind == 2:
        return zstandard.ZstdCompressor().compress(payload)
    return payload  # 0: plain tar, 3: raw bytes (compressed or not, as the fuzzer wrote them)


def _check(tree: Tree) -> None:
    if tree[ROOT].kind is not Kind.DIR:
        raise AssertionError("root is not a directory")
    for path, entry in tree.entries.items():
        if not path.is_absolute() or ".." in path.parts or "." in path.parts:
            raise AssertionError(f"uncleaned path {path!r}")
        if path.name.startswith(".wh."):
            raise AssertionError(f"whiteout left in tree: {path!r}")
        if path != ROOT and tree[path.parent].kind is not Kind.DIR:
            raise AssertionError(f"parent of {path!r} is not a directory")
        if (entry.data is not None) != (entry.kind is Kind.FILE):
            raise AssertionError(f"data on non-file {path!r}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0], data[1:]
    count = 1 + (mode & 3) % 3
    step = max(1, len(rest) // count)
    parts = [rest[i * step : (i + 1) * step if i < count - 1 else len(rest)] for i in range(count)]
    blobs = [_wrap((mode >> (2 + 2 * i)) & 3, part) for i, part in enumerate(parts)]
    try:
        tree = flatten([(io.BytesIO(b), None) for b in blobs], limits=LIMITS)
    except ImageError:
        return
    try:
        _check(tree)
        out = io.BytesIO()
        write_tar(tree, out)
        again = flatten([(io.BytesIO(out.getvalue()), None)], limits=Limits())
        if set(again.entries) != set(tree.entries):
            raise AssertionError("write_tar → flatten changed the set of paths")
        again.close()
    finally:
        tree.close()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
