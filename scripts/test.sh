#!/usr/bin/env bash
# The test command (README, CI): lint, type-check, then every test, end-to-end QEMU boots included.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not e2e"`, `-k control`).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench fuzz
.venv/bin/mypy
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests: that is a failure" >&2
fi
exit "$status"
