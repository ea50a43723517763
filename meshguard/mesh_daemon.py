"""The mesh daemon's engine: one ``Node`` driven by the data plane on a real host.

``MeshDaemon`` owns the TUN interface (or, in uapi/kernel mode, the external WireGuard and
the proxy plane of ``drivers.wgproxy``), the UDP socket, the control socket, LAN discovery,
metrics and the state file around one ``Node``; ``MeshCore`` adapts the Node to the data
plane's ``Core`` (adding the daemon's housekeeping timer and ``meshguard ping`` replies).
``meshguard.daemon`` is the command-line side; it imports this module only when the daemon
actually runs, so ``meshguard status`` and friends start fast.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import functools
import ipaddress
import logging
import os
import random
import signal
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import ifaddr
from pyroute2 import IPRoute

from meshguard import control
from meshguard.config import ConfigPaths
from meshguard.discovery import (
    DiscoveryError,
    LanDiscovery,
    LanPeer,
    Seed,
    is_underlay_address,
    lookup_dns_seeds,
    resolve_seeds,
)
from meshguard.drivers.kernel_wg import KernelWireGuard
from meshguard.drivers.loop import DataPlane
from meshguard.drivers.netlink import configure_interface
from meshguard.drivers.path_mtu import RelayRouteMtu
from meshguard.drivers.tun import TunDevice
from meshguard.drivers.uapi import ExternalPeerStats, UapiClient, WireGuardGo
from meshguard.drivers.udp import UdpSocket
from meshguard.drivers.wgproxy import ExternalWireGuard, ProxyPlane, UapiWireGuard
from meshguard.errors import UserError
from meshguard.identity.keys import Identity
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.identity.trust import TrustStore, TrustStoreError
from meshguard.metrics import (
    LatestSnapshot,
    MetricsServer,
    MetricsSnapshot,
    PeerTraffic,
    peer_label,
    serve_metrics,
)
from meshguard.sansio import swim
from meshguard.sansio.messages import Endpoint
from meshguard.sansio.node import Node, NodeConfig
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.traversal import PathChanged, PathKind, TraversalConfig
from meshguard.sansio.types import Address
from meshguard.sansio.wireguard import DeviceConfig, HandshakeCompleted, PeerUnreachable
from meshguard.settings import HostPort, Settings
from meshguard.statefile import StateSaver, load_state, state_path

log = logging.getLogger("meshguard")

MESH_IPV4_PREFIX = 16
MESH_IPV6_PREFIX = 64
MESH_ROUTES = (ipaddress.ip_network("10.99.0.0/16"), ipaddress.ip_network("fd99:6d67::/64"))
HOUSEKEEPING_INTERVAL = 1.0
"""How often the loop publishes metrics and saves state, at most."""
TRUST_POLL_INTERVAL = 2.0
"""How often ``authorized_keys/`` is checked for changes."""
PING_PAYLOAD = b"meshguard-ping"


def _resolve(endpoint: HostPort) -> Address:
    """An endpoint as an (IP, port) address; host names are looked up once, at start."""
    try:
        return (str(ipaddress.ip_address(endpoint.host)), endpoint.port)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_DGRAM)
    except socket.gaierror as error:
        raise UserError(f"cannot resolve endpoint {endpoint}: {error.strerror}") from None
    return (str(infos[0][4][0]), endpoint.port)


def _key_text(key: bytes) -> str:
    return base64.b64encode(key).decode()


def _address_text(address: Address | None) -> str | None:
    return None if address is None else str(Seed(address[0], address[1]))


def _interface_endpoints(port: int, exclude_interface: str) -> list[Endpoint]:
    """This host's addresses other members can reach it at: every interface address except
    loopback, link-local, the mesh ranges and the mesh TUN itself, with the mesh port."""
    endpoints: list[Endpoint] = []
    for adapter in ifaddr.get_adapters():
        if adapter.nice_name == exclude_interface:
            continue
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if is_underlay_address(text):
                endpoints.append(Endpoint(text, port))
    return sorted(set(endpoints), key=lambda e: (":" in e.host, e.host))


def _logfmt_value(value: object) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bytes):
        text = base64.b64encode(value).decode()
    elif isinstance(value, enum.Enum):
        text = value.value if isinstance(value.value, str) else value.name.lower()
    elif isinstance(value, Endpoint):
        text = str(Seed(value.host, value.port))
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        text = str(Seed(str(value[0]), value[1]))
    elif isinstance(value, tuple | list):
        text = ",".join(_logfmt_value(item) for item in value) or "-"
    else:
        text = str(value)
    if any(c in text for c in ' "') or not text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _logfmt_fields(prefix: str, item: object) -> list[str]:
    parts = []
    for field in dataclasses.fields(item):  # type: ignore[arg-type]
        value = getattr(item, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, Endpoint):
            parts.extend(_logfmt_fields(f"{prefix}{field.name}.", value))
        else:
            parts.append(f"{prefix}{field.name}={_logfmt_value(value)}")
    return parts


def logfmt_event(event: object) -> str:
    """``event=<Name> field=value ...``; nested records flatten to ``path.kind=direct``, keys are
    base64, endpoints ``host:port`` (IPv6 in brackets), lists comma-separated."""
    parts = [f"event={type(event).__name__}"]
    if dataclasses.is_dataclass(event):
        parts.extend(_logfmt_fields("", event))
    return " ".join(parts)


def remove_stale_interface(name: str) -> bool:
    """Delete a TUN interface called ``name`` that no process holds (a crash leftover).

    Returns whether one was removed. Raises UserError if ``name`` is some other kind of
    interface, or a TUN device another process still uses (its carrier is up).
    """
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        link = ipr.get_links(found[0])[0]
        kind = link.get(("linkinfo", "kind"))
        if kind != "tun":
            raise UserError(
                f"interface {name} exists and is not a TUN device ({kind or 'unknown kind'}); "
                "set another 'interface' in meshguard.toml"
            )
        if link.get("carrier"):
            raise UserError(f"interface {name} is in use by another process (another meshguard?)")
        ipr.link("del", index=found[0])
        return True


# -- ICMP echo through the mesh (``meshguard ping``) -------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


MeshIp = ipaddress.IPv4Address | ipaddress.IPv6Address

ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY = 128, 129
_IPPROTO_ICMPV6 = 58


def icmp_echo_request(
    source: MeshIp, destination: MeshIp, identifier: int, sequence: int, payload: bytes
) -> bytes:
    """An ICMP (IPv4) or ICMPv6 (IPv6) echo request packet, checksums filled in."""
    if isinstance(source, ipaddress.IPv6Address):
        icmp = struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, identifier, sequence) + payload
        pseudo = source.packed + destination.packed + struct.pack("!I3xB", len(icmp), 58)
        icmp = icmp[:2] + struct.pack("!H", _checksum(pseudo + icmp)) + icmp[4:]
        header = struct.pack("!IHBB", 6 << 28, len(icmp), _IPPROTO_ICMPV6, 64)
        return header + source.packed + destination.packed + icmp
    icmp = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, identifier, sequence) + payload
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(icmp), 0, 0x4000, 64, 1, 0, source.packed, destination.packed,
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + icmp


def icmp_echo_reply_key(packet: bytes) -> tuple[bytes, int, int] | None:
    """(source address, identifier, sequence) of an ICMP or ICMPv6 echo reply; else None."""
    if len(packet) >= 48 and packet[0] >> 4 == 6:
        if packet[6] != _IPPROTO_ICMPV6 or packet[40] != ICMPV6_ECHO_REPLY:
            return None
        identifier, sequence = struct.unpack_from("!HH", packet, 44)
        return packet[8:24], identifier, sequence
    if len(packet) < 28 or packet[0] >> 4 != 4 or packet[9] != 1:
        return None
    start = (packet[0] & 0x0F) * 4
    if len(packet) < start + 8 or packet[start] != ICMP_ECHO_REPLY:
        return None
    identifier, sequence = struct.unpack_from("!HH", packet, start + 4)
    return packet[12:16], identifier, sequence


@dataclass(slots=True)
class _Ping:
    public_key: bytes
    sent_at: float
    deadline: float
    done: control.PingDone


class MeshCore:
    """The Node as the data plane's core, with the daemon's own timer and ping replies.

    Datagrams and packets go straight to the Node's (batched) methods; only ``tun_packets``
    looks at packets, and only while a ``meshguard ping`` is waiting for its reply.
    """

    def __init__(self, node: Node, housekeeping: Callable[[float], float], now: float) -> None:
        self.node = node
        self.receive_datagrams = node.receive_datagrams
        self.send_packets = node.send_packets
        self.datagrams_to_send = node.datagrams_to_send
        self.split_datagrams_to_send = node.split_datagrams_to_send
        self.side_datagrams_to_send = node.side_datagrams_to_send
        self.receive_side_datagram = node.receive_side_datagram
        self.events = node.events
        self._housekeeping = housekeeping
        self._housekeeping_at = now
        self.pings: dict[tuple[bytes, int, int], _Ping] = {}
        self.clock: Callable[[], float] = time.monotonic

    def tun_packets(self) -> list[bytes]:
        return self.take_ping_replies(self.node.tun_packets())

    def take_ping_replies(self, packets: list[bytes]) -> list[bytes]:
        """Complete the pings these packets answer; returns the other packets."""
        if not self.pings or not packets:
            return packets
        now = self.clock()
        kept = []
        for packet in packets:
            key = icmp_echo_reply_key(packet)
            ping = None if key is None else self.pings.pop(key, None)
            if ping is None:
                kept.append(packet)
            else:
                ping.done(self._ping_result(ping, reply=True, now=now))
        return kept

    def _ping_result(self, ping: _Ping, *, reply: bool, now: float) -> control.PingResult:
        path, endpoint = path_of(self.node, ping.public_key)
        return control.PingResult(
            reply=reply,
            rtt_ms=round((now - ping.sent_at) * 1000, 3) if reply else None,
            path=path,
            endpoint=endpoint,
            detail="" if reply else "timed out",
        )

    def next_deadline(self) -> float | None:
        deadline = self._housekeeping_at
        node_deadline = self.node.next_deadline()
        if node_deadline is not None:
            deadline = min(deadline, node_deadline)
        for ping in self.pings.values():
            deadline = min(deadline, ping.deadline)
        return deadline

    def on_timer(self, now: float) -> None:
        node_deadline = self.node.next_deadline()
        if node_deadline is not None and now >= node_deadline:
            self.node.on_timer(now)
        for key, ping in list(self.pings.items()):
            if now >= ping.deadline:
                del self.pings[key]
                ping.done(self._ping_result(ping, reply=False, now=now))
        if now >= self._housekeeping_at:
            self._housekeeping_at = self._housekeeping(now)


_PATH_NAMES = {
    PathKind.DIRECT: "direct",
    PathKind.PUNCHED: "punched",
    PathKind.RELAYED: "relayed",
}


def path_name(kind: PathKind | None) -> str:
    """A path as the control protocol names it; "-" while there is none (connecting, or no
    way found)."""
    return "-" if kind is None else _PATH_NAMES.get(kind, "-")


def path_of(node: Node, public_key: bytes) -> tuple[str, str | None]:
    """How traffic to a member goes ("direct", "punched", "relayed", or "-" without one) and
    the UDP endpoint it is sent to (the relay's when relayed)."""
    if public_key not in node.peer_keys():
        return "-", None
    info = node.paths().get(public_key)
    if info is None:
        return "-", None
    return path_name(info.kind), _address_text(info.endpoint)


class MeshDaemon:
    """One running node: the Node, its interface and socket, and everything around them.

    Every method runs on the loop's thread (signals arrive through a pipe the loop reads).
    Implements ``control.StatusSource``.
    """

    def __init__(
        self,
        identity: Identity,
        settings: Settings,
        paths: ConfigPaths,
        *,
        offloads: bool,
    ) -> None:
        self.identity = identity
        self.settings = settings
        self.paths = paths
        self.offloads = offloads
        self.started = time.monotonic()
        self.store = TrustStore(paths.authorized_keys)
        self.names: dict[bytes, str] = {}
        self.trust_stamp: tuple[int, int] | None = None
        self.next_trust_check = 0.0
        self.seeds: dict[Address, None] = {}
        self.base_endpoints: list[Endpoint] = []
        self.handshakes: Counter[str] = Counter()
        self.membership_changed = True
        self.latest_metrics = LatestSnapshot()
        self.ping_sequence = 0
        self.ping_identifier = random.SystemRandom().randrange(1, 1 << 16)
        self.node: Node
        self.core: MeshCore
        self.plane: DataPlane | ProxyPlane
        self.saver: StateSaver
        self.external: ExternalWireGuard | None = None
        """The WireGuard implementation that owns the tunnels in uapi/kernel mode."""
        self.icmp_sockets: dict[int, socket.socket] = {}
        """Raw ICMP sockets by IP version, for ``meshguard ping`` when the tunnel is not ours
        to read."""
        self.interface = settings.interface
        self.route_mtu: RelayRouteMtu | None = None
        """Clamps the route MTU of relayed members once the interface is configured."""
        self.wireguard_go: WireGuardGo | None = None
        self.exit_status = 0

    # -- trust ---------------------------------------------------------------------------

    def _trust_stamp(self) -> tuple[int, int] | None:
        try:
            info = os.stat(self.store.directory)
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns

    def load_trust(self) -> list[bytes]:
        """Read ``authorized_keys/``; keeps the previous keys if the directory is unreadable."""
        self.trust_stamp = self._trust_stamp()
        try:
            loaded = self.store.load()
        except TrustStoreError as error:
            log.warning("event=trust_unreadable error=%s", _logfmt_value(str(error)))
            return list(self.names)
        for problem in loaded.problems:
            log.warning(
                "event=trust_problem file=%s reason=%s",
                _logfmt_value(str(problem.path)),
                _logfmt_value(problem.reason),
            )
        self.names = {trusted.public_key: trusted.name for trusted in loaded.keys}
        return list(self.names)

    def reload_trust(self, reason: str) -> None:
        before = set(self.names)
        keys = self.load_trust()
        now = time.monotonic()
        self.node.set_trusted_keys(keys, now)
        added = sorted(self.names[key] for key in set(keys) - before)
        removed = len(before - set(keys))
        log.info(
            "event=trust_reloaded reason=%s trusted=%d added=%s removed=%d",
            reason,
            len(keys),
            ",".join(added) or "-",
            removed,
        )

    # -- seeds and discovery -------------------------------------------------------------

    def initial_seeds(self) -> list[Address]:
        """The state file's members, then static seeds, then DNS seeds, without duplicates."""
        loaded = load_state(state_path(self.paths.directory))
        if loaded.problem is not None:
            log.warning("event=state_ignored reason=%s", _logfmt_value(loaded.problem))
        self.saver = StateSaver(state_path(self.paths.directory), initial=loaded.state)
        addresses = loaded.state.seed_addresses(exclude=self.identity.public_key)
        seeds = [Seed(seed.host, seed.port) for seed in self.settings.seeds]
        if self.settings.dns_seed_domain is not None:
            found, problems = lookup_dns_seeds(self.settings.dns_seed_domain)
            for problem in problems:
                log.warning("event=dns_seed_problem reason=%s", _logfmt_value(problem))
            seeds.extend(found)
        resolved, problems = resolve_seeds(seeds)
        for problem in problems:
            log.warning("event=seed_unresolved reason=%s", _logfmt_value(problem))
        return list(dict.fromkeys(addresses + resolved))

    def on_lan_peers(self, discovery: LanDiscovery) -> None:
        """Trusted nodes found by mDNS that are not live members are joined through."""
        new: list[Address] = []
        for peer in discovery.drain():
            new.extend(self._lan_seeds(peer))
        new = [address for address in new if address not in self.seeds]
        if new:
            self.seeds.update(dict.fromkeys(new))
            log.info("event=mdns_seed addresses=%s", _logfmt_value(new))
            self.node.join(list(self.seeds), time.monotonic())

    def _lan_seeds(self, peer: LanPeer) -> list[Address]:
        if peer.public_key not in self.names:
            return []
        view = self.node.membership.member(peer.public_key)
        if view is not None and view.state is swim.MemberState.ALIVE:
            return []
        return peer.udp_addresses()

    # -- events and housekeeping ----------------------------------------------------------

    def on_event(self, event: object) -> None:
        log.info("%s", logfmt_event(event))
        if isinstance(event, swim.MembershipEvent):
            self.membership_changed = True
        elif isinstance(event, HandshakeCompleted):
            self.handshakes["completed"] += 1
        elif isinstance(event, PeerUnreachable):
            self.handshakes["gave_up"] += 1
        elif isinstance(event, PathChanged) and self.route_mtu is not None:
            self.route_mtu.on_path(event.public_key, event.path)

    def housekeeping(self, now: float) -> float:
        """Trust polling, the state file and metrics; returns when to run next."""
        if now >= self.next_trust_check:
            self.next_trust_check = now + TRUST_POLL_INTERVAL
            if self._trust_stamp() != self.trust_stamp:
                self.reload_trust("authorized_keys changed")
        if self.membership_changed:
            self.membership_changed = False
            self.saver.update(self._alive_endpoints(), now=now, wall_time=time.time())
        try:
            self.saver.on_timer(now)
        except OSError as error:
            log.warning("event=state_write_failed error=%s", _logfmt_value(str(error)))
        self.latest_metrics.publish(self.metrics_snapshot())
        deadline = now + HOUSEKEEPING_INTERVAL
        saver_deadline = self.saver.next_deadline()
        return deadline if saver_deadline is None else max(now, min(deadline, saver_deadline))

    def _alive_endpoints(self) -> dict[bytes, tuple[Endpoint, ...]]:
        return {
            view.public_key: view.endpoints
            for view in self.node.membership.members()
            if view.public_key != self.identity.public_key
            and view.state is swim.MemberState.ALIVE
        }

    def metrics_snapshot(self) -> MetricsSnapshot:
        node = self.node
        states = Counter(
            view.state.value
            for view in node.membership.members()
            if view.public_key != self.identity.public_key
        )
        names_by_wireguard_key = {
            node.wireguard_key_of(key): self.names.get(key) for key in node.peer_keys()
        }
        traffic = []
        tunnels = 0
        if self.external is not None:
            for wireguard_key, external in sorted(self._external_stats().items()):
                tunnels += external.last_handshake is not None
                label = peer_label(names_by_wireguard_key.get(wireguard_key), wireguard_key)
                traffic.append(PeerTraffic(label, external.rx_bytes, external.tx_bytes))
        for wireguard_key in () if self.external is not None else node.device.peers():
            stats = node.device.peer_stats(wireguard_key)
            tunnels += stats.handshake_completed
            label = peer_label(names_by_wireguard_key.get(wireguard_key), wireguard_key)
            traffic.append(PeerTraffic(label, stats.rx_bytes, stats.tx_bytes))
        drops = dict(node.device.counters)
        drops["stun_dropped"] = node.counters["stun_dropped"]
        return MetricsSnapshot(
            members=dict(states),
            tunnels=tunnels,
            local_health=node.membership.local_health,
            handshakes=dict(self.handshakes),
            drops=drops,
            gossip=dict(node.membership.counters),
            traversal=dict(node.traversal.counters),
            peers=traffic,
        )

    # -- control.StatusSource -------------------------------------------------------------

    def _external_stats(self) -> dict[bytes, ExternalPeerStats]:
        """Per-peer counters of the external WireGuard, by X25519 key (empty in userspace)."""
        if self.external is None:
            return {}
        try:
            return self.external.peer_stats()
        except UserError as error:
            log.warning("event=external_stats_failed error=%s", _logfmt_value(str(error)))
            return {}

    def status(self) -> control.Status:
        node = self.node
        tunnels = set(node.peer_keys())
        external = self._external_stats()
        advertised = {
            view.public_key: view.endpoints for view in node.membership.members() if view.endpoints
        }
        members: list[control.MemberStatus] = []
        for row in node.status():
            key = row.public_key
            endpoint = _address_text(row.endpoint)
            if endpoint is None and key in advertised:
                first = advertised[key][0]
                endpoint = _address_text((first.host, first.port))
            stats = external.get(node.wireguard_key_of(key)) if key in tunnels else None
            if stats is not None:
                row = dataclasses.replace(
                    row,
                    last_handshake=stats.last_handshake,
                    rx_bytes=stats.rx_bytes,
                    tx_bytes=stats.tx_bytes,
                )
            members.append(
                control.MemberStatus(
                    name=self.names.get(key, "-"),
                    public_key=_key_text(key),
                    mesh_ipv4=str(mesh_ipv4(key)),
                    mesh_ipv6=str(mesh_ipv6(key)),
                    endpoint=endpoint,
                    path=path_name(row.path),
                    state=row.state,
                    tunnel=key in tunnels,
                    last_handshake=row.last_handshake,
                    rx_bytes=row.rx_bytes,
                    tx_bytes=row.tx_bytes,
                )
            )
        own = self.identity.public_key
        return control.Status(
            node=control.NodeStatus(
                public_key=_key_text(own),
                mesh_ipv4=str(mesh_ipv4(own)),
                mesh_ipv6=str(mesh_ipv6(own)),
                interface=self.interface,
                listen_port=self.plane.udp.port,
                data_plane=self.settings.data_plane,
                uptime=time.monotonic() - self.started,
            ),
            members=members,
            static_peers=self._static_peer_status(external),
            counters=dict(sorted(self.node.traversal.counters.items())),
        )

    def _static_peer_status(
        self, external: dict[bytes, ExternalPeerStats]
    ) -> list[control.StaticPeerStatus]:
        """The ``[[wireguard_peer]]`` entries with what the WireGuard device knows of them."""
        rows = []
        for peer in self.settings.wireguard_peers:
            if self.external is not None:
                found = external.get(peer.public_key)
                endpoint = None if found is None else found.endpoint
                last_handshake = None if found is None else found.last_handshake
                rx, tx = (0, 0) if found is None else (found.rx_bytes, found.tx_bytes)
            else:
                stats = self.node.device.peer_stats(peer.public_key)
                endpoint, last_handshake = _address_text(stats.endpoint), stats.last_handshake
                rx, tx = stats.rx_bytes, stats.tx_bytes
            rows.append(
                control.StaticPeerStatus(
                    public_key=_key_text(peer.public_key),
                    allowed_ips=[str(network) for network in peer.allowed_ips],
                    endpoint=endpoint,
                    last_handshake=last_handshake,
                    rx_bytes=rx,
                    tx_bytes=tx,
                )
            )
        return rows

    def ping(
        self, public_key: bytes, timeout: float, done: control.PingDone, *, ipv6: bool = False
    ) -> None:
        """An ICMP (or ICMPv6) echo request from this node's mesh address into the tunnel;
        the reply is taken out of the Node's TUN output (``MeshCore.tun_packets``), or from
        a raw socket when an external WireGuard owns the tunnel."""
        now = time.monotonic()
        if public_key not in self.node.peer_keys():
            view = self.node.membership.member(public_key)
            state = "unknown" if view is None else view.state.value
            done(
                control.PingResult(
                    reply=False,
                    rtt_ms=None,
                    path="-",
                    endpoint=None,
                    detail=f"no tunnel (member is {state})",
                )
            )
            return
        mesh_ip = mesh_ipv6 if ipv6 else mesh_ipv4
        self.ping_sequence = (self.ping_sequence + 1) & 0xFFFF
        destination = mesh_ip(public_key)
        packet = icmp_echo_request(
            mesh_ip(self.identity.public_key),
            destination,
            self.ping_identifier,
            self.ping_sequence,
            PING_PAYLOAD,
        )
        key = (destination.packed, self.ping_identifier, self.ping_sequence)
        self.core.pings[key] = _Ping(public_key, now, now + timeout, done)
        raw = self.icmp_sockets.get(destination.version)
        if raw is None:
            self.node.send_packets([packet], now)
            return
        try:
            raw.sendto(packet[40 if ipv6 else 20 :], (str(destination), 0))
        except OSError as error:
            del self.core.pings[key]
            done(
                control.PingResult(
                    reply=False, rtt_ms=None, path="-", endpoint=None,
                    detail=f"cannot send: {error.strerror or error}",
                )
            )  # fmt: skip

    def _on_icmp(self, version: int) -> None:
        """Echo replies read from a raw ICMP socket (the external WireGuard delivered them to
        the kernel, not to us). IPv4 raw sockets hand over the IP header, IPv6 ones do not."""
        raw = self.icmp_sockets[version]
        packets = []
        for _ in range(64):
            try:
                data, source = raw.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            if version == 6:
                host = ipaddress.IPv6Address(source[0].split("%")[0])
                header = struct.pack("!IHBB", 6 << 28, len(data), _IPPROTO_ICMPV6, 64)
                data = header + host.packed + bytes(16) + data
            packets.append(data)
        self.core.take_ping_replies(packets)

    def shutdown(self) -> None:
        self.leave_and_stop("control")

    def leave_and_stop(self, reason: str) -> None:
        """Leave the mesh (the LEFT record is sent when the loop flushes) and stop the loop."""
        log.info("event=stopping reason=%s", reason)
        self.node.leave(time.monotonic())
        self.plane.stop()

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        signal_read, signal_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            with contextlib.suppress(BlockingIOError):
                os.write(signal_write, bytes([signum]))

        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, on_signal) for sig in handled}
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(os.close, signal_read)
                stack.callback(os.close, signal_write)
                return self._run(stack, signal_read)
        finally:
            for sig, action in previous.items():
                signal.signal(sig, action)

    def _on_signals(self, signal_read: int) -> None:
        try:
            received = os.read(signal_read, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum == signal.SIGHUP:
                self.reload_trust("SIGHUP")
            else:
                self.leave_and_stop(signal.Signals(signum).name)

    def _run(self, stack: contextlib.ExitStack, signal_read: int) -> int:
        settings = self.settings
        trusted = self.load_trust()
        server = control.ControlServer(control.socket_path(self.paths.directory), self)
        stack.callback(server.close)

        try:
            udp = UdpSocket(settings.listen_port, offloads=self.offloads)
        except OSError as error:
            raise UserError(
                f"cannot bind UDP port {settings.listen_port}: {error.strerror or error}"
            ) from None
        stack.callback(udp.close)
        tun: TunDevice | None = None
        wireguard_port = 0
        if settings.data_plane == "userspace":
            tun = self._open_tun(stack)
        else:
            wireguard_port = self._start_external(stack)
        own = self.identity.public_key
        ipv4 = ipaddress.ip_interface(f"{mesh_ipv4(own)}/{MESH_IPV4_PREFIX}")
        ipv6 = ipaddress.ip_interface(f"{mesh_ipv6(own)}/{MESH_IPV6_PREFIX}")
        static_routes = [n for peer in settings.wireguard_peers for n in peer.allowed_ips]
        try:
            configure_interface(
                self.interface,
                mtu=settings.mtu,
                addresses=[ipv4, ipv6],
                routes=[*MESH_ROUTES, *static_routes],
            )
        except OSError as error:
            raise UserError(f"cannot configure interface {self.interface}: {error}") from None
        self.route_mtu = RelayRouteMtu(self.interface, settings.mtu)

        if settings.advertise:
            self.base_endpoints = [Endpoint(e.host, e.port) for e in settings.advertise]
        else:
            self.base_endpoints = _interface_endpoints(udp.port, self.interface)
        stun_servers, problems = resolve_seeds(Seed(e.host, e.port) for e in settings.stun_servers)
        for problem in problems:
            log.warning("event=stun_server_unresolved reason=%s", _logfmt_value(problem))
        now = time.monotonic()
        swim_config = SwimConfig.lan() if settings.swim_profile == "lan" else SwimConfig.wan()
        self.node = Node(
            self.identity,
            config=NodeConfig(
                swim=swim_config,
                device=DeviceConfig(mtu=settings.mtu),
                eager_tunnels=settings.eager_tunnels,
                stun_servers=tuple(stun_servers),
                allow_relay=settings.relay,
                traversal=TraversalConfig(opening_ttl=settings.opening_ttl),
                side_port_stun=True,
                external_wireguard=self.external is not None,
            ),
            trusted_keys=trusted,
            advertised_endpoints=self.base_endpoints,
            rng=random.SystemRandom(),
            entropy=os.urandom,
            wallclock=time.time,
            now=now,
        )
        self._add_static_peers(now)
        self.core = MeshCore(self.node, self.housekeeping, now)
        if tun is not None:
            self.plane = DataPlane(self.core, tun, udp, mtu=settings.mtu, on_event=self.on_event)
            stack.callback(self.plane.close)
        else:
            assert self.external is not None
            self.plane = ProxyPlane(
                self.core,
                self.external,
                udp,
                wireguard_port=wireguard_port,
                on_event=self.on_event,
            )
            stack.callback(self.plane.close)
            for version, family, protocol in (
                (4, socket.AF_INET, socket.IPPROTO_ICMP),
                (6, socket.AF_INET6, socket.IPPROTO_ICMPV6),
            ):
                raw = socket.socket(family, socket.SOCK_RAW, protocol)
                raw.setblocking(False)
                stack.callback(raw.close)
                self.icmp_sockets[version] = raw
                self.plane.add_reader(raw.fileno(), functools.partial(self._on_icmp, version))
            if self.wireguard_go is not None:
                exited = os.pidfd_open(self.wireguard_go.process.pid)
                stack.callback(os.close, exited)
                self.plane.add_reader(exited, self._on_wireguard_go_exit)
        self.plane.add_reader(signal_read, lambda: self._on_signals(signal_read))
        self.plane.add_reader(server.fileno(), server.handle_ready)

        self.seeds = dict.fromkeys(self.initial_seeds())
        stack.callback(self._save_state)
        if self.seeds:
            self.node.join(list(self.seeds), now)
        lan = self._start_mdns(stack, udp.port)
        metrics = self._start_metrics(stack)

        log.info(
            "event=started interface=%s data_plane=%s wireguard_port=%s mtu=%d listen_port=%d "
            "public_key=%s wg_public_key=%s ipv4=%s ipv6=%s tun_offload=%s udp_gso=%s "
            "udp_gro=%s peers=%d trusted=%d seeds=%d mdns=%s metrics=%s swim_profile=%s "
            "advertise=%s",
            self.interface,
            settings.data_plane,
            wireguard_port or "-",
            settings.mtu,
            udp.port,
            _key_text(own),
            _key_text(self.node.device.public_key),
            ipv4.ip,
            ipv6.ip,
            "-" if tun is None else tun.vnet_hdr,
            udp.gso,
            udp.gro,
            len(settings.wireguard_peers),
            len(trusted),
            len(self.seeds),
            lan is not None,
            "-" if metrics is None else str(Seed(*metrics.address)),
            settings.swim_profile,
            ",".join(f"{e.host}:{e.port}" for e in self.base_endpoints) or "-",
        )
        self.plane.run()
        self._log_summary()
        return self.exit_status

    def _open_tun(self, stack: contextlib.ExitStack) -> TunDevice:
        """The userspace data plane's TUN (a crash's idle leftover of that name removed)."""
        name = self.settings.interface
        if remove_stale_interface(name):
            log.warning("event=stale_interface_removed interface=%s", name)
        try:
            tun = TunDevice(name, offloads=self.offloads)
        except OSError as error:
            raise UserError(f"cannot create interface {name}: {error.strerror or error}") from None
        stack.callback(tun.close)
        self.interface = tun.name
        return tun

    def _start_external(self, stack: contextlib.ExitStack) -> int:
        """Start or attach to the WireGuard implementation of the uapi/kernel data plane, give
        it our X25519 key; returns the port it listens on (reached over loopback)."""
        settings = self.settings
        if settings.data_plane == "kernel":
            kernel = KernelWireGuard(settings.interface)
            stack.callback(kernel.close)
            self.external = kernel
            return kernel.configure(self.identity.x25519_private)
        if settings.uapi_socket is not None:
            path = Path(settings.uapi_socket)
            self.interface = path.name.removesuffix(".sock")
        else:
            if remove_stale_interface(settings.interface):
                log.warning("event=stale_interface_removed interface=%s", settings.interface)
            wireguard_go = WireGuardGo(settings.wireguard_go or "wireguard-go", settings.interface)
            stack.callback(wireguard_go.close)
            log.info(
                "event=wireguard_go_started pid=%d interface=%s socket=%s",
                wireguard_go.process.pid,
                settings.interface,
                wireguard_go.socket,
            )
            self.wireguard_go = wireguard_go
            path = wireguard_go.socket
        uapi = UapiWireGuard(UapiClient(path))
        self.external = uapi
        return uapi.configure(self.identity.x25519_private)

    def _on_wireguard_go_exit(self) -> None:
        """wireguard-go died under us: no tunnels without it, so stop with status 1."""
        assert self.wireguard_go is not None
        if self.exit_status or self.wireguard_go.process.poll() is None:
            return
        log.error(
            "event=wireguard_go_exited reason=%s",
            _logfmt_value(self.wireguard_go.exit_reason()),
        )
        self.exit_status = 1
        self.leave_and_stop("wireguard-go exited")

    def _add_static_peers(self, now: float) -> None:
        """``[[wireguard_peer]]`` entries: peers of our device, or of the external one."""
        for peer in self.settings.wireguard_peers:
            endpoint = None if peer.endpoint is None else _resolve(peer.endpoint)
            if self.external is not None:
                self.external.set_peer(
                    peer.public_key,
                    endpoint=endpoint,
                    allowed_ips=peer.allowed_ips,
                    persistent_keepalive=peer.persistent_keepalive,
                    preshared_key=peer.preshared_key,
                )
                continue
            self.node.device.add_peer(
                peer.public_key,
                allowed_ips=peer.allowed_ips,
                endpoint=endpoint,
                preshared_key=peer.preshared_key,
                persistent_keepalive=peer.persistent_keepalive,
                now=now,
            )

    def _start_mdns(self, stack: contextlib.ExitStack, port: int) -> LanDiscovery | None:
        if not self.settings.mdns:
            return None
        try:
            lan = LanDiscovery(
                self.identity.public_key, port, addresses=[e.host for e in self.base_endpoints]
            )
        except DiscoveryError as error:
            log.warning("event=mdns_unavailable reason=%s", _logfmt_value(str(error)))
            return None
        stack.callback(lan.close)
        self.plane.add_reader(lan.fileno(), lambda: self.on_lan_peers(lan))
        return lan

    def _start_metrics(self, stack: contextlib.ExitStack) -> MetricsServer | None:
        if self.settings.metrics is None:
            return None
        self.latest_metrics.publish(self.metrics_snapshot())
        metrics = serve_metrics(str(self.settings.metrics), self.latest_metrics)
        stack.callback(metrics.close)
        return metrics

    def _save_state(self) -> None:
        self.saver.update(self._alive_endpoints(), now=time.monotonic(), wall_time=time.time())
        try:
            self.saver.flush(time.monotonic())
        except OSError as error:
            log.warning("event=state_write_failed error=%s", _logfmt_value(str(error)))

    def _log_summary(self) -> None:
        device = self.node.device
        for peer in device.peers():
            stats = device.peer_stats(peer)
            log.info(
                "event=peer_summary peer=%s endpoint=%s rx_bytes=%d tx_bytes=%d handshake=%s",
                _key_text(peer),
                stats.endpoint,
                stats.rx_bytes,
                stats.tx_bytes,
                stats.handshake_completed,
            )
        drops = " ".join(f"{name}={count}" for name, count in sorted(device.counters.items()))
        counters = " ".join(f"{k}={v}" for k, v in vars(self.plane.counters).items())
        log.info("event=stopped %s", " ".join(part for part in (drops, counters) if part))
