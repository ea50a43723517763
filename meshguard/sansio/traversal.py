"""NAT traversal: the path to every member (direct, punched, relayed, unreachable).

One ``Traversal`` per node keeps a path per member and the machinery that finds it:

- **Direct check.** Authenticated ``PunchProbe``s to the member's advertised endpoints; the
  first one that comes back (probe → reply) makes the path DIRECT.
- **Hole punching.** A rendezvous member we reach directly forwards our ``PunchRequest`` to
  the target and its ``PunchResponse`` back (adding the address it saw each side at, a fresh
  server-reflexive candidate); then both sides probe each other's candidates at the same time.
  A probe from an address not among the candidates (a new NAT mapping) is answered and probed
  back at once. When only the peer's NAT maps per destination, we also probe a bounded range
  of ports above the highest port it names at its public address (port prediction). The
  first round trip makes the path PUNCHED.
- **Fresh observation.** Behind a NAT that maps per destination, toward a member whose NAT
  maps endpoint-independently (it will predict our port), the node first asks for a fresh
  look at its NAT's port counter (``observe``: a STUN Binding request from a new local
  port, so its NAT allocates a new port whatever it has open) and waits up to
  ``fresh_wait`` for it (``fresh_mapping``); the punch then names that port and our probes
  follow at once, getting the next ports of a sequential allocator.
- **Opening probes.** Toward a member whose NAT has not opened toward us (not public, not
  heard from at that address) probes go out with a small IP TTL (``opening_ttl``): they
  open our own NAT and die before the member's, so its NAT never sees an unsolicited
  datagram from us (Linux masquerade would keep it in conntrack and give the member's own
  flow to us a random port). The punch target opens first and waits for the initiator's
  first probe (or ``opening_wait``) before probing at full TTL. ``opening_ttl`` also tells
  the node which membership datagrams to send that way; drivers get them from
  ``limited_datagrams_to_send``.
- **Relay.** When punching fails, WireGuard datagrams travel wrapped in ``RelayEnvelope``s
  through a member that allows relaying, chosen by measured round-trip time. The device
  sees a *virtual* endpoint for the peer (``virtual_address``), so roaming and replies need
  no special case; ``wrap`` turns datagrams to virtual endpoints into envelopes.
- **Upkeep.** Confirmed paths through a NAT get a probe every ``keepalive_interval``
  (which keeps the mapping open and notices a dead path); relayed and unreachable members
  are punched again with exponential backoff, and the device switches endpoint without a
  new handshake.

Relay wire rule: the origin seals ``RelayEnvelope(peer=destination, payload=wireguard)`` for
the destination (pair key origin–destination) and sends that datagram as the payload of a
``RelayEnvelope(peer=destination)`` to the relay. The relay forwards the payload unchanged as
``RelayEnvelope(peer=origin)``. A receiver tells the two legs apart by the payload's sender
key id: equal to ``peer`` → delivered to us (and authenticated end to end by the origin);
otherwise → a request to relay. See ``docs/hole-punching.md``.

Sans-IO: time comes in as ``now``, randomness from ``rng``; sealing and opening are injected
by the node (they need the pair keys of the membership machine).
"""

from __future__ import annotations

import enum
import heapq
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshguard.sansio.codec import DatagramKind, classify, key_id, peek_sender
from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.messages import (
    Endpoint,
    Message,
    NatFiltering,
    NatInfo,
    NatMapping,
    PunchProbe,
    PunchRequest,
    PunchResponse,
    RelayEnvelope,
)
from meshguard.sansio.types import Address, RandomSource

__all__ = [
    "COUNTERS",
    "PathChanged",
    "PathInfo",
    "PathKind",
    "Traversal",
    "TraversalConfig",
    "is_virtual",
    "virtual_address",
]

MAX_CANDIDATES = 16
_U64 = 1 << 64
_INF = float("inf")
_SYMMETRIC = (NatMapping.ADDRESS_DEPENDENT, NatMapping.ADDRESS_AND_PORT_DEPENDENT)
_FILTERING = (NatFiltering.ADDRESS_DEPENDENT, NatFiltering.ADDRESS_AND_PORT_DEPENDENT)
VIRTUAL_PREFIX = "relay:"

COUNTERS = (
    "probes_sent",
    "probe_replies_sent",
    "spray_probes_sent",
    "probe_round_trips",
    "probe_unexpected",
    "direct_checks",
    "direct_found",
    "punch_requests_sent",
    "punch_requests_forwarded",
    "punch_responses_forwarded",
    "punch_started",
    "fresh_observations",
    "toward_observations",
    "punch_postponed",
    "fresh_missed",
    "punch_succeeded",
    "punch_failed",
    "punch_no_rendezvous",
    "punch_replay",
    "punch_unexpected",
    "punch_refused",
    "punch_early",
    "punch_early_dropped",
    "opening_probes_sent",
    "rendezvous_full",
    "keepalives_sent",
    "paths_lost",
    "relay_chosen",
    "relay_none",
    "relay_wrapped",
    "relay_wrap_failed",
    "relay_forwarded",
    "relay_forwarded_bytes",
    "relay_delivered",
    "relay_refused",
    "relay_untrusted",
    "relay_unreachable",
    "relay_rate_limited",
    "relay_bad_payload",
)
"""Every counter name, present from the start."""


class PathKind(enum.Enum):
    """How this node reaches a member."""

    CONNECTING = "connecting"
    """A check or a punch is running and nothing has answered yet."""
    DIRECT = "direct"
    """An advertised endpoint of the member answers."""
    PUNCHED = "punched"
    """A hole-punching round trip found the address."""
    RELAYED = "relayed"
    """WireGuard datagrams go through ``PathInfo.relay``."""
    UNREACHABLE = "unreachable"
    """Nothing worked; retried with backoff."""


@dataclass(frozen=True, slots=True)
class PathInfo:
    """A snapshot of the path to one member.

    ``endpoint`` is where datagrams go: the member's address, or the relay's when RELAYED.
    ``rtt`` is the latest probe round trip on this path, in seconds.
    """

    kind: PathKind
    endpoint: Address | None
    relay: bytes | None
    rtt: float | None


@dataclass(frozen=True, slots=True)
class PathChanged:
    """The path to a member changed kind, address or relay."""

    public_key: bytes
    path: PathInfo


@dataclass(frozen=True, slots=True)
class TraversalConfig:
    """Timing and limits of path finding; the defaults suit Internet paths."""

    probe_interval: float = 0.2
    """Seconds between two rounds of probes in a check or a punch."""
    direct_rounds: int = 5
    """Rounds of a direct check before punching."""
    punch_rounds: int = 15
    """Rounds of probes once a punch is coordinated (3 s at the default interval)."""
    response_timeout: float = 2.0
    """How long the initiator waits for the PunchResponse through one rendezvous."""
    rendezvous_tries: int = 2
    """Rendezvous members tried per punch attempt."""
    punch_defer: float = 4.0
    """The member with the greater key waits this long for the other to start the punch."""
    spray_ports: int = 64
    """Port prediction: ports above a per-destination-mapping peer's observed port probed."""
    fresh_wait: float = 0.5
    """How long a punch from behind a per-destination NAT waits for the fresh observation of
    its port counter (``Traversal(observe=...)``) before it goes on without one."""
    fresh_quiet: float = 125.0
    """A fresh observation predicts the port of a *new* mapping: toward a member we sent
    probes to less than this long ago (RFC 4787's shortest UDP mapping timeout, 2 min, plus
    a little) our NAT may still hold the old one, so the punch waits until then."""
    fresh_settle: float = 60.0
    """How long after its first member a node that can observe waits (relayed) for its own
    NAT facts before punching toward members that would predict its port; it punches as
    soon as they arrive."""
    spray_always: int = 4
    """Ports above the peer's first candidate probed in every punch. When the peer's
    unsolicited probe reached our NAT first, our outbound flow's tuple clashes with it; old
    Linux kernels then took the next free port (+1), current ones a random port, which only
    a relay gets past (a NAT that drops unsolicited input avoids the clash altogether)."""
    opening_ttl: int = 2
    """IP TTL (IPv6 hop limit) of opening probes, 0 to send none. A probe to a member behind
    a NAT that has not opened toward us yet goes out with this TTL: it opens our own NAT (the
    first hop) and dies at the next router, before the member's NAT. A full-TTL probe there
    would leave a conntrack entry on that NAT (Linux masquerade without an input firewall),
    and the member's own flow to us would then leave from a random port."""
    opening_wait: float = 1.0
    """The target of a punch sends opening probes only, until it hears the initiator's first
    probe or this many seconds pass (then full-TTL probes, for a NAT the small TTL does not
    reach); the initiator probes at full TTL as soon as the target's answer arrives."""
    keepalive_interval: float = 25.0
    """Probe period on confirmed paths through a NAT (below common 30 s UDP timeouts)."""
    keepalive_misses: int = 3
    """Unanswered keepalives before the path counts as lost and is searched again."""
    retry_min: float = 15.0
    """First delay before punching again for a relayed or unreachable member..."""
    retry_max: float = 240.0
    """...doubling up to this."""
    relay_rate: float = 2000.0
    """Relayed datagrams per second accepted from one origin..."""
    relay_burst: float = 500.0
    """...with this burst."""
    recent_sessions: int = 4096
    """Punch session ids remembered against replays."""
    rendezvous_entries: int = 1024
    """Punches this node coordinates for others at once."""
    rendezvous_ttl: float = 10.0

    def __post_init__(self) -> None:
        if self.probe_interval <= 0 or self.response_timeout <= 0 or self.punch_defer < 0:
            raise LocalProtocolError("traversal intervals must be positive")
        if min(self.direct_rounds, self.punch_rounds, self.rendezvous_tries) < 1:
            raise LocalProtocolError("traversal rounds and tries must be at least 1")
        if min(self.spray_ports, self.spray_always) < 0 or self.keepalive_misses < 1:
            raise LocalProtocolError("spray counts ≥ 0 and keepalive_misses ≥ 1")
        if self.keepalive_interval <= 0 or not 0 < self.retry_min <= self.retry_max:
            raise LocalProtocolError("keepalive and retry intervals must be positive")
        if not 0 <= self.opening_ttl <= 255 or min(
            self.opening_wait, self.fresh_wait, self.fresh_quiet, self.fresh_settle
        ) < 0:
            raise LocalProtocolError("opening_ttl is 0..255, opening and fresh times ≥ 0")
        if self.relay_rate <= 0 or self.relay_burst < 1:
            raise LocalProtocolError("relay rate must be positive and burst at least 1")


def virtual_address(relay: bytes, peer: bytes) -> Address:
    """The device endpoint of ``peer`` reached through ``relay``: never a real IP address."""
    return (f"{VIRTUAL_PREFIX}{relay.hex()}:{peer.hex()}", 0)


def is_virtual(addr: Address) -> bool:
    return addr[1] == 0 and addr[0].startswith(VIRTUAL_PREFIX)


class _Purpose(enum.Enum):
    DIRECT = "direct"
    PUNCH = "punch"


@dataclass(slots=True)
class _Session:
    """One run of probes toward ``peer`` (a direct check, or either side of a punch)."""

    session_id: int
    peer: bytes
    purpose: _Purpose
    targets: list[Address]
    spray: list[Address] = field(default_factory=list)
    predicting: bool = False
    rendezvous: bytes | None = None
    tried: list[bytes] = field(default_factory=list)
    rounds_left: int = 0
    next_round: float | None = None
    """When the next round of probes goes out; None while waiting for the PunchResponse."""
    expires: float = 0.0
    started: float = 0.0
    pending: dict[int, tuple[float, Address, bool]] = field(default_factory=dict)
    """Probe sequence → (sent at, target, whether it was an opening probe)."""
    scheduled: float = _INF
    open_at: float = _INF
    """From then on every target gets full-TTL probes (before: only those known open)."""
    full: list[Address] = field(default_factory=list)
    """Targets that got a full-TTL probe."""
    opening: list[Address] = field(default_factory=list)
    """Targets that got an opening probe (their NAT was not known open toward us)."""
    fresh_until: float | None = None
    """Waiting for a fresh observation of our NAT's port counter until then."""
    fresh: Endpoint | None = None
    """The fresh observation this punch named (first among our candidates)."""
    toward: Address | None = None
    """A member at the peer's public IP we asked from the mesh port too..."""
    toward_mapped: Endpoint | None = None
    """...and what it saw: our NAT's mapping toward that IP, the one the peer sees if our
    NAT maps per destination address (not port)."""
    answer: tuple[bytes, Address, PunchRequest] | None = None
    """Target side: the rendezvous and request to answer once the observation is in."""


@dataclass(slots=True)
class _Path:
    key: bytes
    endpoints: tuple[Address, ...]
    nat: NatInfo
    kind: PathKind = PathKind.CONNECTING
    endpoint: Address | None = None
    relay: bytes | None = None
    rtt: float | None = None
    session: int | None = None
    """Our own check or punch for this member (the target side's sessions are not here)."""
    found_directly: bool = False
    """The working address answered a direct check (not a rendezvous punch)."""
    predicted: bool = False
    """A punch already tried port prediction toward this member (its NAT maps per
    destination) or named a fresh port of ours for it to predict from (ours does), and
    failed: retries neither spray nor observe again (the NAT probably allocates at random)."""
    retry_at: float | None = None
    retry_delay: float = 0.0
    probed_at: float = -_INF
    """When we last sent the member a probe (our NAT's mapping toward it is that fresh)."""
    keepalive_id: int = 0
    keepalive_at: float | None = None
    keepalive_seq: int | None = None
    keepalive_sent: float = 0.0
    misses: int = 0
    bad_relays: dict[bytes, None] = field(default_factory=dict)
    scheduled: float = _INF
    peer_punch_failed: float = -_INF
    """When a punch the member started toward us last failed."""

    def info(self) -> PathInfo:
        return PathInfo(self.kind, self.endpoint, self.relay, self.rtt)


@dataclass(slots=True)
class _Rendezvous:
    initiator: bytes
    initiator_address: Address
    target: bytes
    expires: float


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


def _address(endpoint: Endpoint) -> Address:
    return (endpoint.host, endpoint.port)


def _endpoint(addr: Address) -> Endpoint | None:
    """``addr`` as a wire endpoint, or None when it is no IP literal with a valid port."""
    host, port = addr
    if not 1 <= port <= 0xFFFF:
        return None
    try:
        return Endpoint(str(ipaddress.ip_address(host)), port)
    except ValueError:
        return None


class Traversal:
    """Paths to every member of one node (see the module docstring)."""

    def __init__(
        self,
        own_key: bytes,
        *,
        config: TraversalConfig,
        rng: RandomSource,
        seal: Callable[[bytes, Message], bytes | None],
        open_datagram: Callable[[bytes], tuple[bytes, Message] | None],
        allow_relay: bool = False,
        observe: Callable[[float, Address | None], bool] | None = None,
    ) -> None:
        """``seal(peer, message)`` makes the datagram for a trusted member (None if it
        cannot); ``open_datagram`` authenticates one from a trusted member; ``allow_relay``
        lets other members relay through this node; ``observe(now, toward)`` asks for a
        fresh observation of our public mapping from a new local port (answered through
        ``fresh_mapping``) and, with ``toward``, for our mesh port's mapping as that member
        sees it (``mapping_toward``); False when it cannot be had."""
        self._own = own_key
        self._own_id = key_id(own_key)
        self._config = config
        self._rng = rng
        self._seal = seal
        self._open = open_datagram
        self._allow_relay = allow_relay
        self._observe = observe
        self._settled_at: float | None = None
        """Until when we wait for our own NAT facts (``fresh_settle`` after the first member)."""
        self._candidates: tuple[Endpoint, ...] = ()
        self._nat = NatInfo()
        self._paths: dict[bytes, _Path] = {}
        self._sessions: dict[int, _Session] = {}
        self._recent: dict[int, None] = {}
        self._rendezvous: dict[int, _Rendezvous] = {}
        self._heard: dict[bytes, Address] = {}
        self._virtual: dict[Address, tuple[bytes, bytes]] = {}
        self._buckets: dict[bytes, _Bucket] = {}
        self._awaiting_rendezvous: dict[bytes, None] = {}
        """Members whose punch found no rendezvous: retried as soon as one appears."""
        self._early_initiators: dict[bytes, float] = {}
        """Keys that asked to punch us before we knew them as members, until when that
        counts: when one becomes a member we punch toward it at once (it is waiting)."""
        self._timers: list[tuple[float, int, bytes | int]] = []
        self._timer_order = 0
        self._outbox: list[tuple[bytes, Address]] = []
        self._limited: list[tuple[bytes, Address, int]] = []
        self._endpoint_changes: list[tuple[bytes, Address]] = []
        self._deliveries: list[tuple[bytes, Address]] = []
        self._relayed_messages: list[tuple[bytes, Message, Address]] = []
        self._events: list[PathChanged] = []
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------------ local facts

    def set_local(
        self, candidates: Sequence[Endpoint], nat: NatInfo, now: float | None = None
    ) -> None:
        """Our own candidates (public mapping first, then LAN addresses) and NAT facts. When
        the facts become known (at ``now``), punches postponed for them start."""
        self._candidates = tuple(candidates)[:MAX_CANDIDATES]
        learned = self._nat.mapping is NatMapping.UNKNOWN and nat.mapping is not NatMapping.UNKNOWN
        self._nat = nat
        if not learned or now is None or self._observe is None:
            return
        for path in self._paths.values():
            if (
                path.retry_at is not None
                and path.session is None
                and path.kind not in (PathKind.DIRECT, PathKind.PUNCHED)
                and self._predicts_us(path)
            ):
                path.retry_at = now
                self._schedule_path(path)

    # ------------------------------------------------------------------ members

    def add_member(
        self, key: bytes, endpoints: Sequence[Endpoint], nat: NatInfo, now: float
    ) -> Address | None:
        """A member became a peer; returns the device endpoint to start with."""
        path = self._paths.get(key)
        if path is not None:
            self.update_member(key, endpoints, nat, now)
            return path.endpoint
        if self._settled_at is None:
            self._settled_at = now + self._config.fresh_settle
        addresses = tuple(_address(e) for e in endpoints)
        path = _Path(key, addresses, nat, endpoint=addresses[0] if addresses else None)
        path.keepalive_id = self._rng.getrandbits(64)
        self._paths[key] = path
        if self._early_initiators.pop(key, -_INF) >= now:
            self._start_punch(path, now, defer=False)
        else:
            self._start_check(path, now)
        return path.endpoint

    def update_member(
        self, key: bytes, endpoints: Sequence[Endpoint], nat: NatInfo, now: float
    ) -> None:
        """A member signed a new record. New endpoints (roaming): a working path whose
        address is no longer advertised is checked against the new ones (the first to answer
        wins, so a path that still works stays); a relayed one tries to upgrade at once."""
        path = self._paths.get(key)
        if path is None:
            return
        addresses = tuple(_address(e) for e in endpoints)
        path.nat = nat
        if addresses == path.endpoints:
            return
        path.endpoints = addresses
        if path.kind is PathKind.RELAYED:
            path.retry_delay = 0.0
            path.retry_at = now
            self._schedule_path(path)
            return
        if path.kind in (PathKind.DIRECT, PathKind.PUNCHED) and path.endpoint is not None:
            if path.endpoint not in addresses:
                self._cancel_own_session(path)
                self._start_direct(path, [*addresses, path.endpoint], now)
            elif path.kind is PathKind.PUNCHED and self._is_direct(path, path.endpoint):
                self._set_kind(path, PathKind.DIRECT, path.endpoint, None, rtt=path.rtt)
            return
        if addresses:
            self._set_endpoint(path, addresses[0])
        self._cancel_own_session(path)
        self._set_kind(path, PathKind.CONNECTING, path.endpoint, None)
        self._start_check(path, now)

    def remove_member(self, key: bytes, now: float) -> None:
        path = self._paths.pop(key, None)
        self._awaiting_rendezvous.pop(key, None)
        self._heard.pop(key, None)
        self._buckets.pop(key, None)
        for session_id in [s for s, v in self._sessions.items() if v.peer == key]:
            del self._sessions[session_id]
        if path is not None and path.relay is not None:
            self._virtual.pop(virtual_address(path.relay, key), None)
        for virtual in [v for v, route in self._virtual.items() if key in route]:
            del self._virtual[virtual]
        for other in list(self._paths.values()):
            if other.relay == key:
                self._path_lost(other, now)

    def destination(self, key: bytes) -> Address | None:
        """Where a meshguard datagram for member ``key`` goes: its direct or punched address,
        or its virtual address when relayed (``wrap`` sends it through the relay); None while
        no path is confirmed.

        The node routes membership datagrams by member, not by the address SWIM chose: behind
        NATs two members can advertise the same private address, and a member behind a NAT
        that maps per destination is only reached at its punched address.
        """
        path = self._paths.get(key)
        if path is None:
            return None
        if path.kind in (PathKind.DIRECT, PathKind.PUNCHED):
            return path.endpoint
        if path.kind is PathKind.RELAYED and path.relay is not None:
            return virtual_address(path.relay, key)
        return None

    def interim_relay(self, key: bytes) -> Address | None:
        """A virtual address through a relay for member ``key`` while it has no path
        (connecting or unreachable), None otherwise or when no member relays for us.

        The node sends membership datagrams there as well as to SWIM's address: a probe
        to a member behind a filtering NAT reaches it while its path is still searched for,
        instead of failing and making the member suspect. The path and the device endpoint
        stay as they are.
        """
        path = self._paths.get(key)
        if path is None or path.kind not in (PathKind.CONNECTING, PathKind.UNREACHABLE):
            return None
        relay = self._choose_relay(path)
        if relay is None:
            return None
        virtual = virtual_address(relay, key)
        self._virtual.setdefault(virtual, (relay, key))
        return virtual

    def heard(self, sender: bytes, addr: Address) -> None:
        """An authenticated meshguard datagram from ``sender`` came from ``addr``."""
        self._heard[sender] = addr

    def opening_ttl(self, key: bytes, addr: Address) -> int | None:
        """The IP TTL for a datagram to member ``key`` at ``addr``: ``opening_ttl`` while no
        path is confirmed and the member may sit behind a NAT that has not opened toward us
        (we have not heard it from ``addr``); None (full TTL) otherwise, and for non-members.

        A full-TTL datagram that reaches such a NAT first leaves a conntrack entry there;
        the member's own flow to us then clashes with it and leaves from a random port.
        """
        path = self._paths.get(key)
        if (
            path is None
            or path.kind in (PathKind.DIRECT, PathKind.PUNCHED, PathKind.RELAYED)
            or not self._config.opening_ttl
        ):
            return None
        if self._open_toward(path, addr):
            return None
        return self._config.opening_ttl

    def _open_toward(self, path: _Path, addr: Address) -> bool:
        """Whether a datagram to ``addr`` can pass the member's NAT without leaving a
        conntrack entry there: it has none, lets everything in, or sent to us from there."""
        nat = path.nat
        return (
            nat.mapping is NatMapping.NONE
            or nat.filtering is NatFiltering.ENDPOINT_INDEPENDENT
            or self._heard.get(path.key) == addr
        )

    def fresh_mapping(self, mapped: Endpoint, now: float) -> None:
        """The observation ``observe`` asked for: a new local port was seen at ``mapped``.
        Punches waiting for it go on, naming it first among our candidates."""
        for session in list(self._sessions.values()):
            if session.fresh_until is not None and session.fresh is None:
                session.fresh = mapped
                self.counters["fresh_observations"] += 1
                if session.toward is None or session.toward_mapped is not None:
                    self._fresh_done(session, now)

    def mapping_toward(self, member: Address, mapped: Endpoint, now: float) -> None:
        """The member at ``member`` (at a peer's public IP) saw our mesh port at ``mapped``:
        the punch waiting for it names that too (the peer probes every candidate)."""
        for session in list(self._sessions.values()):
            if (
                session.fresh_until is not None
                and session.toward == member
                and session.toward_mapped is None
            ):
                session.toward_mapped = mapped
                self.counters["toward_observations"] += 1
                if session.fresh is not None:
                    self._fresh_done(session, now)

    def on_peer_unreachable(self, key: bytes, now: float) -> None:
        """WireGuard gave up handshaking on the current path: look for another one."""
        path = self._paths.get(key)
        if path is None:
            return
        if path.relay is not None:
            path.bad_relays[path.relay] = None
        self._path_lost(path, now)

    def on_device_roamed(self, key: bytes, addr: Address, now: float) -> None:
        """WireGuard moved the peer's endpoint after authenticated traffic from ``addr``."""
        path = self._paths.get(key)
        if path is None or (path.endpoint == addr and path.relay is None):
            return
        relayed = self._virtual.get(addr)
        if relayed is not None:
            relay = relayed[0]
            if path.kind in (PathKind.DIRECT, PathKind.PUNCHED) and path.endpoint is not None:
                self._set_endpoint(path, path.endpoint)
                return
            self._cancel_own_session(path)
            self._set_kind(path, PathKind.RELAYED, self.route(relay), relay)
            if path.retry_at is None:
                self._fall_back_retry(path, now)
            return
        if is_virtual(addr):
            return
        if path.kind in (PathKind.DIRECT, PathKind.PUNCHED):
            self._set_kind(path, path.kind, addr, None, rtt=path.rtt)
            return
        kind = PathKind.DIRECT if addr in path.endpoints else PathKind.PUNCHED
        self._cancel_own_session(path)
        self._set_kind(path, kind, addr, None)
        self._confirmed(path, now)

    # ------------------------------------------------------------------ queries

    def paths(self) -> dict[bytes, PathInfo]:
        return {key: path.info() for key, path in sorted(self._paths.items())}

    def route(self, key: bytes) -> Address | None:
        """Where to send a meshguard datagram to ``key`` directly (None when relayed)."""
        path = self._paths.get(key)
        if path is not None and path.kind in (PathKind.DIRECT, PathKind.PUNCHED):
            return path.endpoint
        return None

    def has_virtual(self) -> bool:
        return bool(self._virtual)

    # ------------------------------------------------------------------ output

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def limited_datagrams_to_send(self) -> list[tuple[bytes, Address, int]]:
        """Opening probes: (datagram, address, IP TTL). Send them before ``datagrams_to_send``
        with that TTL (hop limit); a driver that cannot may send them as ordinary datagrams."""
        out, self._limited = self._limited, []
        return out

    def endpoint_changes(self) -> list[tuple[bytes, Address]]:
        """(member, address) the device endpoint must move to, in order."""
        out, self._endpoint_changes = self._endpoint_changes, []
        return out

    def deliveries(self) -> list[tuple[bytes, Address]]:
        """Relayed WireGuard datagrams for the device, with the virtual source address."""
        out, self._deliveries = self._deliveries, []
        return out

    def relayed_messages(self) -> list[tuple[bytes, Message, Address]]:
        """Relayed membership messages: (origin, message, the origin's first advertised
        endpoint, as the address to hand the membership machine; the node sends replies by
        member, so they go back through the relay)."""
        out, self._relayed_messages = self._relayed_messages, []
        return out

    def events(self) -> list[PathChanged]:
        out, self._events = self._events, []
        return out

    def wrap(self, datagram: bytes, addr: Address) -> tuple[bytes, Address] | None:
        """A datagram for a virtual endpoint, as an envelope to the relay: a WireGuard
        datagram inside an envelope sealed for the peer, or our own sealed meshguard
        datagram for the peer as it is."""
        route = self._virtual.get(addr)
        relay_address = None if route is None else self.route(route[0])
        if route is None or relay_address is None:
            self.counters["relay_wrap_failed"] += 1
            return None
        relay, peer = route
        if classify(datagram) is DatagramKind.WIREGUARD:
            inner = self._seal(peer, RelayEnvelope(peer, datagram))
        elif _sender_id(datagram) == self._own_id:
            inner = datagram
        else:
            inner = None
        outer = None if inner is None else self._seal(relay, RelayEnvelope(peer, inner))
        if outer is None:
            self.counters["relay_wrap_failed"] += 1
            return None
        self.counters["relay_wrapped"] += 1
        return outer, relay_address

    # ------------------------------------------------------------------ input

    def on_message(self, sender: bytes, message: Message, addr: Address, now: float) -> bool:
        """An authenticated traversal message from trusted ``sender``; False if not ours."""
        if isinstance(message, PunchProbe):
            self._on_probe(sender, message, addr, now)
        elif isinstance(message, PunchRequest):
            self._on_request(sender, message, addr, now)
        elif isinstance(message, PunchResponse):
            self._on_response(sender, message, addr, now)
        elif isinstance(message, RelayEnvelope):
            self._on_envelope(sender, message, now)
        else:
            return False
        return True

    # ------------------------------------------------------------------ timers

    def _owner(self, ref: bytes | int) -> _Path | _Session | None:
        """The path (keyed by member) or session (keyed by id) a timer entry is for."""
        if isinstance(ref, bytes):
            return self._paths.get(ref)
        return self._sessions.get(ref)

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers:
            at, _, ref = timers[0]
            owner = self._owner(ref)
            if owner is not None and owner.scheduled == at:
                return at
            heapq.heappop(timers)
        return None

    def on_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, ref = heapq.heappop(timers)
            owner = self._owner(ref)
            if owner is None or owner.scheduled != at:
                continue
            owner.scheduled = _INF
            if isinstance(owner, _Path):
                self._tick_path(owner, now)
                self._schedule_path(owner)
            else:
                self._tick_session(owner, now)
        for session_id in [s for s, r in self._rendezvous.items() if r.expires <= now]:
            del self._rendezvous[session_id]

    def _push_timer(self, at: float, ref: bytes | int) -> None:
        self._timer_order += 1
        heapq.heappush(self._timers, (at, self._timer_order, ref))

    def _schedule_path(self, path: _Path) -> None:
        at = min(
            path.retry_at if path.retry_at is not None else _INF,
            path.keepalive_at if path.keepalive_at is not None else _INF,
        )
        if at < path.scheduled:
            path.scheduled = at
            self._push_timer(at, path.key)

    def _schedule_session(self, session: _Session) -> None:
        at = session.expires if session.next_round is None else session.next_round
        if at != session.scheduled:
            session.scheduled = at
            self._push_timer(at, session.session_id)

    # ------------------------------------------------------------------ path machine

    def _tick_path(self, path: _Path, now: float) -> None:
        if path.retry_at is not None and path.retry_at <= now:
            path.retry_at = None
            if path.session is None and path.kind not in (PathKind.DIRECT, PathKind.PUNCHED):
                path.bad_relays.clear()
                self._start_punch(path, now, defer=False)
        if path.keepalive_at is not None and path.keepalive_at <= now:
            path.keepalive_at = None
            if path.kind not in (PathKind.DIRECT, PathKind.PUNCHED) or path.endpoint is None:
                return
            if path.keepalive_seq is not None:
                path.misses += 1
                if path.misses >= self._config.keepalive_misses:
                    self.counters["paths_lost"] += 1
                    self._path_lost(path, now)
                    return
            path.keepalive_seq = self._rng.getrandbits(64)
            path.keepalive_sent = now
            self._send(
                path.key, PunchProbe(path.keepalive_id, path.keepalive_seq, False), path.endpoint
            )
            self.counters["keepalives_sent"] += 1
            path.keepalive_at = now + self._config.keepalive_interval

    def _needs_punch(self, path: _Path) -> bool:
        """The peer's NAT filters and we are behind one too: probing it alone is futile."""
        peer = path.nat
        peer_filters = peer.filtering in _FILTERING or peer.mapping in _SYMMETRIC
        return peer_filters and self._nat.mapping is not NatMapping.NONE

    def _start_check(self, path: _Path, now: float) -> None:
        """A direct check of the advertised endpoints, the current one and the address we
        last heard the member from (its NAT is open toward us there: it may have probed us
        before it became a member here); a punch when its NAT filters and nothing was heard."""
        if path.session is not None:
            return
        targets = list(path.endpoints)
        heard = self._heard.get(path.key)
        for addr in (path.endpoint, heard):
            if addr is not None and addr not in targets and not is_virtual(addr):
                targets.append(addr)
        if not targets or (
            (self._needs_punch(path) or self._predicts_us(path)) and heard is None
        ):
            self._start_punch(path, now, defer=True)
            return
        self._start_direct(path, targets, now)

    def _start_direct(self, path: _Path, targets: list[Address], now: float) -> None:
        """Probe ``targets`` for a few rounds; the current path stays until one answers."""
        session = self._new_session(path.key, _Purpose.DIRECT, targets, now)
        session.rounds_left = self._config.direct_rounds
        session.next_round = now
        path.session = session.session_id
        self.counters["direct_checks"] += 1
        self._tick_session(session, now)

    def _check_reflexive(self, path: _Path, addr: Address, now: float) -> None:
        """The member probed us from ``addr`` while we have no path: probe back there.

        Its NAT just opened a mapping toward us, so this usually completes at once; it also
        settles asymmetric views (it found us, we did not find it). While our own punch
        waits for its PunchResponse, the probe is the peer's side of that punch arriving
        first (the rendezvous is a longer way round): probe back within the punch, or the
        peer's round trip completes and ours never does.
        """
        if path.session is not None:
            session = self._sessions.get(path.session)
            if session is not None and session.next_round is None and not session.targets:
                self._probe(session, addr, now)
                return
            self._cancel_own_session(path)
        self._start_direct(path, [addr], now)

    def _start_punch(self, path: _Path, now: float, *, defer: bool) -> None:
        """Punch through a rendezvous; with ``defer``, the greater key lets the other start.

        Nothing while the member's own punch toward us runs: when it ends the path is
        punched, or relayed with a retry (``_session_failed``). When that punch failed within
        ``retry_min``, ours would meet the same NATs: relay at once instead and punch at the
        next retry (a record update that restarted our search meanwhile would otherwise cost
        a defer and a punch)."""
        if path.session is not None:
            return
        if any(s.peer == path.key for s in self._sessions.values()):
            return
        if defer and now - path.peer_punch_failed < self._config.retry_min:
            self._fall_back(path, now)
            return
        if defer and self._own > path.key:
            path.retry_at = now + self._config.punch_defer
            self._schedule_path(path)
            return
        later = self._fresh_later(path, now)
        if later is not None:
            self.counters["punch_postponed"] += 1
            if path.kind is not PathKind.RELAYED:
                self._fall_back(path, now)
            if path.kind is not PathKind.RELAYED:
                later = min(later, now + self._config.response_timeout)
            path.retry_at = later
            self._schedule_path(path)
            return
        session = self._new_session(path.key, _Purpose.PUNCH, [], now)
        path.session = session.session_id
        if not self._wait_fresh(path, session, now):
            self._ask_rendezvous(path, session, now)

    def _predicts_us(self, path: _Path) -> bool:
        """The member will predict our port from a fresh observation (we can make one, our
        NAT maps per destination or is not known yet, its maps endpoint-independently and
        may filter, and no such punch toward it failed): nothing of ours may reach its
        address before that punch, or our NAT's mapping toward it is an old one."""
        return (
            self._observe is not None
            and not path.predicted
            and self._nat.mapping in (*_SYMMETRIC, NatMapping.UNKNOWN)
            and path.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT
            and path.nat.filtering is not NatFiltering.ENDPOINT_INDEPENDENT
        )

    def _settled_or(self, now: float) -> float:
        return now if self._settled_at is None else self._settled_at

    def _fresh_later(self, path: _Path, now: float) -> float | None:
        """When a punch the member will predict our port for can start, if not now: once
        our NAT facts are known (at most ``fresh_settle``), and ``fresh_quiet`` after our
        last probe to it."""
        if not self._predicts_us(path):
            return None
        if self._nat.mapping is NatMapping.UNKNOWN:
            settled = self._settled_or(now)
            return settled if now < settled else None
        quiet = path.probed_at + self._config.fresh_quiet
        return quiet if now < quiet else None

    def keeps_quiet(self, key: bytes) -> bool:
        """Whether the node must send member ``key`` nothing directly for now (membership
        datagrams go through a relay only): its path is not found yet and it will predict
        our port (see ``_predicts_us``)."""
        path = self._paths.get(key)
        return (
            path is not None
            and path.kind in (PathKind.CONNECTING, PathKind.UNREACHABLE)
            and self._predicts_us(path)
        )

    def _wait_fresh(self, path: _Path, session: _Session, now: float) -> bool:
        """Ask for a fresh observation of our port counter before the punch, when the member
        will predict our port from what we name: our NAT maps per destination, its does
        not, and no such punch toward it failed before. False: go on now."""
        if (
            self._observe is None
            or path.predicted
            or self._nat.mapping not in _SYMMETRIC
            or path.nat.mapping is not NatMapping.ENDPOINT_INDEPENDENT
            or path.nat.filtering is NatFiltering.ENDPOINT_INDEPENDENT
        ):
            return False
        toward = self._member_at_ip_of(path)
        if not self._observe(now, toward):
            return False
        session.toward = toward
        session.fresh_until = now + self._config.fresh_wait
        session.next_round = None
        session.expires = session.fresh_until
        self._schedule_session(session)
        return True

    def _member_at_ip_of(self, path: _Path) -> Address | None:
        """Where we reach another member at the public IP the member of ``path`` advertises
        first (its NAT neighbour), if any: our NAT's mapping toward that IP may be old, and
        a NAT that maps per destination address uses it toward the member too."""
        if not path.endpoints:
            return None
        host = path.endpoints[0][0]
        for key, other in self._paths.items():
            if (
                key != path.key
                and other.kind in (PathKind.DIRECT, PathKind.PUNCHED)
                and other.endpoint is not None
                and other.endpoint[0] == host
            ):
                return other.endpoint
        return None

    def _fresh_done(self, session: _Session, now: float) -> None:
        """The observation came (``session.fresh``) or the wait is over: start the punch."""
        session.fresh_until = None
        if session.fresh is None:
            self.counters["fresh_missed"] += 1
        answer, session.answer = session.answer, None
        if answer is not None:
            rendezvous, address, request = answer
            self._answer_request(rendezvous, address, request, session, now)
            return
        path = self._paths.get(session.peer)
        if path is None or path.session != session.session_id:
            self._sessions.pop(session.session_id, None)
            return
        self._ask_rendezvous(path, session, now)

    def _own_candidates(self, session: _Session) -> tuple[Endpoint, ...]:
        """What we tell the member: the fresh observation first (if any), our mapping toward
        its IP (if observed), then ours."""
        named: list[Endpoint] = []
        for endpoint in (session.fresh, session.toward_mapped, *self._candidates):
            if endpoint is not None and endpoint not in named:
                named.append(endpoint)
        return tuple(named[:MAX_CANDIDATES])

    def _ask_rendezvous(self, path: _Path, session: _Session, now: float) -> None:
        rendezvous = self._choose_rendezvous(path.key, session.tried)
        if rendezvous is None or len(session.tried) >= self._config.rendezvous_tries:
            if rendezvous is None:
                self.counters["punch_no_rendezvous"] += 1
                self._awaiting_rendezvous[path.key] = None
            self._session_failed(session, now)
            return
        session.tried.append(rendezvous)
        session.rendezvous = rendezvous
        session.next_round = None
        session.expires = now + self._config.response_timeout
        address = self.route(rendezvous)
        assert address is not None
        request = PunchRequest(
            session.session_id, self._own, path.key, self._own_candidates(session)
        )
        self._send(rendezvous, request, address)
        self.counters["punch_requests_sent"] += 1
        self._schedule_session(session)

    def _choose_rendezvous(self, target: bytes, tried: Sequence[bytes]) -> bytes | None:
        """A member we reach directly, public ones first, then by round-trip time."""
        best: tuple[bool, float, bytes] | None = None
        for key, path in self._paths.items():
            if key == target or key in tried or path.kind is not PathKind.DIRECT:
                continue
            rtt = _INF if path.rtt is None else path.rtt
            rank = (path.nat.mapping is not NatMapping.NONE, rtt, key)
            if best is None or rank < best:
                best = rank
        return None if best is None else best[2]

    def _choose_relay(self, path: _Path) -> bytes | None:
        """A member that relays and that we reach without a relay, by round-trip time."""
        best: tuple[float, bytes] | None = None
        for key, other in self._paths.items():
            if (
                key == path.key
                or key in path.bad_relays
                or not other.nat.allows_relay
                or other.kind not in (PathKind.DIRECT, PathKind.PUNCHED)
            ):
                continue
            rank = (other.rtt if other.rtt is not None else _INF, key)
            if best is None or rank < best:
                best = rank
        return None if best is None else best[1]

    def _path_lost(self, path: _Path, now: float) -> None:
        """The path stopped working: search again from the start."""
        self._cancel_own_session(path)
        path.keepalive_at = None
        path.keepalive_seq = None
        path.misses = 0
        if path.relay is not None:
            self._virtual.pop(virtual_address(path.relay, path.key), None)
        endpoint = path.endpoints[0] if path.endpoints else None
        if endpoint is not None:
            self._set_endpoint(path, endpoint)
        self._set_kind(path, PathKind.CONNECTING, endpoint, None)
        path.retry_at = None
        self._start_check(path, now)

    def _fall_back_retry(self, path: _Path, now: float) -> None:
        """Punch again later, each time waiting twice as long (with jitter)."""
        delay = path.retry_delay
        path.retry_delay = min(self._config.retry_max, max(self._config.retry_min, 2 * delay))
        path.retry_at = now + path.retry_delay * self._rng.uniform(0.8, 1.0)
        self._schedule_path(path)

    def _fall_back(self, path: _Path, now: float) -> None:
        """Punching failed: relay if anyone can, and try again later either way."""
        self._fall_back_retry(path, now)
        if (
            path.kind is PathKind.RELAYED
            and path.relay is not None
            and self.route(path.relay) is not None
        ):
            return
        relay = self._choose_relay(path)
        if relay is None:
            self.counters["relay_none"] += 1
            self._set_kind(path, PathKind.UNREACHABLE, path.endpoint, None)
            return
        self.counters["relay_chosen"] += 1
        virtual = virtual_address(relay, path.key)
        self._virtual[virtual] = (relay, path.key)
        self._endpoint_changes.append((path.key, virtual))
        self._set_kind(path, PathKind.RELAYED, self.route(relay), relay)

    def _confirmed(self, path: _Path, now: float) -> None:
        """A working non-relayed path: stop retrying, keep the NAT mapping open; a new
        direct path may be the rendezvous that punches waited for."""
        self._awaiting_rendezvous.pop(path.key, None)
        if path.kind is PathKind.DIRECT and self._awaiting_rendezvous:
            for key in list(self._awaiting_rendezvous):
                waiting = self._paths.get(key)
                if waiting is not None and waiting.session is None:
                    waiting.retry_at = now + self._rng.uniform(0.0, self._config.probe_interval)
                    self._schedule_path(waiting)
            self._awaiting_rendezvous.clear()
        path.retry_at = None
        path.retry_delay = 0.0
        path.misses = 0
        path.keepalive_seq = None
        path.bad_relays.clear()
        path.keepalive_at = (
            now + self._config.keepalive_interval if self._keeps_alive(path) else None
        )
        self._schedule_path(path)

    @staticmethod
    def _is_direct(path: _Path, addr: Address) -> bool:
        """An advertised endpoint found by a direct check, or one of a public member."""
        return addr in path.endpoints and (
            path.found_directly or path.nat.mapping is NatMapping.NONE
        )

    def _keeps_alive(self, path: _Path) -> bool:
        """Whether we send the keepalives of this path: the side behind a NAT does; when
        both are (or may be), the smaller key."""
        own_public = self._nat.mapping is NatMapping.NONE
        peer_public = path.nat.mapping is NatMapping.NONE
        if own_public and peer_public:
            return False
        if own_public != peer_public:
            return not own_public
        return self._own < path.key

    def _set_endpoint(self, path: _Path, addr: Address) -> None:
        self._endpoint_changes.append((path.key, addr))

    def _set_kind(
        self,
        path: _Path,
        kind: PathKind,
        endpoint: Address | None,
        relay: bytes | None,
        *,
        rtt: float | None = None,
    ) -> None:
        if path.relay is not None and path.relay != relay:
            self._virtual.pop(virtual_address(path.relay, path.key), None)
        before = path.info()
        path.kind, path.endpoint, path.relay, path.rtt = kind, endpoint, relay, rtt
        if (before.kind, before.endpoint, before.relay) != (kind, endpoint, relay):
            self._events.append(PathChanged(path.key, path.info()))

    # ------------------------------------------------------------------ sessions

    def _new_session(
        self, peer: bytes, purpose: _Purpose, targets: list[Address], now: float
    ) -> _Session:
        session_id = self._rng.getrandbits(64)
        while session_id in self._sessions or session_id == 0:
            session_id = self._rng.getrandbits(64)
        session = _Session(session_id, peer, purpose, targets, started=now, expires=now)
        self._sessions[session_id] = session
        self._remember(session_id)
        return session

    def _remember(self, session_id: int) -> None:
        self._recent[session_id] = None
        if len(self._recent) > self._config.recent_sessions:
            del self._recent[next(iter(self._recent))]

    def _cancel_own_session(self, path: _Path) -> None:
        if path.session is not None:
            self._sessions.pop(path.session, None)
            path.session = None

    def _start_probing(self, session: _Session, candidates: Sequence[Endpoint], now: float) -> None:
        path = self._paths[session.peer]
        targets: list[Address] = []
        for candidate in candidates:
            addr = _address(candidate)
            if addr not in targets:
                targets.append(addr)
        session.targets = targets
        session.spray = self._spray(path, targets)
        session.predicting = len(session.spray) > self._config.spray_always
        session.rounds_left = self._config.punch_rounds
        session.next_round = now
        self.counters["punch_started"] += 1
        self._tick_session(session, now)

    def _spray(self, path: _Path, targets: list[Address]) -> list[Address]:
        """Ports above the peer's newest observed port: of the candidates at its first
        candidate's address that its record does not advertise (what the rendezvous saw,
        and a fresh observation of its port counter if it sent one) the highest, else the
        first. Many when its NAT maps per destination and ours does not (port prediction),
        a few otherwise (conntrack clashes). None when
        our NAT maps per destination: every probe would burn one of its ports, which makes
        its next mappings harder to predict."""
        if not targets or self._nat.mapping in _SYMMETRIC:
            return []
        count = self._config.spray_always
        if path.nat.mapping in _SYMMETRIC and not path.predicted:
            count = max(count, self._config.spray_ports)
        host, port = targets[0]
        observed = [p for h, p in targets if h == host and (h, p) not in path.endpoints]
        port = max(observed, default=port)
        return [
            (host, p)
            for p in range(port + 1, min(port + 1 + count, 0x10000))
            if (host, p) not in targets
        ]

    def _tick_session(self, session: _Session, now: float) -> None:
        if session.fresh_until is not None:
            if session.fresh_until <= now:
                self._fresh_done(session, now)
            return
        if session.next_round is not None and session.next_round <= now:
            self._probe_round(session, now)
        if session.next_round is None and session.expires <= now:
            if session.purpose is _Purpose.PUNCH and not session.targets and session.rendezvous:
                path = self._paths.get(session.peer)
                if path is not None and path.session == session.session_id:
                    self._ask_rendezvous(path, session, now)
                    return
            self._session_failed(session, now)
            return
        if session.session_id in self._sessions:
            self._schedule_session(session)

    def _probe_round(self, session: _Session, now: float) -> None:
        for addr in session.targets:
            self._probe(session, addr, now)
        if session.spray:
            share = -(-len(session.spray) // max(1, session.rounds_left))
            for addr in session.spray[:share]:
                self._probe(session, addr, now)
                self.counters["spray_probes_sent"] += 1
            del session.spray[:share]
        session.rounds_left -= 1
        if session.rounds_left > 0:
            session.next_round = now + self._config.probe_interval
        else:
            session.next_round = None
            session.expires = now + 2 * self._config.probe_interval

    def _probe(self, session: _Session, addr: Address, now: float) -> None:
        """One probe: full TTL when the peer's NAT is open toward ``addr`` (or the session
        says all are), else an opening probe that only opens our own NAT."""
        seq = self._rng.getrandbits(64)
        path = self._paths.get(session.peer)
        ttl = None
        if (
            self._config.opening_ttl
            and session.open_at > now
            and path is not None
            and not self._open_toward(path, addr)
        ):
            ttl = self._config.opening_ttl
            self.counters["opening_probes_sent"] += 1
            if addr not in session.opening:
                session.opening.append(addr)
        elif addr not in session.full:
            session.full.append(addr)
        session.pending[seq] = (now, addr, ttl is not None)
        if path is not None:
            path.probed_at = now
        self._send(session.peer, PunchProbe(session.session_id, seq, False), addr, ttl)
        self.counters["probes_sent"] += 1

    def _session_failed(self, session: _Session, now: float) -> None:
        self._sessions.pop(session.session_id, None)
        path = self._paths.get(session.peer)
        if path is None:
            return
        own = path.session == session.session_id
        if own:
            path.session = None
        if path.kind in (PathKind.DIRECT, PathKind.PUNCHED):
            return
        if session.purpose is _Purpose.DIRECT:
            self._start_punch(path, now, defer=True)
            return
        self.counters["punch_failed"] += 1
        if session.predicting or session.fresh is not None:
            path.predicted = True
        if not own:
            path.peer_punch_failed = now
        if own or path.session is None:
            self._fall_back(path, now)

    def _succeeded(
        self, session: _Session, addr: Address, rtt: float, now: float, *, through_nat: bool
    ) -> None:
        """A probe came back. ``through_nat``: a full-TTL probe answered at the public
        mapping of the member's NAT, where we first only sent opening probes: that NAT had
        to open toward us, so a direct check that finds it has punched a hole (an opening
        probe that came back needed no hole: the member is a hop or two away)."""
        path = self._paths.get(session.peer)
        self._sessions.pop(session.session_id, None)
        if path is None:
            return
        self.counters["probe_round_trips"] += 1
        path.found_directly = session.purpose is _Purpose.DIRECT and not through_nat
        if self._is_direct(path, addr):
            kind = PathKind.DIRECT
            self.counters["direct_found"] += 1
        else:
            kind = PathKind.PUNCHED
            self.counters["punch_succeeded"] += 1
        for other in [s for s in self._sessions.values() if s.peer == session.peer]:
            del self._sessions[other.session_id]
        path.session = None
        self._set_endpoint(path, addr)
        path.predicted = False
        self._set_kind(path, kind, addr, None, rtt=rtt)
        self._confirmed(path, now)

    # ------------------------------------------------------------------ messages

    def _send(self, peer: bytes, message: Message, addr: Address, ttl: int | None = None) -> None:
        datagram = self._seal(peer, message)
        if datagram is None:
            return
        if ttl is None:
            self._outbox.append((datagram, addr))
        else:
            self._limited.append((datagram, addr, ttl))

    def _on_probe(self, sender: bytes, probe: PunchProbe, addr: Address, now: float) -> None:
        """Answer the probes of members that are peers, nobody else's: a member we hold
        dead must not keep its path to us looking alive (a key we do not know yet: the node
        has noted where it came from, and our check probes there once it is a member).

        A probe shows the sender's NAT is open toward us from ``addr``: a session toward
        it probes there at full TTL at once."""
        path = self._paths.get(sender)
        if path is None:
            self.counters["probe_unexpected"] += 1
            return
        if not probe.reply:
            self._send(sender, PunchProbe(probe.session, probe.seq, True), addr)
            self.counters["probe_replies_sent"] += 1
            probing = False
            for session in self._sessions.values():
                if session.peer == sender and session.next_round is not None:
                    probing = True
                    if addr not in session.targets:
                        session.targets.append(addr)
                    if addr not in session.full:
                        self._probe(session, addr, now)
            if not probing and path.kind not in (PathKind.DIRECT, PathKind.PUNCHED):
                self._check_reflexive(path, addr, now)
            return
        if probe.session == path.keepalive_id and probe.seq == path.keepalive_seq:
            path.keepalive_seq = None
            path.misses = 0
            path.rtt = now - path.keepalive_sent
            return
        found = self._sessions.get(probe.session)
        sent = None if found is None else found.pending.pop(probe.seq, None)
        if found is None or found.peer != sender or sent is None:
            self.counters["probe_unexpected"] += 1
            return
        sent_at, target, opening = sent
        through_nat = target in found.opening and not opening and _nat_mapped(path, target)
        self._succeeded(found, target, now - sent_at, now, through_nat=through_nat)

    def _on_request(self, sender: bytes, request: PunchRequest, addr: Address, now: float) -> None:
        if request.target == self._own:
            path = self._paths.get(request.initiator)
            if path is None or request.initiator == self._own:
                self.counters["punch_refused"] += 1
                if path is None and request.initiator != self._own:
                    self._remember_early_initiator(request.initiator, now)
                return
            if request.session in self._recent:
                self.counters["punch_replay"] += 1
                return
            if self._fresh_later(path, now) is not None:
                self.counters["punch_postponed"] += 1
                return
            self._remember(request.session)
            session = _Session(
                request.session,
                request.initiator,
                _Purpose.PUNCH,
                [],
                started=now,
                expires=now,
                open_at=now + self._config.opening_wait,
            )
            self._sessions[request.session] = session
            if self._wait_fresh(path, session, now):
                session.answer = (sender, addr, request)
                return
            self._answer_request(sender, addr, request, session, now)
            return
        if request.initiator != sender or request.target == sender:
            self.counters["punch_refused"] += 1
            return
        target = self._paths.get(request.target)
        target_address = None if target is None else self._reach(request.target)
        if target_address is None:
            self.counters["punch_refused"] += 1
            return
        if request.session in self._rendezvous or request.session in self._recent:
            self.counters["punch_replay"] += 1
            return
        if len(self._rendezvous) >= self._config.rendezvous_entries:
            self.counters["rendezvous_full"] += 1
            return
        self._remember(request.session)
        self._rendezvous[request.session] = _Rendezvous(
            sender, addr, request.target, now + self._config.rendezvous_ttl
        )
        forwarded = PunchRequest(
            request.session, sender, request.target, _with_observed(addr, request.candidates)
        )
        self._send(request.target, forwarded, target_address)
        self.counters["punch_requests_forwarded"] += 1

    def _answer_request(
        self, rendezvous: bytes, addr: Address, request: PunchRequest, session: _Session,
        now: float,
    ) -> None:
        """Target side: our candidates back through the rendezvous, then probe the
        initiator's (the opening probes wait for its first probe, ``opening_wait``)."""
        response = PunchResponse(
            request.session, request.initiator, self._own, self._own_candidates(session)
        )
        self._send(rendezvous, response, addr)
        session.open_at = now + self._config.opening_wait
        self._start_probing(session, request.candidates, now)

    def _remember_early_initiator(self, initiator: bytes, now: float) -> None:
        """A punch from a key we do not know yet (its record has not reached us): it falls
        back to a relay and retries only after ``retry_min``, so the first move is ours
        once it becomes a member within that time."""
        if len(self._early_initiators) >= self._config.rendezvous_entries:
            for key, until in list(self._early_initiators.items()):
                if until < now:
                    del self._early_initiators[key]
            if len(self._early_initiators) >= self._config.rendezvous_entries:
                self.counters["punch_early_dropped"] += 1
                return
        self._early_initiators[initiator] = now + self._config.retry_min
        self.counters["punch_early"] += 1

    def _on_response(
        self, sender: bytes, response: PunchResponse, addr: Address, now: float
    ) -> None:
        if response.initiator == self._own:
            session = self._sessions.get(response.session)
            if (
                session is None
                or session.purpose is not _Purpose.PUNCH
                or session.peer != response.target
                or session.next_round is not None
                or session.fresh_until is not None
                or session.targets
                or sender not in (session.rendezvous, response.target)
            ):
                self.counters["punch_unexpected"] += 1
                return
            session.open_at = now
            self._start_probing(session, response.candidates, now)
            return
        entry = self._rendezvous.get(response.session)
        if (
            entry is None
            or response.target != sender
            or entry.target != sender
            or entry.initiator != response.initiator
        ):
            self.counters["punch_unexpected"] += 1
            return
        del self._rendezvous[response.session]
        forwarded = PunchResponse(
            response.session,
            response.initiator,
            sender,
            _with_observed(addr, response.candidates),
        )
        self._send(entry.initiator, forwarded, entry.initiator_address)
        self.counters["punch_responses_forwarded"] += 1

    def _reach(self, key: bytes) -> Address | None:
        """Where a member is reached without a relay: its confirmed path, else last heard."""
        return self.route(key) or self._heard.get(key)

    def _on_envelope(self, sender: bytes, envelope: RelayEnvelope, now: float) -> None:
        payload = envelope.payload
        payload_sender = _sender_id(payload)
        if payload_sender is None:
            self.counters["relay_bad_payload"] += 1
            return
        if payload_sender == key_id(envelope.peer):
            self._deliver(sender, envelope)
        elif payload_sender == key_id(sender):
            self._forward(sender, envelope, now)
        else:
            self.counters["relay_bad_payload"] += 1

    def _deliver(self, relay: bytes, envelope: RelayEnvelope) -> None:
        origin = envelope.peer
        opened = self._open(envelope.payload) if origin in self._paths else None
        if opened is None:
            self.counters["relay_untrusted"] += 1
            return
        inner_sender, inner = opened
        if inner_sender != origin:
            self.counters["relay_bad_payload"] += 1
            return
        if not isinstance(inner, RelayEnvelope):
            endpoints = self._paths[origin].endpoints
            if isinstance(inner, PunchProbe | PunchRequest | PunchResponse) or not endpoints:
                self.counters["relay_bad_payload"] += 1
                return
            self._relayed_messages.append((origin, inner, endpoints[0]))
            self.counters["relay_delivered"] += 1
            return
        if inner.peer != self._own or classify(inner.payload) is not DatagramKind.WIREGUARD:
            self.counters["relay_bad_payload"] += 1
            return
        virtual = virtual_address(relay, origin)
        self._virtual[virtual] = (relay, origin)
        self._deliveries.append((inner.payload, virtual))
        self.counters["relay_delivered"] += 1

    def _forward(self, origin: bytes, envelope: RelayEnvelope, now: float) -> None:
        if not self._allow_relay:
            self.counters["relay_refused"] += 1
            return
        destination = envelope.peer
        if destination not in self._paths or destination == origin:
            self.counters["relay_untrusted"] += 1
            return
        address = self.route(destination)
        if address is None:
            self.counters["relay_unreachable"] += 1
            return
        if not self._take_token(origin, now):
            self.counters["relay_rate_limited"] += 1
            return
        self._send(destination, RelayEnvelope(origin, envelope.payload), address)
        self.counters["relay_forwarded"] += 1
        self.counters["relay_forwarded_bytes"] += len(envelope.payload)

    def _take_token(self, origin: bytes, now: float) -> bool:
        config = self._config
        bucket = self._buckets.get(origin)
        if bucket is None:
            bucket = self._buckets[origin] = _Bucket(config.relay_burst, now)
        bucket.tokens = min(
            config.relay_burst, bucket.tokens + (now - bucket.updated) * config.relay_rate
        )
        bucket.updated = now
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True


_LOCAL_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
"""Private (RFC 1918, RFC 6598 shared, RFC 4193 unique local) addresses: what hosts behind
a NAT have."""


def _is_local(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in network for network in _LOCAL_NETWORKS)


def _nat_mapped(path: _Path, addr: Address) -> bool:
    """Whether ``addr`` is, by the member's record, the public mapping of a NAT in front of
    it: its NAT facts say it has one, or, while they are unknown, it advertises ``addr``
    first, a non-private address, with a private address after it (its own, behind the NAT;
    the first is what STUN saw)."""
    mapping = path.nat.mapping
    if mapping is not NatMapping.UNKNOWN:
        return mapping is not NatMapping.NONE
    if not path.endpoints or path.endpoints[0] != addr or _is_local(addr[0]):
        return False
    return any(_is_local(host) for host, _ in path.endpoints[1:])


def _with_observed(addr: Address, candidates: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
    """Candidates with the address a rendezvous saw the sender at first (if new)."""
    observed = _endpoint(addr)
    if observed is None or observed in candidates:
        return tuple(candidates)[:MAX_CANDIDATES]
    return (observed, *candidates)[:MAX_CANDIDATES]


def _sender_id(datagram: bytes) -> bytes | None:
    """The sender key id of a well-formed meshguard datagram (unauthenticated), else None."""
    try:
        return peek_sender(datagram)
    except DecodeError:
        return None
