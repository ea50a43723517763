#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine and run meshguard's main demonstration.
# As root: a real mesh of network namespaces (meshguard demo, see docs/demo.md); arguments are
# passed to it (e.g. --nodes 6 --for 30). Otherwise: the simulator's smallest scenario.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iproute2 nftables iputils-ping >/dev/null
fi
python3 -m pip install -q -e .

if [ "$(id -u)" -eq 0 ]; then
    exec python3 -m meshguard demo "$@"
fi
echo "not root: running the simulator instead (sudo $0 builds a real mesh of namespaces)" >&2
exec python3 -m sim scenarios/smoke-5.yaml --plot
