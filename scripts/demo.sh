#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine and run meshguard's main demonstration.
# As root: a real mesh of network namespaces (meshguard demo). Otherwise: the simulator.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iproute2 nftables iputils-ping >/dev/null
fi
python3 -m pip install -q -e .

if [ "$(id -u)" -eq 0 ] && python3 -m meshguard demo --help >/dev/null 2>&1; then
    exec python3 -m meshguard demo "$@"
fi
exec python3 -m sim scenarios/smoke-5.yaml --plot
