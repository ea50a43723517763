"""The composed mesh node: one per host, one UDP port, every machine behind it.

``Node`` demultiplexes datagrams by their first bytes (DESIGN.md §4) to the WireGuard device,
the STUN responder and client, NAT detection, NAT traversal (hole punching, relay) or the
membership machine, and turns membership changes into WireGuard peers: a trusted member that
is alive becomes a peer whose allowed IPs are its mesh addresses; a member that dies, leaves
or loses trust stops being one. ``Traversal`` decides each peer's device endpoint: an
advertised endpoint, a punched address, or a virtual relay address that only exists inside
the node (``datagrams_to_send`` turns datagrams for it into relay envelopes). The node learns
its public mapping and NAT type by STUN (configured servers, and public members, which
answer STUN on the mesh port), advertises them in its signed record, and pushes a new record
straight to its tunnel peers when its address changes. The Linux driver and the simulator
both drive this class through the same methods; ``docs/hole-punching.md`` has the design.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from meshguard.identity.keys import Identity, ed25519_public_to_x25519
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.sansio import codec, swim
from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.messages import (
    Endpoint,
    EndpointUpdate,
    Message,
    NatInfo,
    NatMapping,
    RecordStatus,
)
from meshguard.sansio.natdetect import NatDetected, NatProber
from meshguard.sansio.stun import (
    MappedAddress,
    PublicAddressChanged,
    StunClient,
    StunEvent,
    StunResponder,
    StunTiming,
)
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.traversal import (
    PathChanged,
    PathInfo,
    PathKind,
    Traversal,
    TraversalConfig,
    is_virtual,
)
from meshguard.sansio.types import Address, Entropy, RandomSource, WallClock
from meshguard.sansio.wireguard import (
    DeviceConfig,
    EndpointChanged,
    PeerUnreachable,
    WireGuardDevice,
    WireGuardEvent,
)

_WIREGUARD_FIRST_BYTES = frozenset((1, 2, 3, 4))
_WIREGUARD_ZERO_BYTES = b"\x00\x00\x00"
_SIDE_STUN_TIMING = StunTiming(transmissions=1, last_wait_factor=2.0)
"""One request per fresh observation: a retransmission would leave from another port."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything that shapes a node's behaviour, apart from keys and addresses."""

    swim: SwimConfig = field(default_factory=SwimConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    eager_tunnels: bool = False
    """Handshake with every member as soon as it is alive, instead of on the first packet."""
    stun_responder: bool = True
    """Answer STUN Binding requests on the mesh port, so the mesh needs no outside server."""
    stun_servers: tuple[Address, ...] = ()
    """Outside STUN servers to learn the public mapping and NAT type from (optional: public
    members are asked too). The first one that answers is the mapping the node advertises."""
    nat: NatInfo | None = None
    """NAT facts known in advance (a host with a public address says ``NatMapping.NONE``);
    None: detect them with STUN."""
    allow_relay: bool = False
    """Relay WireGuard datagrams between other members (gossiped as ``allows_relay``)."""
    member_stun_servers: int = 2
    """Public members asked for our mapping (two of them also tell the NAT type)."""
    traversal: TraversalConfig = field(default_factory=TraversalConfig)
    side_port_stun: bool = False
    """The driver sends ``side_datagrams_to_send`` each from a new ephemeral UDP port and
    hands what comes back there to ``receive_side_datagram``. Behind a NAT that maps per
    destination, that is how a punch learns the port the NAT allocates next (port
    prediction): from the mesh port every STUN server we could ask is one we talk to
    already, so its answer is a mapping made long ago."""
    external_wireguard: bool = False
    """Another WireGuard implementation (wireguard-go, the kernel) owns the tunnels: received
    WireGuard datagrams are handed out by ``wireguard_datagrams`` instead of decrypted, and
    that implementation's datagrams go out through ``send_wireguard`` along the member's path.
    """


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


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One row of ``Node.status()``: what ``meshguard status`` shows about a member."""

    public_key: bytes
    state: str
    """Member state: alive, suspect, dead or left."""
    path: PathKind | None
    """None when the member is no WireGuard peer (dead, left)."""
    endpoint: Address | None
    """Where datagrams to it go (the relay's address when relayed)."""
    relay: bytes | None
    rtt: float | None
    last_handshake: float | None
    """Wall-clock seconds of the latest WireGuard handshake."""
    rx_bytes: int
    tx_bytes: int


NodeEvent = PeerAdded | PeerRemoved | MeshAddressCollision
Event = NodeEvent | swim.MembershipEvent | WireGuardEvent | StunEvent | PathChanged | NatDetected


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


def _is_stun_request(data: bytes) -> bool:
    """Whether a STUN message (``is_stun``) is a request: both class bits of its type are 0
    (RFC 8489 §5: C1 is bit 8, C0 bit 4 of the 14-bit type)."""
    return data[0] & 0x01 == 0 and data[1] & 0x10 == 0


def _address_of(endpoint: Endpoint) -> Address:
    return (endpoint.host, endpoint.port)


class Node:
    """A mesh member: membership, tunnels and NAT traversal behind one UDP port."""

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
        self._now = now
        self._nat = dataclasses.replace(
            config.nat if config.nat is not None else NatInfo(), allows_relay=config.allow_relay
        )
        self._configured_endpoints = tuple(advertised_endpoints)
        self._public_endpoint: Endpoint | None = None
        self.membership = swim.Membership(
            identity,
            config=config.swim,
            trusted_keys=trusted_keys,
            advertised_endpoints=advertised_endpoints,
            rng=rng,
            entropy=entropy,
            now=now,
            nat=self._nat,
        )
        self.device = WireGuardDevice(
            identity.x25519_private,
            entropy=entropy,
            rng=rng,
            wallclock=wallclock,
            config=config.device,
        )
        self.traversal = Traversal(
            identity.public_key,
            config=config.traversal,
            rng=rng,
            seal=self._seal,
            open_datagram=self.membership.authenticate,
            allow_relay=config.allow_relay,
            observe=self._observe_fresh_mapping if config.side_port_stun else None,
        )
        self.traversal.set_local(self._configured_endpoints, self._nat)
        self.stun_client = StunClient(entropy=entropy)
        self._side_stun = StunClient(entropy=entropy, timing=_SIDE_STUN_TIMING)
        """Fresh observations for port prediction, from ephemeral ports (``side_port_stun``)."""
        self._toward_stun = StunClient(entropy=entropy, timing=_SIDE_STUN_TIMING)
        """Our mesh port's mapping as a punch peer's NAT neighbour sees it (same purpose)."""
        self._entropy = entropy
        self._stun_responder = StunResponder() if config.stun_responder else None
        self._stun_servers: list[Address] = []
        """Servers the client monitors, in order; the first to answer gives our mapping."""
        self._member_stun: list[Address] = []
        self._prober: NatProber | None = None
        self._peers: dict[bytes, _Peer] = {}
        self._member_of: dict[bytes, bytes] = {}
        """WireGuard key → member key, for device events."""
        self._address_owner: dict[str, bytes] = {
            str(mesh_ipv4(identity.public_key)): identity.public_key,
            str(mesh_ipv6(identity.public_key)): identity.public_key,
        }
        self._outbox: list[tuple[bytes, Address]] = []
        self._heard_from: dict[bytes, Address] = {}
        """Member → where its latest authenticated meshguard datagram came from."""
        self._seed_addresses: dict[Address, None] = {}
        """Every address given to ``join``: datagrams to them go there, not by member key."""
        self._events: list[Event] = []
        self._external: list[tuple[bytes, bytes | None, Address]] = []
        self._endpoint_owners: dict[Address, bytes] | None = None
        """Device endpoint → member, for external WireGuard; None: rebuild on next use."""
        self.counters: dict[str, int] = {
            "stun_dropped": 0,
            "meshguard_datagrams": 0,
            "endpoint_update_refused": 0,
            "endpoint_updates_sent": 0,
            "unhandled_message": 0,
            "external_wireguard_unroutable": 0,
        }
        for server in config.stun_servers:
            self._monitor(server, now)
        if config.stun_servers and config.nat is None:
            self._start_nat_detection(config.stun_servers, now)

    # -- membership control ------------------------------------------------------------

    def join(self, seeds: Sequence[Address], now: float) -> None:
        self._seed_addresses.update(dict.fromkeys(seeds))
        self.membership.join(seeds, now)
        self._absorb(now)

    def leave(self, now: float) -> None:
        self.membership.leave(now)
        self._absorb(now)

    def set_trusted_keys(self, keys: Iterable[bytes], now: float) -> None:
        self.membership.set_trusted_keys(keys, now)
        self._absorb(now)

    def set_advertised_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Our local addresses changed (roaming): advertise them and tell tunnel peers.

        A learned public mapping is dropped (it belonged to the old address) and asked for
        again at once; the NAT in front of the new address is probed afresh.
        """
        self._configured_endpoints = tuple(endpoints)
        self._public_endpoint = None
        self._publish_endpoints(now)
        if self._stun_servers:
            self.stun_client.query(self._stun_servers[0], now)
        self._redetect_nat(now)
        self._absorb(now)

    # -- input -------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Route one datagram to the machine its first bytes name; never raises."""
        self._now = now
        if _is_wireguard(data):
            if self.config.external_wireguard:
                self._external.append((data, self.member_at(addr), addr))
            else:
                self.device.receive_datagram(data, addr, now)
        elif codec.classify(data) is codec.DatagramKind.STUN:
            self._receive_stun(data, addr, now)
        else:
            self.counters["meshguard_datagrams"] += 1
            self._receive_meshguard(data, addr, now)
        self._absorb(now)

    def receive_datagrams(self, datagrams: Sequence[bytes], addr: Address, now: float) -> None:
        """A batch from one address (UDP GRO): WireGuard runs go to the device's fast path."""
        self._now = now
        if self.config.external_wireguard:
            member = self.member_at(addr)
            for data in datagrams:
                if _is_wireguard(data):
                    self._external.append((data, member, addr))
                else:
                    self.receive_datagram(data, addr, now)
            return
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
        self._now = now
        self.device.send_packets(packets, now)
        self._device_events(now)

    def _receive_meshguard(self, data: bytes, addr: Address, now: float) -> None:
        opened = self.membership.authenticate(data)
        if opened is None:
            return
        sender, message = opened
        self.traversal.heard(sender, addr)
        self._heard_from[sender] = addr
        if isinstance(message, EndpointUpdate) and message.record.public_key != sender:
            self.counters["endpoint_update_refused"] += 1
        elif not self.traversal.on_message(
            sender, message, addr, now
        ) and not self.membership.handle_message(sender, message, addr, now):
            self.counters["unhandled_message"] += 1
        for payload, virtual in self.traversal.deliveries():
            if self.config.external_wireguard:
                self._external.append((payload, self.member_at(virtual), virtual))
            else:
                self.device.receive_datagram(payload, virtual, now)
        for origin, relayed, endpoint in self.traversal.relayed_messages():
            if isinstance(relayed, EndpointUpdate) and relayed.record.public_key != origin:
                self.counters["endpoint_update_refused"] += 1
            elif not self.membership.handle_message(origin, relayed, endpoint, now):
                self.counters["unhandled_message"] += 1

    def _receive_stun(self, data: bytes, addr: Address, now: float) -> None:
        """Requests go to the responder; answers to whichever of our clients asked.

        A request carrying our own transaction ID is our own query come back (our address
        is among our STUN servers, or the NAT prober's hairpin test): it is answered all the
        same, and the prober also sees it, since its arrival is what proves hairpinning.
        """
        if _is_stun_request(data):
            if self._prober is not None and self._prober.matches(data):
                self._prober.receive_datagram(data, addr, now)
            self._answer_stun(data, addr)
            return
        if self._prober is not None and self._prober.matches(data):
            self._prober.receive_datagram(data, addr, now)
            return
        if self.stun_client.matches(data):
            self.stun_client.receive_datagram(data, addr, now)
            return
        if self._toward_stun.matches(data):
            self._toward_stun.receive_datagram(data, addr, now)
            for event in self._toward_stun.events():
                if isinstance(event, MappedAddress):
                    mapped = codec.canonical_endpoint(Endpoint(*event.mapped))
                    self.traversal.mapping_toward(event.server, mapped, now)
            return
        self.counters["stun_dropped"] += 1

    def receive_side_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """A datagram that came back to a port ``side_datagrams_to_send`` used: the answer
        to a fresh observation goes to the punch waiting for it; anything else is dropped."""
        self._now = now
        if codec.classify(data) is not codec.DatagramKind.STUN or not self._side_stun.matches(
            data
        ):
            self.counters["stun_dropped"] += 1
            return
        self._side_stun.receive_datagram(data, addr, now)
        for event in self._side_stun.events():
            if isinstance(event, MappedAddress):
                self.traversal.fresh_mapping(codec.canonical_endpoint(Endpoint(*event.mapped)), now)
        self._absorb(now)

    def side_datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """STUN Binding requests to send each from a new ephemeral UDP port, kept open a
        couple of seconds for the answer (``NodeConfig.side_port_stun``)."""
        return self._side_stun.datagrams_to_send()

    def _observe_fresh_mapping(self, now: float, toward: Address | None) -> bool:
        """Ask a STUN server (configured, or a public member) from a new local port: our NAT
        gives that port a new mapping, whose port tells where its counter is right now. With
        ``toward`` (a member, which answers STUN), ask it from the mesh port too."""
        if not self._stun_servers:
            return False
        self._side_stun.query(self._stun_servers[0], now)
        if toward is not None:
            self._toward_stun.query(toward, now)
        return True

    def _answer_stun(self, data: bytes, addr: Address) -> None:
        if self._stun_responder is not None:
            answer = self._stun_responder.answer(data, addr)
            if answer is not None:
                self._outbox.append((answer, addr))
                return
        self.counters["stun_dropped"] += 1

    # -- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        earliest = self.membership.next_deadline()
        for deadline in (
            self.device.next_deadline(),
            self.stun_client.next_deadline(),
            self._side_stun.next_deadline(),
            self._toward_stun.next_deadline(),
            self.traversal.next_deadline(),
            None if self._prober is None else self._prober.next_deadline(),
        ):
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        return earliest

    def on_timer(self, now: float) -> None:
        self._now = now
        self.membership.on_timer(now)
        self.device.on_timer(now)
        self.stun_client.on_timer(now)
        self._side_stun.on_timer(now)
        self._toward_stun.on_timer(now)
        self._side_stun.events()  # timeouts: the punch stops waiting after fresh_wait anyway
        self._toward_stun.events()
        self.traversal.on_timer(now)
        if self._prober is not None:
            self._prober.on_timer(now)
        self._absorb(now)

    # -- output ------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Every datagram to send, TTL-limited ones first as ordinary datagrams (for a
        driver that cannot set the IP TTL; see ``split_datagrams_to_send``)."""
        out, limited = self.split_datagrams_to_send()
        if not limited:
            return out
        return [*((data, addr) for data, addr, _ in limited), *out]

    def split_datagrams_to_send(
        self,
    ) -> tuple[list[tuple[bytes, Address]], list[tuple[bytes, Address, int]]]:
        """Drain the datagrams to send: (ordinary ones, TTL-limited ones with their IP TTL).

        Send the TTL-limited ones first, with that TTL (IPv6 hop limit): they open our own
        NAT toward members whose NAT has not opened toward us (``Traversal.opening_ttl``).
        Toward a member that will predict our port, a membership datagram goes only through
        the interim relay while there is one (``Traversal.keeps_quiet``).
        """
        limited = self.traversal.limited_datagrams_to_send()
        out = self._outbox
        self._outbox = []
        out.extend(self.stun_client.datagrams_to_send())
        out.extend(self._toward_stun.datagrams_to_send())
        if self._prober is not None:
            out.extend(self._prober.datagrams_to_send())
        out.extend(self.traversal.datagrams_to_send())
        routed = []
        opening_ttl = self.traversal.opening_ttl
        keeps_quiet = self.traversal.keeps_quiet
        for data, addr, key in self.membership.datagrams_to_members():
            destination = self._membership_destination(key, addr)
            ttl = opening_ttl(key, destination)
            interim = (
                None if addr in self._seed_addresses else self.traversal.interim_relay(key)
            )
            if ttl is None:
                routed.append((data, destination))
            elif interim is None or not keeps_quiet(key):
                limited.append((data, destination, ttl))
            if interim is not None:
                routed.append((data, interim))
        from_device = self.device.datagrams_to_send()
        if not self.traversal.has_virtual():
            out.extend(routed)
            out.extend(from_device)
            return out, limited
        wrap = self.traversal.wrap
        for data, addr in (*routed, *from_device):
            if addr[1] != 0:
                out.append((data, addr))
                continue
            wrapped = wrap(data, addr)
            if wrapped is not None:
                out.append(wrapped)
        return out, limited

    def _membership_destination(self, key: bytes, addr: Address) -> Address:
        """Where a membership datagram sealed for member ``key`` goes: along the member's
        path (direct, punched, or its virtual relay address), else where SWIM addressed it.

        Without a path it goes where the member's latest authenticated datagram came from
        (SWIM may not know that yet: a joiner's first datagram arrives before its record),
        else to SWIM's address, and a copy goes through a relay (``interim_relay``). With a
        path, SWIM's address is kept when the member's latest datagram came from it (its
        NAT rebound, say: the path follows only when the tunnel's traffic roams). A seed
        address the member does not advertise is kept in any case: a hello to an unknown
        seed is sealed for every trusted key, and is meant for whoever is at that address,
        not for the members those keys belong to.
        """
        if addr in self._seed_addresses and not self._advertises(key, addr):
            return addr
        destination = self.traversal.destination(key)
        heard = self._heard_from.get(key)
        if destination is None:
            return addr if heard is None else heard
        if addr == heard and not is_virtual(destination):
            return addr
        return destination

    def _advertises(self, key: bytes, addr: Address) -> bool:
        view = self.membership.member(key)
        return view is not None and any(_address_of(e) == addr for e in view.endpoints)

    def tun_packets(self) -> list[bytes]:
        return self.device.tun_packets()

    # -- external WireGuard (NodeConfig.external_wireguard) ------------------------------

    def wireguard_datagrams(self) -> list[tuple[bytes, bytes | None, Address]]:
        """Received WireGuard datagrams: (datagram, member key or None, source address)."""
        out, self._external = self._external, []
        return out

    def send_wireguard(self, public_key: bytes, datagrams: Sequence[bytes], now: float) -> None:
        """Datagrams of the external WireGuard for a member, sent along its current path
        (direct or punched address, or wrapped for its relay); dropped without a path."""
        self._now = now
        peer = self._peers.get(public_key)
        endpoint = None if peer is None else self.device.peer_stats(peer.wireguard_key).endpoint
        if endpoint is None:
            self.counters["external_wireguard_unroutable"] += len(datagrams)
            return
        if not is_virtual(endpoint):
            self._outbox.extend((datagram, endpoint) for datagram in datagrams)
            return
        for datagram in datagrams:
            wrapped = self.traversal.wrap(datagram, endpoint)
            if wrapped is None:
                self.counters["external_wireguard_unroutable"] += 1
            else:
                self._outbox.append(wrapped)

    def member_at(self, addr: Address) -> bytes | None:
        """The peer whose path (or, failing that, advertised endpoint) is ``addr``."""
        if is_virtual(addr):
            member = bytes.fromhex(addr[0].rsplit(":", 1)[1])
            return member if member in self._peers else None
        if self._endpoint_owners is None:
            owners: dict[Address, bytes] = {}
            for key in self._peers:
                view = self.membership.member(key)
                for endpoint in () if view is None else view.endpoints:
                    owners.setdefault(_address_of(endpoint), key)
            for key, peer in self._peers.items():
                current = self.device.peer_stats(peer.wireguard_key).endpoint
                if current is not None:
                    owners[current] = key
            self._endpoint_owners = owners
        return self._endpoint_owners.get(addr)

    def events(self) -> list[Event]:
        self._device_events(self._now)
        out = self._events
        self._events = []
        return out

    # -- snapshots ---------------------------------------------------------------------

    def paths(self) -> dict[bytes, PathInfo]:
        """The path to every peer, by member key (sorted)."""
        return self.traversal.paths()

    def status(self) -> list[PeerStatus]:
        """One row per member this node knows (itself excluded), sorted by key."""
        rows: list[PeerStatus] = []
        paths = self.traversal.paths()
        for view in sorted(self.membership.members(), key=lambda v: v.public_key):
            key = view.public_key
            if key == self.identity.public_key:
                continue
            path = paths.get(key)
            peer = self._peers.get(key)
            stats = None if peer is None else self.device.peer_stats(peer.wireguard_key)
            rows.append(
                PeerStatus(
                    public_key=key,
                    state=view.state.value,
                    path=None if path is None else path.kind,
                    endpoint=None if path is None else path.endpoint,
                    relay=None if path is None else path.relay,
                    rtt=None if path is None else path.rtt,
                    last_handshake=None if stats is None else stats.last_handshake,
                    rx_bytes=0 if stats is None else stats.rx_bytes,
                    tx_bytes=0 if stats is None else stats.tx_bytes,
                )
            )
        return rows

    @property
    def nat(self) -> NatInfo:
        """The NAT facts this node advertises about itself."""
        return self._nat

    # -- membership → WireGuard peers --------------------------------------------------

    def _absorb(self, now: float) -> None:
        """Apply membership, STUN and device events, then queue them for the driver."""
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
            if isinstance(stun_event, MappedAddress):
                self._on_mapped(stun_event, now)
            elif isinstance(stun_event, PublicAddressChanged):
                self._redetect_nat(now)
        if self._prober is not None:
            for detected in self._prober.events():
                self._events.append(detected)
                self._on_nat_detected(detected, now)
        self._device_events(now)

    def _device_events(self, now: float) -> None:
        """Device events to traversal (roaming, given-up handshakes), then its decisions."""
        for event in self.device.events():
            self._events.append(event)
            if isinstance(event, EndpointChanged):
                member = self._member_of.get(event.public_key)
                if member is not None:
                    self.traversal.on_device_roamed(member, event.endpoint, now)
            elif isinstance(event, PeerUnreachable):
                member = self._member_of.get(event.public_key)
                if member is not None:
                    self.traversal.on_peer_unreachable(member, now)
        for key, endpoint in self.traversal.endpoint_changes():
            peer = self._peers.get(key)
            if peer is not None:
                self.device.set_endpoint(peer.wireguard_key, endpoint)
                self._endpoint_owners = None
        self._events.extend(self.traversal.events())

    def _admit(self, public_key: bytes, now: float) -> None:
        view = self.membership.member(public_key)
        if view is None or public_key == self.identity.public_key:
            return
        self._ask_member_for_stun(view, now)
        peer = self._peers.get(public_key)
        self._endpoint_owners = None
        if peer is not None:
            self.traversal.update_member(public_key, view.endpoints, view.nat, now)
            return
        try:
            wireguard_key = ed25519_public_to_x25519(public_key)
        except ValueError:
            return
        networks = self._claim_addresses(public_key)
        endpoint = _address_of(view.endpoints[0]) if view.endpoints else None
        self.device.add_peer(wireguard_key, allowed_ips=networks, endpoint=endpoint, now=now)
        self._peers[public_key] = _Peer(wireguard_key, networks)
        self._member_of[wireguard_key] = public_key
        self.traversal.add_member(public_key, view.endpoints, view.nat, now)
        self._events.append(
            PeerAdded(public_key, mesh_ipv4(public_key), mesh_ipv6(public_key), endpoint)
        )
        if self.config.eager_tunnels and not self.config.external_wireguard:
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
        self._heard_from.pop(public_key, None)
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        self._endpoint_owners = None
        self.device.remove_peer(peer.wireguard_key, now)
        del self._member_of[peer.wireguard_key]
        self.traversal.remove_member(public_key, now)
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

    # -- sealing for traversal ---------------------------------------------------------

    def _seal(self, peer: bytes, message: Message) -> bytes | None:
        try:
            return self.membership.seal_to(peer, message)
        except LocalProtocolError:
            return None

    # -- NAT discovery and our own endpoints -------------------------------------------

    def _monitor(self, server: Address, now: float) -> None:
        if server not in self._stun_servers:
            self._stun_servers.append(server)
            self.stun_client.monitor(server, now)

    def _ask_member_for_stun(self, view: swim.MemberView, now: float) -> None:
        """A public member answers STUN on its mesh port: use a few as servers."""
        if (
            self.config.nat is not None
            or view.nat.mapping is not NatMapping.NONE
            or not view.endpoints
            or len(self._member_stun) >= self.config.member_stun_servers
        ):
            return
        server = _address_of(view.endpoints[0])
        if server in self._stun_servers:
            return
        self._member_stun.append(server)
        self._monitor(server, now)
        if self._prober is None and len(self._member_stun) == self.config.member_stun_servers:
            self._start_nat_detection(self._member_stun, now)

    def _start_nat_detection(self, servers: Sequence[Address], now: float) -> None:
        local = [_address_of(e) for e in self._configured_endpoints]
        self._prober = NatProber(servers, local, self._entropy)
        self._prober.start(now)

    def _redetect_nat(self, now: float) -> None:
        """Our mapping changed (a new NAT, a rebooted router, roaming): what we gossip about
        our NAT may be wrong now, so run the detection again over the same servers."""
        if self._prober is not None:
            self._start_nat_detection(self._prober.servers, now)

    def _on_mapped(self, event: MappedAddress, now: float) -> None:
        """The first server we monitor tells the public mapping we advertise."""
        if not self._stun_servers or event.server != self._stun_servers[0]:
            return
        mapped = codec.canonical_endpoint(Endpoint(*event.mapped))
        if mapped != self._public_endpoint:
            self._public_endpoint = mapped
            self._publish_endpoints(now)

    def _on_nat_detected(self, detected: NatDetected, now: float) -> None:
        report = detected.report
        if self.config.nat is None:
            self._nat = dataclasses.replace(report.nat, allows_relay=self.config.allow_relay)
            self.membership.set_nat_info(self._nat, now)
        if report.public_endpoints and (not self._stun_servers or self._public_endpoint is None):
            self._public_endpoint = report.public_endpoints[0]
        self._publish_endpoints(now)

    def _publish_endpoints(self, now: float) -> None:
        """Advertise the public mapping first, then local addresses; on a change, sign a new
        record and push it straight to the peers we have tunnels with (roaming)."""
        endpoints: list[Endpoint] = []
        for endpoint in (self._public_endpoint, *self._configured_endpoints):
            if endpoint is not None and endpoint not in endpoints:
                endpoints.append(endpoint)
        self.traversal.set_local(endpoints, self._nat, now)
        own = self.membership.member(self.identity.public_key)
        if own is not None and own.endpoints == tuple(
            codec.canonical_endpoint(e) for e in endpoints
        ):
            return
        self.membership.set_advertised_endpoints(endpoints, now)
        self._push_endpoint_update()

    def _push_endpoint_update(self) -> None:
        own = self.membership.member(self.identity.public_key)
        if own is None:
            return
        record = codec.make_record(
            self.identity.public_key,
            own.incarnation,
            RecordStatus.ALIVE,
            own.endpoints,
            own.nat,
            self.identity.sign,
        )
        for key, peer in self._peers.items():
            address = self.traversal.destination(key)
            stats = self.device.peer_stats(peer.wireguard_key)
            if address is None or not stats.handshake_completed:
                continue
            datagram = self._seal(key, EndpointUpdate(record))
            sent = None if datagram is None else (datagram, address)
            if sent is not None and is_virtual(address):
                sent = self.traversal.wrap(sent[0], address)
            if sent is not None:
                self._outbox.append(sent)
                self.counters["endpoint_updates_sent"] += 1
