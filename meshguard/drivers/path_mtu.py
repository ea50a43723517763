"""Per-peer route MTU for members reached through a relay.

A relayed WireGuard datagram travels inside two sealed ``RelayEnvelope`` legs, so it is
``RELAY_OVERHEAD`` bytes larger than a direct one. At the usual tunnel MTU of 1420 that no
longer fits a 1500-byte underlay and every full-size packet would leave as IP fragments,
which NATs and firewalls often drop. One TUN has one MTU, but a host route has its own: while
a member is relayed, its mesh addresses get a /32 and /128 route with the MTU that fits the
relay's underlay path, so the kernel sizes TCP segments (and fragments or refuses oversize
datagrams with "message too long") before they reach the tunnel. Direct and punched members
keep the interface MTU.
"""

from __future__ import annotations

import ipaddress
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.sansio.codec import encoded_size
from meshguard.sansio.messages import RelayEnvelope
from meshguard.sansio.traversal import PathInfo, PathKind
from meshguard.sansio.types import Address
from meshguard.sansio.wireguard.constants import KEEPALIVE_SIZE

__all__ = ["RELAY_OVERHEAD", "RelayRouteMtu", "relayed_tunnel_mtu"]

log = logging.getLogger(__name__)

RELAY_OVERHEAD = 2 * encoded_size(RelayEnvelope(bytes(32), b""))
"""Bytes the two relay legs add to a WireGuard datagram (origin → relay → destination)."""

UDP_HEADER = 8
IPV4_HEADER = 20
IPV6_HEADER = 40
PADDING = 16
"""WireGuard pads the plaintext of a transport message to a multiple of this."""
IPV4_MIN_MTU = 576
IPV6_MIN_MTU = 1280
_ENOENT = 2
_ESRCH = 3


def relayed_tunnel_mtu(underlay_mtu: int, *, ipv6_underlay: bool) -> int:
    """The largest inner packet whose relayed datagram fits ``underlay_mtu`` unfragmented.

    WireGuard pads a packet to a multiple of 16 bytes (up to the interface MTU), so the
    answer is rounded down to one: a 1284-byte packet would travel as 1296 bytes.
    """
    ip_header = IPV6_HEADER if ipv6_underlay else IPV4_HEADER
    room = underlay_mtu - ip_header - UDP_HEADER - RELAY_OVERHEAD - KEEPALIVE_SIZE
    return room - room % PADDING


class RelayRouteMtu:
    """Keeps a host route with a smaller MTU for each relayed member of one interface."""

    def __init__(self, interface: str, tunnel_mtu: int) -> None:
        self.interface = interface
        self.tunnel_mtu = tunnel_mtu
        self.clamped: dict[bytes, int] = {}
        """Member → the route MTU currently installed for its mesh addresses."""

    def on_path(self, member: bytes, path: PathInfo) -> None:
        """Install, change or remove the member's host routes for its new path.

        Netlink failures are logged and leave the interface MTU in force: a missing clamp
        costs fragmentation, never connectivity.
        """
        if path.kind is not PathKind.RELAYED and member not in self.clamped:
            return
        try:
            with IPRoute() as ipr:
                wanted = None
                if path.kind is PathKind.RELAYED and path.endpoint is not None:
                    wanted = self._relayed_mtu(ipr, path.endpoint)
                if wanted == self.clamped.get(member):
                    return
                found = ipr.link_lookup(ifname=self.interface)
                if not found:
                    return
                if wanted is None:
                    self._remove(ipr, found[0], member)
                else:
                    self._install(ipr, found[0], member, wanted)
        except (OSError, NetlinkError) as error:
            log.warning("event=route_mtu_failed interface=%s error=%s", self.interface, error)

    def _relayed_mtu(self, ipr: IPRoute, relay: Address) -> int | None:
        """The clamp for a member relayed via ``relay``, or None if the tunnel MTU fits."""
        try:
            relay_ip = ipaddress.ip_address(relay[0])
        except ValueError:
            return None
        underlay = underlay_mtu(ipr, str(relay_ip))
        if underlay is None:
            return None
        fitting = relayed_tunnel_mtu(underlay, ipv6_underlay=relay_ip.version == 6)
        return fitting if fitting < self.tunnel_mtu else None

    def _install(self, ipr: IPRoute, index: int, member: bytes, mtu: int) -> None:
        floors = ((mesh_ipv4(member), IPV4_MIN_MTU), (mesh_ipv6(member), IPV6_MIN_MTU))
        for address, floor in floors:
            ipr.route(
                "replace",
                dst=f"{address}/{address.max_prefixlen}",
                oif=index,
                metrics={"mtu": max(floor, mtu)},
            )
        self.clamped[member] = mtu
        log.info("event=route_mtu_clamped member=%s mtu=%d", member.hex()[:16], mtu)

    def _remove(self, ipr: IPRoute, index: int, member: bytes) -> None:
        for address in (mesh_ipv4(member), mesh_ipv6(member)):
            try:
                ipr.route("del", dst=f"{address}/{address.max_prefixlen}", oif=index)
            except NetlinkError as error:
                if error.code not in (_ENOENT, _ESRCH):
                    raise
        del self.clamped[member]
        log.info("event=route_mtu_released member=%s", member.hex()[:16])


def underlay_mtu(ipr: IPRoute, destination: str) -> int | None:
    """The MTU toward ``destination``: its route's MTU metric, else its output link's MTU."""
    try:
        routes = ipr.route("get", dst=destination)
    except NetlinkError:
        return None
    if not routes:
        return None
    route = routes[0]
    metrics = route.get_attr("RTA_METRICS")
    if metrics is not None:
        route_mtu = metrics.get_attr("RTAX_MTU")
        if route_mtu:
            return int(route_mtu)
    oif = route.get_attr("RTA_OIF")
    if oif is None:
        return None
    links = ipr.get_links(oif)
    return int(links[0].get_attr("IFLA_MTU")) if links else None
