#!/usr/bin/env bash
# The main job, end to end: build a real python3 image from Debian packages, convert it into an enclave image
# with salmiac, and run it in local emulation (QEMU), printing what the app prints.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python examples/demo.py "$@"
