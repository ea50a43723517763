"""Route MTU clamping for relayed members, against the real kernel in a namespace (root).

The clamp is driven exactly as the daemon drives it, by a PathChanged path, inside a
namespace with a real TUN and an underlay link; the kernel's own answers (``ip route get``
and a don't-fragment ping) show whether an oversize packet would reach the tunnel.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from meshguard.drivers.path_mtu import RELAY_OVERHEAD, relayed_tunnel_mtu
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.sansio.codec import OVERHEAD
from tests.netns import Lab, Namespace

MEMBER = bytes(range(32))
RELAY = bytes(range(1, 33))

_DRIVE = """
import sys
from meshguard.drivers.path_mtu import RelayRouteMtu
from meshguard.sansio.traversal import PathInfo, PathKind
member, relay = bytes(range(32)), bytes(range(1, 33))
clamp = RelayRouteMtu("mgt0", 1420)
for step in sys.argv[1:]:
    kind, host = step.split("@")
    via = relay if kind == "RELAYED" else None
    clamp.on_path(member, PathInfo(PathKind[kind], (host, 51820), via, None))
print(clamp.clamped.get(member, 0))
"""


def test_relay_overhead_is_two_sealed_envelope_legs() -> None:
    envelope_body = 34  # docs/wire-protocol.md: type, 32-byte peer, payload length
    assert RELAY_OVERHEAD == 2 * (OVERHEAD + envelope_body) == 156
    assert relayed_tunnel_mtu(1500, ipv6_underlay=False) == 1280  # 1284, padded to 16
    assert relayed_tunnel_mtu(1500, ipv6_underlay=True) == 1264
    assert relayed_tunnel_mtu(1400, ipv6_underlay=False) == 1184


@pytest.fixture
def host() -> Iterator[Namespace]:
    with Lab(prefix="mgm") as lab:
        ns = lab.namespace("host")
        ns.run(["ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1"])
        ns.run(["ip", "link", "set", "wan1", "up"])
        ns.run(["ip", "link", "set", "wan0", "mtu", "1500", "up"])
        ns.run(["ip", "addr", "add", "198.51.100.2/24", "dev", "wan0"])
        ns.run(["ip", "-6", "addr", "add", "2001:db8::2/64", "dev", "wan0", "nodad"])
        ns.run(["ip", "route", "add", "203.0.113.0/24", "dev", "wan0", "mtu", "1400"])
        ns.run(["ip", "tuntap", "add", "mode", "tun", "name", "mgt0"])
        ns.run(["ip", "link", "set", "mgt0", "mtu", "1420", "up"])
        ns.run(["ip", "addr", "add", "10.99.0.1/16", "dev", "mgt0"])
        ns.run(["ip", "-6", "addr", "add", "fd99:6d67::1/64", "dev", "mgt0", "nodad"])
        yield ns


def _drive(ns: Namespace, *steps: str) -> int:
    return int(ns.run([sys.executable, "-c", _DRIVE, *steps]).stdout)


def _route_mtu(ns: Namespace, address: object) -> str:
    family = "-6" if ":" in str(address) else "-4"
    return ns.run(["ip", family, "route", "get", str(address)]).stdout


def _oversize_refused(ns: Namespace, address: object, size: int) -> bool:
    """Whether the kernel refuses a don't-fragment datagram of ``size`` bytes to ``address``."""
    proc = ns.run(
        ["ping", "-M", "do", "-c", "1", "-W", "1", "-s", str(size - 28), str(address)],
        check=False,
    )
    return "message too long" in (proc.stdout + proc.stderr).lower()


@pytest.mark.root
def test_relayed_member_gets_a_route_mtu_that_fits_and_loses_it_when_direct(
    host: Namespace,
) -> None:
    v4, v6 = mesh_ipv4(MEMBER), mesh_ipv6(MEMBER)
    fitting = 1280
    assert not _oversize_refused(host, v4, 1400)

    assert _drive(host, "RELAYED@198.51.100.9") == fitting
    assert f"mtu {fitting}" in _route_mtu(host, v4)
    assert "mtu 1280" in _route_mtu(host, v6)
    assert _oversize_refused(host, v4, fitting + 1)
    assert not _oversize_refused(host, v4, fitting)
    other = mesh_ipv4(RELAY)
    assert "mtu" not in _route_mtu(host, other)

    assert _drive(host, "RELAYED@198.51.100.9", "PUNCHED@198.51.100.7") == 0
    assert "mtu" not in _route_mtu(host, v4)
    assert "mtu" not in _route_mtu(host, v6)
    assert not _oversize_refused(host, v4, 1400)


@pytest.mark.root
def test_clamp_follows_the_relays_own_path_mtu(host: Namespace) -> None:
    v4, v6 = mesh_ipv4(MEMBER), mesh_ipv6(MEMBER)
    fitting = 1184
    assert _drive(host, "RELAYED@203.0.113.5") == fitting
    assert f"mtu {fitting}" in _route_mtu(host, v4)
    assert "mtu 1280" in _route_mtu(host, v6)
    assert _drive(host, "RELAYED@2001:db8::9") == 1264
