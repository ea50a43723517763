#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine and run meshguard's whole test suite (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    iproute2 nftables conntrack iperf3 iputils-ping wireguard-go wireguard-tools coturn dnsmasq-base \
    gcc >/dev/null
python3 -m pip install -q --upgrade pip
python3 -m pip install -q -e '.[test]'

echo "== ruff";  python3 -m ruff check meshguard sim tests bench scripts
echo "== mypy";  python3 -m mypy meshguard sim
echo "== sansio import rule"; python3 scripts/check_sansio_imports.py
echo "== pytest"; python3 -m pytest "$@"
