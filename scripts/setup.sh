#!/usr/bin/env bash
# Set up a Debian 12 machine for salmiac: system packages (QEMU and tools from bookworm-backports where needed)
# and a Python virtual environment in .venv with salmiac and its test tools. Idempotent; run as root (or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (sudo $0)" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/salmiac-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
apt-get update -q

# QEMU 10 from backports (microvm with ACPI virtio-mmio discovery); the rest from bookworm.
apt-get install -y -q --no-install-recommends -t bookworm-backports qemu-system-x86
apt-get install -y -q --no-install-recommends \
    ca-certificates curl cpio xz-utils zstd gzip openssl iproute2 nftables ethtool iputils-ping util-linux \
    python3 python3-venv \
    skopeo umoci docker-registry apache2-utils \
    cryptsetup-bin e2fsprogs erofs-utils squashfs-tools squashfs-tools-ng \
    nbdkit libnbd-bin qemu-utils \
    busybox-static iperf3 redis-server redis-tools nginx-light dnsmasq-base sqlite3

# Services we start ourselves in tests must not be running from their packages' units.
for svc in redis-server nginx docker-registry; do
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
done

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup.sh: ready. Demo: bash scripts/demo.sh   Tests: bash scripts/test.sh"
