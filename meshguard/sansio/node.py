"""The composed mesh node: one per host, one UDP port, every machine behind it.

``Node`` demultiplexes datagrams by their first bytes (DESIGN.md §4) to the WireGuard device,
the STUN responder and client, or the membership machine, and turns membership changes into
WireGuard peers: a trusted member that is alive becomes a peer whose allowed IPs are its mesh
addresses; a member that dies, leaves or loses trust stops being one. The Linux driver and
the simulator both drive this class through the same methods.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meshguard.identity.keys import Identity, ed25519_public_to_x25519
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.sansio import codec, swim
from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.messages import Endpoint
from meshguard.sansio.stun import StunClient, StunEvent, StunResponder
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.types import Address, Entropy, RandomSource, WallClock
from meshguard.sansio.wireguard import DeviceConfig, WireGuardDevice, WireGuardEvent

_WIREGUARD_FIRST_BYTES = frozenset((1, 2, 3, 4))
_WIREGUARD_ZERO_BYTES = b"\x00\x00\x00"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything that shapes a node's behaviour, apart from keys and addresses."""

    swim: SwimConfig = field(default_factory=SwimConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eager_tunnels: bool = False
    """Handshake with every member as soon as it is alive, instead of on the first packet."""
    stun_responder: bool = True
    """Answer STUN Binding requests on the mesh port, so the mesh needs no outside server."""


@dataclass(frozen=True, slots=True)
class PeerAdded:
    """A member became a WireGuard peer reachable at its mesh addresses."""

    public_key: bytes
    mesh_ipv4: ipaddress.IPv4Address
    mesh_ipv6: ipaddress.IPv6Address
    endpoint: Address | None


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    """A member stopped being a WireGuard peer (``reason``: dead, left, untrusted, reaped)."""

    public_key: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class MeshAddressCollision:
    """Two trusted keys derive the same mesh address; the later one gets no route there."""

    address: str
    kept: bytes
    refused: bytes


NodeEvent = PeerAdded | PeerRemoved | MeshAddressCollision
Event = NodeEvent | swim.MembershipEvent | WireGuardEvent | StunEvent


@dataclass(slots=True)
class _Peer:
    wireguard_key: bytes
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def _is_wireguard(datagram: bytes) -> bool:
    return (
        len(datagram) >= 4
        and datagram[0] in _WIREGUARD_FIRST_BYTES
        and datagram[1:4] == _WIREGUARD_ZERO_BYTES
    )


def _address_of(endpoint: Endpoint) -> Address:
    return (endpoint.host, endpoint.port)


class Node:
    """A mesh member: membership, tunnels and NAT helpers behind one UDP port."""

    def __init__(
        self,
        identity: Identity,
        *,
        config: NodeConfig,
        trusted_keys: Iterable[bytes],
        advertised_endpoints: Sequence[Endpoint],
        rng: RandomSource,
        entropy: Entropy,
        wallclock: WallClock,
        now: float,
    ) -> None:
        self.identity = identity
        self.config = config
        self.membership = swim.Membership(
            identity,
            config=config.swim,
            trusted_keys=trusted_keys,
            advertised_endpoints=advertised_endpoints,
            rng=rng,
            entropy=entropy,
            now=now,
        )
        self.device = WireGuardDevice(
            identity.x25519_private,
            entropy=entropy,
            rng=rng,
            wallclock=wallclock,
            config=config.device,
        )
        self.stun_client = StunClient(entropy=entropy)
        self._stun_responder = StunResponder() if config.stun_responder else None
        self._peers: dict[bytes, _Peer] = {}
        self._address_owner: dict[str, bytes] = {
            str(mesh_ipv4(identity.public_key)): identity.public_key,
            str(mesh_ipv6(identity.public_key)): identity.public_key,
        }
        self._outbox: list[tuple[bytes, Address]] = []
        self._events: list[Event] = []
        self.counters: dict[str, int] = {"stun_dropped": 0, "meshguard_datagrams": 0}

    # -- membership control ------------------------------------------------------------

    def join(self, seeds: Sequence[Address], now: float) -> None:
        self.membership.join(seeds, now)
        self._absorb(now)

    def leave(self, now: float) -> None:
        self.membership.leave(now)
        self._absorb(now)

    def set_trusted_keys(self, keys: Iterable[bytes], now: float) -> None:
        self.membership.set_trusted_keys(keys, now)
        self._absorb(now)

    def set_advertised_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        self.membership.set_advertised_endpoints(endpoints, now)
        self._absorb(now)

    # -- input -------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Route one datagram to the machine its first bytes name; never raises."""
        if _is_wireguard(data):
            self.device.receive_datagram(data, addr, now)
        elif codec.classify(data) is codec.DatagramKind.STUN:
            self._receive_stun(data, addr, now)
        else:
            self.counters["meshguard_datagrams"] += 1
            self.membership.receive_datagram(data, addr, now)
        self._absorb(now)

    def receive_datagrams(self, datagrams: Sequence[bytes], addr: Address, now: float) -> None:
        """A batch from one address (UDP GRO): WireGuard runs go to the device's fast path."""
        start = 0
        for index, data in enumerate(datagrams):
            if not _is_wireguard(data):
                if start < index:
                    self.device.receive_datagrams(datagrams[start:index], addr, now)
                self.receive_datagram(data, addr, now)
                start = index + 1
        if start == 0:
            self.device.receive_datagrams(datagrams, addr, now)
        elif start < len(datagrams):
            self.device.receive_datagrams(datagrams[start:], addr, now)
        self._absorb(now)

    def send_packets(self, packets: Sequence[bytes], now: float) -> None:
        """IP packets from the TUN; a tunnel is set up on demand by the device."""
        self.device.send_packets(packets, now)

    def _receive_stun(self, data: bytes, addr: Address, now: float) -> None:
        if self.stun_client.matches(data):
            self.stun_client.receive_datagram(data, addr, now)
            return
        if self._stun_responder is not None:
            answer = self._stun_responder.answer(data, addr)
            if answer is not None:
                self._outbox.append((answer, addr))
                return
        self.counters["stun_dropped"] += 1

    # -- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [
            deadline
            for deadline in (
                self.membership.next_deadline(),
                self.device.next_deadline(),
                self.stun_client.next_deadline(),
            )
            if deadline is not None
        ]
        return min(deadlines) if deadlines else None

    def on_timer(self, now: float) -> None:
        self.membership.on_timer(now)
        self.device.on_timer(now)
        self.stun_client.on_timer(now)
        self._absorb(now)

    # -- output ------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = self._outbox
        self._outbox = []
        out.extend(self.membership.datagrams_to_send())
        out.extend(self.stun_client.datagrams_to_send())
        out.extend(self.device.datagrams_to_send())
        return out

    def tun_packets(self) -> list[bytes]:
        return self.device.tun_packets()

    def events(self) -> list[Event]:
        self._events.extend(self.device.events())
        out = self._events
        self._events = []
        return out

    # -- membership → WireGuard peers --------------------------------------------------

    def _absorb(self, now: float) -> None:
        """Apply membership and STUN events to the device, then queue them for the driver."""
        for event in self.membership.events():
            self._events.append(event)
            if isinstance(event, swim.MemberJoined | swim.MemberAlive | swim.MemberUpdated):
                self._admit(event.public_key, now)
            elif isinstance(event, swim.MemberDead):
                self._remove(event.public_key, "dead", now)
            elif isinstance(event, swim.MemberLeft):
                self._remove(event.public_key, "left", now)
            elif isinstance(event, swim.MemberReaped):
                self._remove(event.public_key, "reaped", now)
            elif isinstance(event, swim.MemberUntrusted):
                self._remove(event.public_key, "untrusted", now)
        for stun_event in self.stun_client.events():
            self._events.append(stun_event)

    def _admit(self, public_key: bytes, now: float) -> None:
        view = self.membership.member(public_key)
        if view is None or public_key == self.identity.public_key:
            return
        endpoint = _address_of(view.endpoints[0]) if view.endpoints else None
        peer = self._peers.get(public_key)
        if peer is not None:
            if endpoint is not None:
                self.device.set_endpoint(peer.wireguard_key, endpoint)
            return
        try:
            wireguard_key = ed25519_public_to_x25519(public_key)
        except ValueError:
            return
        networks = self._claim_addresses(public_key)
        self.device.add_peer(wireguard_key, allowed_ips=networks, endpoint=endpoint, now=now)
        self._peers[public_key] = _Peer(wireguard_key, networks)
        self._events.append(
            PeerAdded(public_key, mesh_ipv4(public_key), mesh_ipv6(public_key), endpoint)
        )
        if self.config.eager_tunnels:
            self.device.initiate_handshake(wireguard_key, now)

    def _claim_addresses(
        self, public_key: bytes
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """Mesh addresses routed to this member; a collision is reported, never overwritten."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for address in (mesh_ipv4(public_key), mesh_ipv6(public_key)):
            owner = self._address_owner.setdefault(str(address), public_key)
            if owner == public_key:
                networks.append(ipaddress.ip_network(address))
            else:
                self._events.append(MeshAddressCollision(str(address), owner, public_key))
        return tuple(networks)

    def _remove(self, public_key: bytes, reason: str, now: float) -> None:
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self.device.remove_peer(peer.wireguard_key, now)
        for network in peer.networks:
            address = str(network.network_address)
            if self._address_owner.get(address) == public_key:
                del self._address_owner[address]
        self._events.append(PeerRemoved(public_key, reason))

    def peer_keys(self) -> list[bytes]:
        """Ed25519 keys of the members that are WireGuard peers right now, sorted."""
        return sorted(self._peers)

    def wireguard_key_of(self, public_key: bytes) -> bytes:
        peer = self._peers.get(public_key)
        if peer is None:
            raise LocalProtocolError("not a peer of this node")
        return peer.wireguard_key
