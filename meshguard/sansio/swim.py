"""SWIM membership with Lifeguard: failure detection, gossip, joining, healing and trust.

One ``Membership`` per node. It probes one member per protocol period (randomised
round-robin), asks k helpers to probe a member that missed its ack, suspects it when nobody
reached it, and declares it dead when the suspicion times out unrefuted. Changes ride on the
probes (and on a short gossip round while there are any); a full state exchange on join, and
digest exchanges (push-pull: only the members whose state differs travel) periodically and
towards dead members, heal partitions of any length. Lifeguard's local
health awareness and shrinking suspicion timeouts keep a slow node from accusing healthy ones.

Trust (DESIGN.md §4): only datagrams authenticated with the pair key of a trusted member are
read; every liveness or address claim is a record signed by the member it describes; an
accusation (Suspect, Dead) counts only about a trusted member and by a trusted accuser. What
fails a check changes nothing and is counted in ``counters``.

Sans-IO (DESIGN.md §3): time comes in as ``now``, randomness from ``rng`` and ``entropy``;
datagrams and events are pulled. ``docs/swim.md`` has the parameters, formulas and rules.
"""

from __future__ import annotations

import enum
import functools
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshguard.identity.keys import (
    Identity,
    ed25519_public_to_x25519,
    is_valid_ed25519_public_key,
)
from meshguard.sansio.codec import (
    MAX_DATAGRAM,
    NONCE_SIZE,
    chunk_state_entries,
    digest_bucket,
    digest_bucket_count,
    encoded_size,
    entry_digest,
    key_id,
    make_record,
    open_datagram,
    pair_key,
    peek_sender,
    seal,
    state_digest,
    update_size,
    verify_record,
)
from meshguard.sansio.codec_wire import ACCUSATION_SIZE
from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.messages import (
    Ack,
    Alive,
    Dead,
    Endpoint,
    EndpointUpdate,
    IndirectAck,
    MemberRecord,
    Message,
    Nack,
    NatInfo,
    Ping,
    PingReq,
    RecordStatus,
    StateDigest,
    StateEntry,
    StateSync,
    Suspect,
    Update,
)
from meshguard.sansio.swim_broadcast import TransmitQueue
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.swim_lifeguard import Awareness, Suspicion
from meshguard.sansio.types import Address, Entropy, RandomSource

__all__ = [
    "COUNTERS",
    "GOSSIP_SEQ",
    "JOIN_REPLY_PERIODS",
    "MemberAlive",
    "MemberDead",
    "MemberJoined",
    "MemberLeft",
    "MemberReaped",
    "MemberState",
    "MemberSuspected",
    "MemberUntrusted",
    "MemberUpdated",
    "MemberView",
    "Membership",
    "MembershipEvent",
    "SwimConfig",
]

GOSSIP_SEQ = 0
"""An ``Ack`` with this seq answers no probe: it only carries gossip (probe seqs start at 1)."""

NACK_FRACTION = 0.8
"""A helper sends its Nack after this fraction of its probe timeout (Lifeguard)."""

LEAVE_FANOUT = 4
"""Members sent the LEFT record straight away by ``leave``, before gossip carries it on."""

MAX_SEEDS = 64
"""Seed addresses remembered for rejoining (the most recently given)."""

MAX_RELAYS = 256
"""Indirect probes a helper runs at once for others; more requests are refused."""

JOIN_REPLY_PERIODS = 2.0
"""Protocol periods a joiner waits for its seed's full state before asking again."""

JOIN_ATTEMPTS = 4
"""Full-state requests one join makes at most (lost requests, lost chunks of the reply)."""

PULL_ATTEMPTS = 4
"""Digest exchanges of a joiner's follow-up pull at most (until one is answered in full)."""

MAX_OPEN_EXCHANGES = 16
"""Digest exchanges we opened and still accept an answer to (the oldest is forgotten)."""

MAX_NEWCOMERS = 256
"""Joiners a node answered and will still tell about members that became live since."""

COUNTERS = (
    "datagram_received",
    "datagram_sent",
    "decode_error",
    "untrusted_sender",
    "from_self",
    "auth_failed",
    "bad_peer_key",
    "not_membership",
    "wrong_target",
    "bad_signature",
    "untrusted_member",
    "unknown_member",
    "forged_claim",
    "unexpected_ack",
    "no_address",
    "relay_refused",
    "ping_sent",
    "ping_received",
    "ack_sent",
    "ack_received",
    "ping_req_sent",
    "ping_req_received",
    "indirect_ack_sent",
    "indirect_ack_received",
    "nack_sent",
    "nack_received",
    "gossip_sent",
    "state_sync_sent",
    "state_sync_received",
    "state_digest_sent",
    "state_digest_received",
    "unexpected_digest",
    "probe_failed",
    "suspected",
    "declared_dead",
    "refuted",
    "last_chance_probes",
    "reaped",
    "removed",
    "reconnect_attempts",
    "seed_attempts",
    "newcomer_updates_sent",
)
"""Every counter name, present from the start so metrics see zeros rather than gaps."""


_SHARED_PAIR_KEYS_MAX = 1 << 20
_shared_pair_keys: OrderedDict[tuple[bytes, bytes], bytes] = OrderedDict()


def _shared_pair_key(identity: Identity, peer: bytes) -> bytes | None:
    """``codec.pair_key`` of ``identity`` and ``peer``, memoized for the whole process.

    The key is a pure function of the two key pairs and the same from both sides, so it is
    remembered under the two public keys in order: a simulator running many members in one
    process derives each pair once instead of twice (an X25519 exchange costs ~0.2 ms), and a
    daemon, holding one identity, caches exactly its own pairs. Only an ``Identity`` (whose
    public key is derived from its private key) can fill an entry. None: no key with ``peer``.
    """
    own = identity.public_key
    pair = (own, peer) if own < peer else (peer, own)
    key = _shared_pair_keys.get(pair)
    if key is None:
        try:
            key = pair_key(identity.x25519_private, _x25519_public(peer), own, peer)
        except ValueError:
            return None
        if len(_shared_pair_keys) >= _SHARED_PAIR_KEYS_MAX:
            _shared_pair_keys.popitem(last=False)
        _shared_pair_keys[pair] = key
    return key


@functools.lru_cache(maxsize=65536)
def _x25519_public(public_key: bytes) -> bytes:
    """Memoized ``ed25519_public_to_x25519`` (a modular inversion, ~60 µs, per peer)."""
    return ed25519_public_to_x25519(public_key)


_INTERNED_RECORDS_MAX = 1 << 17
_interned_records: dict[MemberRecord, MemberRecord] = {}
_interned_by_id: dict[int, MemberRecord] = {}
"""The canonical instances by identity, to recognise one without hashing its fields; the
entry holds the object, so its id cannot be reused while it is there."""


def _interned(record: MemberRecord) -> MemberRecord:
    """One shared instance per distinct verified record in the process.

    Every member of a simulated cluster would otherwise keep its own decoded copy of every
    record (~0.5 kB each: a million copies at 1000 members); records are immutable.
    """
    if _interned_by_id.get(id(record)) is record:
        return record
    canonical = _interned_records.get(record)
    if canonical is None:
        if len(_interned_records) >= _INTERNED_RECORDS_MAX:
            evicted = next(iter(_interned_records))
            del _interned_records[evicted]
            del _interned_by_id[id(evicted)]
        canonical = _interned_records[record] = record
        _interned_by_id[id(record)] = record
    return canonical


class MemberState(enum.Enum):
    """How this node currently sees a member."""

    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_SUSPECT = MemberState.SUSPECT
_DEAD = MemberState.DEAD


@dataclass(frozen=True, slots=True)
class MemberView:
    """A snapshot of one member as this node sees it (``members()`` includes the node itself)."""

    public_key: bytes
    state: MemberState
    incarnation: int
    endpoints: tuple[Endpoint, ...]
    nat: NatInfo
    last_change: float


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A member became alive: first seen, or back after being dead or having left."""

    public_key: bytes
    incarnation: int
    endpoints: tuple[Endpoint, ...]
    nat: NatInfo


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """A live member signed a new record with other endpoints or NAT facts."""

    public_key: bytes
    incarnation: int
    endpoints: tuple[Endpoint, ...]
    nat: NatInfo


@dataclass(frozen=True, slots=True)
class MemberSuspected:
    """A live member is suspected of having failed (it may still refute)."""

    public_key: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspected member refuted the suspicion with a newer record."""

    public_key: bytes
    incarnation: int
    endpoints: tuple[Endpoint, ...]
    nat: NatInfo


@dataclass(frozen=True, slots=True)
class MemberDead:
    """A member is confirmed dead (its suspicion timed out, or a trusted member said so)."""

    public_key: bytes
    incarnation: int
    accuser: bytes


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member left gracefully (its own signed LEFT record)."""

    public_key: bytes
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberReaped:
    """A dead or left member was forgotten after ``dead_reap_after``."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class MemberUntrusted:
    """A member was forgotten because its key is no longer trusted (``set_trusted_keys``)."""

    public_key: bytes


MembershipEvent = (
    MemberJoined
    | MemberUpdated
    | MemberSuspected
    | MemberAlive
    | MemberDead
    | MemberLeft
    | MemberReaped
    | MemberUntrusted
)


class _IndexedKeys:
    """Keys in a list with positions, for O(1) add, remove and uniform random choice."""

    __slots__ = ("items", "positions")

    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.positions: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, key: bytes) -> None:
        if key not in self.positions:
            self.positions[key] = len(self.items)
            self.items.append(key)

    def remove(self, key: bytes) -> None:
        position = self.positions.pop(key, None)
        if position is None:
            return
        last = self.items.pop()
        if position < len(self.items):
            self.items[position] = last
            self.positions[last] = position

    def sample(self, rng: RandomSource, count: int, exclude: tuple[bytes, ...]) -> list[bytes]:
        """Up to ``count`` distinct random keys not in ``exclude`` (3·count tries at most)."""
        chosen: list[bytes] = []
        size = len(self.items)
        if size == 0 or count <= 0:
            return chosen
        if size <= count + len(exclude):
            pool = [k for k in self.items if k not in exclude]
            rng.shuffle(pool)
            return pool[:count]
        for _ in range(3 * count + len(exclude)):
            key = self.items[rng.randrange(size)]
            if key not in exclude and key not in chosen:
                chosen.append(key)
                if len(chosen) == count:
                    break
        return chosen


class _Member:
    """Mutable state of one member; only ``Membership._set_state`` changes ``state``."""

    __slots__ = (
        "accuser",
        "address",
        "changed_at",
        "digest",
        "digest_incarnation",
        "digest_record",
        "digest_state",
        "endpoint_index",
        "in_probe_order",
        "incarnation",
        "knows_us",
        "live_order",
        "public_key",
        "record",
        "state",
        "suspicion",
    )

    def __init__(self, record: MemberRecord, state: MemberState, now: float) -> None:
        self.public_key = record.public_key
        self.record = record
        self.state = state
        self.incarnation = record.incarnation
        self.changed_at = now
        self.accuser = record.public_key
        self.suspicion: Suspicion | None = None
        self.address: Address | None = None
        self.endpoint_index = 0
        self.in_probe_order = False
        self.knows_us = False
        self.live_order = 0
        self.digest = 0
        self.digest_record: MemberRecord | None = None
        self.digest_state = state
        self.digest_incarnation = -1

    def target_address(self) -> Address | None:
        """Where to reach it: where it last spoke from, else one of its advertised endpoints."""
        if self.address is not None:
            return self.address
        endpoints = self.record.endpoints
        if not endpoints:
            return None
        endpoint = endpoints[self.endpoint_index % len(endpoints)]
        return (endpoint.host, endpoint.port)

    def entry_digest(self) -> int:
        """``codec.entry_digest`` of this member, remembered until its record or state
        changes (every push-pull digests every member, on both sides). Three slots rather
        than one tuple: a simulated cluster holds a million members."""
        if (
            self.digest_record is not self.record
            or self.digest_state is not self.state
            or self.digest_incarnation != self.incarnation
        ):
            self.digest_record = self.record
            self.digest_state = self.state
            self.digest_incarnation = self.incarnation
            self.digest = entry_digest(self.record, self.accusation())
        return self.digest

    def accusation(self) -> Suspect | Dead | None:
        state = self.state
        if state is _SUSPECT:
            return Suspect(self.public_key, self.incarnation, self.accuser)
        if state is _DEAD:
            return Dead(self.public_key, self.incarnation, self.accuser)
        return None


class _ProbePhase(enum.Enum):
    DIRECT = 1
    INDIRECT = 2
    SETTLING = 3


class _Probe:
    """One probe this node runs: direct ping, then helpers, then counting late nacks.

    A ``last_chance`` probe is the one run when a suspicion timer runs out: it decides
    between declaring the member dead and restarting the timer.
    """

    __slots__ = ("acked", "helpers", "last_chance", "nacks", "phase", "seq", "target")

    def __init__(self, seq: int, target: bytes, *, last_chance: bool = False) -> None:
        self.seq = seq
        self.target = target
        self.last_chance = last_chance
        self.phase = _ProbePhase.DIRECT
        self.acked = False
        self.helpers: tuple[bytes, ...] = ()
        self.nacks: dict[bytes, None] = {}


class _Relay:
    """An indirect probe this node runs as a helper for ``origin``."""

    __slots__ = ("origin", "origin_address", "origin_seq", "target")

    def __init__(self, origin: bytes, origin_address: Address, origin_seq: int, target: bytes):
        self.origin = origin
        self.origin_address = origin_address
        self.origin_seq = origin_seq
        self.target = target


class _Timer(enum.IntEnum):
    PROBE_TIMEOUT = 1
    PROBE_END = 2
    PROBE_SETTLE = 3
    RELAY = 4
    SUSPICION = 5
    REAP = 6
    JOIN_RETRY = 7
    NEWCOMER = 8
    PULL_RETRY = 9


_LIVE = (MemberState.ALIVE, MemberState.SUSPECT)
_GONE = (MemberState.DEAD, MemberState.LEFT)


class Membership:
    """The membership machine of one node (see the module docstring and ``docs/swim.md``)."""

    def __init__(
        self,
        identity: Identity,
        *,
        config: SwimConfig,
        trusted_keys: Iterable[bytes],
        advertised_endpoints: Sequence[Endpoint],
        rng: RandomSource,
        entropy: Entropy,
        now: float,
        nat: NatInfo | None = None,
        incarnation: int = 0,
    ) -> None:
        """``incarnation`` lets a restarted node start above its previous life (optional:
        without it the node refutes its old records as soon as it hears them)."""
        if not isinstance(identity, Identity):
            raise LocalProtocolError("identity must be a meshguard.identity.keys.Identity")
        if type(incarnation) is not int or incarnation < 0:
            raise LocalProtocolError("incarnation must be a non-negative integer")
        self._identity = identity
        self._public_key = identity.public_key
        self._key_id = key_id(identity.public_key)
        self._config = config
        self._rng = rng
        self._entropy = entropy
        self._now = now
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._events: list[MembershipEvent] = []
        self._outbox: list[tuple[bytes, Address, bytes]] = []

        self._trusted: dict[bytes, bytes] = {}
        self._trusted_by_id: dict[bytes, bytes] = {}
        self._pair_keys: dict[bytes, bytes] = {}
        self._install_trust(trusted_keys)

        self._members: dict[bytes, _Member] = {}
        self._alive = _IndexedKeys()
        self._dead = _IndexedKeys()
        self._live_count = 1
        self._limit_members = 0
        self._limit = 0
        self._queue = TransmitQueue()
        self._awareness = Awareness(config.awareness_max)
        self._timers: list[tuple[float, int, _Timer, bytes | int]] = []
        self._timer_order = 0

        self._probe_order: list[bytes] = []
        self._probe_index = 0
        self._probes: dict[int, _Probe] = {}
        self._relays: dict[int, _Relay] = {}
        self._seq = rng.randrange(1, 1 << 32)
        self._sync_replies: dict[bytes, tuple[int, float]] = {}
        self._seeds: dict[Address, bytes | None] = {}
        self._join_exchange = 0
        self._join_answered = True
        self._join_seed: tuple[Address, bytes | None] = (("", 0), None)
        self._join_backups: list[tuple[Address, bytes | None]] = []
        self._join_parts: set[int] = set()
        self._join_parts_total = 0
        self._join_attempts_left = 0
        self._follow_up_due = False
        self._pull_attempts_left = 0
        self._pull_parts: set[int] = set()
        self._digests_sent: dict[bytes, int] = {}
        self._quiet_exchange = 0
        self._pull_digest: tuple[int, ...] = ()
        self._live_order = 0
        self._newcomers: dict[bytes, tuple[int, Address]] = {}

        self._incarnation = incarnation
        self._status = RecordStatus.ALIVE
        self._endpoints = tuple(advertised_endpoints)
        self._nat = nat if nat is not None else NatInfo()
        self._probe_at = now + rng.random() * config.protocol_period
        self._gossip_at = now + config.gossip_interval
        self._push_pull_at = now + rng.uniform(0.5, 1.0) * config.push_pull_interval
        self._reconnect_at = now + rng.uniform(0.5, 1.0) * config.reconnect_interval
        record = self._sign_own_record()
        self._members[self._public_key] = _Member(record, MemberState.ALIVE, now)
        self._enqueue(self._public_key, Alive(record))

    # -----------------------------------------------------------------------------------------
    # Public API

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def incarnation(self) -> int:
        """This node's own incarnation (raised by every refutation and new record)."""
        return self._incarnation

    @property
    def local_health(self) -> int:
        """Lifeguard awareness score, 0 (healthy) .. awareness_max − 1."""
        return self._awareness.score

    @property
    def live_count(self) -> int:
        """Members seen alive or suspect, this node included (the N of every formula)."""
        return self._live_count

    def join(
        self, seeds: Sequence[Address], now: float, *, seed_keys: Sequence[bytes] = ()
    ) -> None:
        """Join through seed addresses, and remember the seeds for rejoining.

        One seed, chosen at random, is asked for its full state; the others only get our
        record (a seed's full state is the costliest message of a mass join: one reply is
        enough, and the other seeds still gossip our record at once). When the chosen seed
        does not answer within ``JOIN_REPLY_PERIODS`` protocol periods the next one is asked.

        ``seed_keys``, when given, is the key of each seed in the same order. Without it a
        seed's key is taken from a member known at that address, else a one-record hello is
        sealed for every trusted key (only the right one opens), which costs one small
        datagram per trusted key and per seed. Seeds of every call are remembered (the latest
        ``MAX_SEEDS``), so seeds found later (LAN discovery) add to the configured ones.
        """
        self._now = now
        if seed_keys and len(seed_keys) != len(seeds):
            raise LocalProtocolError("seed_keys must give one key per seed, in the same order")
        for key in seed_keys:
            if key not in self._trusted:
                raise LocalProtocolError("every seed key must be a trusted key")
        keys: Sequence[bytes | None] = seed_keys or [None] * len(seeds)
        own_addresses = {(e.host, e.port) for e in self._endpoints}
        given = [(a, k) for a, k in zip(seeds, keys, strict=True) if a not in own_addresses]
        for addr, seed_key in given:
            self._seeds.pop(addr, None)
            self._seeds[addr] = seed_key
        while len(self._seeds) > MAX_SEEDS:
            del self._seeds[next(iter(self._seeds))]
        if self._status is RecordStatus.LEFT:
            self._status = RecordStatus.ALIVE
            self._new_own_record(self._incarnation + 1)
        by_address = self._members_by_address()
        contacts = [
            (addr, seed_key if seed_key is not None else by_address.get(addr))
            for addr, seed_key in given
        ]
        if not contacts:
            return
        self._rng.shuffle(contacts)
        for addr, known in contacts[1:]:
            self._announce_to_seed(addr, known)
        self._join_backups = contacts[1:]
        self._join_attempts_left = JOIN_ATTEMPTS
        self._ask_seed_for_state(*contacts[0])

    def leave(self, now: float) -> None:
        """Leave gracefully: sign a LEFT record, send it to a few members and gossip it."""
        self._now = now
        if self._status is RecordStatus.LEFT:
            return
        self._status = RecordStatus.LEFT
        self._new_own_record(self._incarnation + 1)
        for key in self._alive.sample(self._rng, LEAVE_FANOUT, ()):
            self._send_gossip(self._members[key])

    def set_trusted_keys(self, keys: Iterable[bytes], now: float) -> None:
        """Replace the trusted keys; members no longer trusted are forgotten at once."""
        self._now = now
        self._install_trust(keys)
        for key in [k for k in self._members if k not in self._trusted]:
            if key != self._public_key:
                self._forget(key)
                self.counters["removed"] += 1
                self._events.append(MemberUntrusted(key))
        for key in [k for k in self._pair_keys if k not in self._trusted]:
            del self._pair_keys[key]
        for key in [k for k in self._sync_replies if k not in self._trusted]:
            del self._sync_replies[key]

    def set_advertised_endpoints(self, endpoints: Sequence[Endpoint], now: float) -> None:
        """Sign and gossip a new record with these endpoints (roaming, NAT discovery)."""
        self._now = now
        previous = self._endpoints
        self._endpoints = tuple(endpoints)
        try:
            self._new_own_record(self._incarnation + 1)
        except LocalProtocolError:
            self._endpoints = previous
            raise

    def set_nat_info(self, nat: NatInfo, now: float) -> None:
        """Sign and gossip a new record with these NAT facts."""
        self._now = now
        if not isinstance(nat, NatInfo):
            raise LocalProtocolError("nat must be a NatInfo")
        self._nat = nat
        self._new_own_record(self._incarnation + 1)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one meshguard datagram; anything invalid or unauthorized is counted, dropped."""
        opened = self.authenticate(data)
        if opened is not None and not self.handle_message(opened[0], opened[1], addr, now):
            self.counters["not_membership"] += 1

    def authenticate(self, data: bytes) -> tuple[bytes, Message] | None:
        """(sender public key, message) of a datagram from a trusted member, else None (counted)."""
        self.counters["datagram_received"] += 1
        try:
            sender_id = peek_sender(data)
        except DecodeError:
            self.counters["decode_error"] += 1
            return None
        sender = self._trusted_by_id.get(sender_id)
        if sender is None:
            if sender_id == self._key_id:
                self.counters["from_self"] += 1
            else:
                self.counters["untrusted_sender"] += 1
            return None
        key = self._pair_key(sender)
        if key is None:
            return None
        try:
            return sender, open_datagram(data, key)
        except DecodeError:
            self.counters["auth_failed"] += 1
            return None

    def handle_message(self, sender: bytes, message: Message, addr: Address, now: float) -> bool:
        """Act on an authenticated message from trusted ``sender``; False if not ours."""
        self._now = now
        if isinstance(message, Ping):
            self._on_ping(sender, message, addr)
        elif isinstance(message, Ack):
            self._on_ack(sender, message, addr)
        elif isinstance(message, PingReq):
            self._on_ping_req(sender, message, addr)
        elif isinstance(message, IndirectAck):
            self._on_indirect_ack(sender, message, addr)
        elif isinstance(message, Nack):
            self._on_nack(sender, message, addr)
        elif isinstance(message, StateSync):
            self._on_state_sync(sender, message, addr)
        elif isinstance(message, StateDigest):
            self._on_state_digest(sender, message, addr)
        elif isinstance(message, EndpointUpdate):
            self._heard_from(sender, addr, knows_us=True)
            self._on_record(message.record)
        else:
            return False
        return True

    def seal_to(self, public_key: bytes, message: Message) -> bytes | None:
        """``message`` sealed for a trusted member (None if it has no usable key)."""
        if public_key not in self._trusted:
            raise LocalProtocolError("can only seal for a trusted key")
        key = self._pair_key(public_key)
        if key is None:
            return None
        return seal(message, self._key_id, key, self._entropy(NONCE_SIZE))

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        return [(datagram, addr) for datagram, addr, _ in self.datagrams_to_members()]

    def datagrams_to_members(self) -> list[tuple[bytes, Address, bytes]]:
        """Outgoing datagrams with the member each is sealed for: (datagram, address, key).

        The key lets a caller route by member rather than by address: behind NATs two
        members can advertise the same private address, and only the key says who is meant.
        """
        outbox, self._outbox = self._outbox, []
        return outbox

    def events(self) -> list[MembershipEvent]:
        events, self._events = self._events, []
        return events

    def next_deadline(self) -> float | None:
        deadline = min(self._probe_at, self._push_pull_at, self._reconnect_at)
        if self._timers and self._timers[0][0] < deadline:
            deadline = self._timers[0][0]
        if len(self._queue) and self._config.gossip_interval > 0 and self._gossip_at < deadline:
            deadline = self._gossip_at
        return deadline

    def on_timer(self, now: float) -> None:
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, ref = heapq.heappop(timers)
            self._fire(kind, ref)
        if now >= self._probe_at:
            self._probe_at = now + self._awareness.scale(self._config.protocol_period)
            if self._status is RecordStatus.ALIVE:
                self._start_probe()
        if now >= self._gossip_at:
            self._gossip_at = now + self._config.gossip_interval
            if len(self._queue) and self._config.gossip_interval > 0:
                self._gossip_round()
        if now >= self._push_pull_at:
            self._push_pull_at = now + self._push_pull_wait(self._live_count)
            if self._status is RecordStatus.ALIVE:
                self._push_pull()
        if now >= self._reconnect_at:
            self._reconnect_at = now + self._config.reconnect_interval
            if self._status is RecordStatus.ALIVE:
                self._reconnect()

    def members(self) -> list[MemberView]:
        """Every member this node remembers, itself first."""
        return [self._view(m) for m in self._members.values()]

    def member(self, public_key: bytes) -> MemberView | None:
        found = self._members.get(public_key)
        return None if found is None else self._view(found)

    # -----------------------------------------------------------------------------------------
    # Trust and keys

    def _install_trust(self, keys: Iterable[bytes]) -> None:
        trusted: dict[bytes, bytes] = {}
        by_id: dict[bytes, bytes] = {}
        for key in keys:
            if type(key) is not bytes or not is_valid_ed25519_public_key(key):
                raise LocalProtocolError("every trusted key must be a valid Ed25519 public key")
            if key == self._public_key or key in trusted:
                continue
            kid = key_id(key)
            if kid in by_id or kid == self._key_id:
                continue
            trusted[key] = kid
            by_id[kid] = key
        self._trusted = trusted
        self._trusted_by_id = by_id

    def _pair_key(self, peer: bytes) -> bytes | None:
        key = self._pair_keys.get(peer)
        if key is None:
            key = _shared_pair_key(self._identity, peer)
            if key is None:
                self.counters["bad_peer_key"] += 1
                return None
            self._pair_keys[peer] = key
        return key

    # -----------------------------------------------------------------------------------------
    # Sending

    def _send(self, peer: bytes, message: Message, addr: Address) -> None:
        key = self._pair_key(peer)
        if key is None:
            return
        self._outbox.append(
            (seal(message, self._key_id, key, self._entropy(NONCE_SIZE)), addr, peer)
        )
        self.counters["datagram_sent"] += 1

    def _piggyback(
        self, bare_size: int, first: tuple[Update, ...], *, skip: bytes | None = None
    ) -> tuple[Update, ...]:
        """``first`` then queued updates, all fitting in a datagram of MAX_DATAGRAM bytes.

        ``skip``: a member whose queued update is not taken (``first`` already says it).
        """
        room = MAX_DATAGRAM - bare_size - sum(update_size(u) for u in first)
        if not len(self._queue):
            return first
        limit = self._retransmit_limit()
        return first + tuple(self._queue.take(room, limit, ACCUSATION_SIZE, skip))

    def _retransmit_limit(self) -> int:
        """``retransmit_limit`` of the live count, recomputed only when the count changed
        (it is asked for every datagram filled)."""
        if self._limit_members != self._live_count:
            self._limit_members = self._live_count
            self._limit = self._config.retransmit_limit(self._live_count)
        return self._limit

    def _accusation_for(self, peer: bytes) -> tuple[Update, ...]:
        """Lifeguard: tell a member we suspect (or hold dead) so at the first chance."""
        member = self._members.get(peer)
        if member is None:
            return ()
        accusation = member.accusation()
        return () if accusation is None else (accusation,)

    def _send_ping(self, target: bytes, seq: int, addr: Address) -> None:
        """A probe; to a member that has not shown it knows us, our record goes first (a
        joiner's record can miss a member by chance: first contact repairs that at once)."""
        introduction = self._introduction(target)
        first = self._accusation_for(target) + introduction
        skip = self._public_key if introduction else None
        updates = self._piggyback(encoded_size(Ping(seq, target)), first, skip=skip)
        self._send(target, Ping(seq, target, updates), addr)
        self.counters["ping_sent"] += 1

    def _introduction(self, peer: bytes) -> tuple[Update, ...]:
        """Our record, for a member that has not shown it knows us (else nothing)."""
        member = self._members.get(peer)
        if member is None or member.knows_us or self._status is not RecordStatus.ALIVE:
            return ()
        return (Alive(self._members[self._public_key].record),)

    def _send_gossip(self, member: _Member) -> bool:
        """Queued updates to ``member``; our record first if it has not shown it knows us
        (gossip misses a few members by chance, and a joiner's state came from its seed, so
        nobody else would tell them about us until the next push-pull)."""
        addr = member.target_address()
        if addr is None:
            return False
        introduction = self._introduction(member.public_key)
        skip = self._public_key if introduction else None
        updates = self._piggyback(encoded_size(Ack(GOSSIP_SEQ)), introduction, skip=skip)
        if not updates:
            return False
        self._send(member.public_key, Ack(GOSSIP_SEQ, updates), addr)
        self.counters["gossip_sent"] += 1
        return True

    def _send_state(self, peer: bytes, addr: Address, exchange: int, want_reply: bool) -> None:
        entries = [self._state_entry(m) for m in self._members.values()]
        chunks = chunk_state_entries(entries)
        for part, chunk in enumerate(chunks):
            self._send(peer, StateSync(exchange, part, len(chunks), want_reply, chunk), addr)
        self.counters["state_sync_sent"] += 1

    @staticmethod
    def _state_entry(member: _Member) -> StateEntry:
        return StateEntry(member.record, member.accusation())

    def _start_exchange(self, peer: bytes, addr: Address, *, quiet: bool = False) -> int:
        """Open a push-pull with our state digest (the rest follows ``_on_state_digest``);
        returns the exchange id.

        ``quiet``: what the peer sends is not gossiped on (a joiner's follow-up pull).
        """
        exchange = self._rng.getrandbits(64) or 1
        self._digests_sent.pop(peer, None)
        self._digests_sent[peer] = exchange
        while len(self._digests_sent) > MAX_OPEN_EXCHANGES:
            del self._digests_sent[next(iter(self._digests_sent))]
        digest = self._state_digest(digest_bucket_count(len(self._members)))
        if quiet:
            self._quiet_exchange = exchange
            self._pull_digest = digest
        self._send(peer, StateDigest(exchange, True, digest), addr)
        self.counters["state_digest_sent"] += 1
        return exchange

    def _send_hello(self, peer: bytes, addr: Address, exchange: int, want_reply: bool) -> None:
        own = self._state_entry(self._members[self._public_key])
        self._send(peer, StateSync(exchange, 0, 1, want_reply, (own,)), addr)

    # -----------------------------------------------------------------------------------------
    # Own record

    def _sign_own_record(self) -> MemberRecord:
        return make_record(
            self._public_key,
            self._incarnation,
            self._status,
            self._endpoints,
            self._nat,
            self._identity.sign,
        )

    def _new_own_record(self, incarnation: int) -> MemberRecord:
        """Sign, store and gossip our record at ``incarnation`` with the current facts."""
        previous = self._incarnation
        self._incarnation = incarnation
        try:
            record = self._sign_own_record()
        except LocalProtocolError:
            self._incarnation = previous
            raise
        own = self._members[self._public_key]
        own.record = record
        own.incarnation = incarnation
        own.state = MemberState.LEFT if self._status is RecordStatus.LEFT else MemberState.ALIVE
        own.changed_at = self._now
        self._enqueue(self._public_key, Alive(record))
        return record

    def _refute(self, accused_incarnation: int) -> None:
        """Someone believes we are suspect or dead (or holds a record of an earlier life)."""
        self._new_own_record(max(self._incarnation, accused_incarnation) + 1)
        self._awareness.apply(1)
        self.counters["refuted"] += 1

    # -----------------------------------------------------------------------------------------
    # Member table: every state change goes through _set_state

    def _view(self, member: _Member) -> MemberView:
        return MemberView(
            member.public_key,
            member.state,
            member.incarnation,
            member.record.endpoints,
            member.record.nat,
            member.changed_at,
        )

    def _add_member(
        self, record: MemberRecord, state: MemberState, accuser: bytes, incarnation: int
    ) -> None:
        """A member we never knew: announced when alive, remembered quietly when dead or left."""
        member = _Member(record, MemberState.LEFT, self._now)
        self._members[record.public_key] = member
        self._set_state(member, state, incarnation, accuser, announce=state is MemberState.ALIVE)

    def _set_state(
        self,
        member: _Member,
        state: MemberState,
        incarnation: int,
        accuser: bytes,
        *,
        announce: bool = True,
    ) -> None:
        """The one place a member's state changes: indexes, timers and events follow it."""
        old = member.state
        key = member.public_key
        member.state = state
        member.incarnation = incarnation
        member.accuser = accuser
        member.changed_at = self._now
        was_live, is_live = old in _LIVE, state in _LIVE
        if was_live and not is_live:
            self._live_count -= 1
        elif is_live and not was_live:
            self._live_count += 1
            self._live_order += 1
            member.live_order = self._live_order
            self._insert_into_probe_order(member)
        if state is MemberState.ALIVE:
            self._alive.add(key)
        else:
            self._alive.remove(key)
        if state is MemberState.DEAD:
            self._dead.add(key)
        else:
            self._dead.remove(key)
        member.suspicion = None
        if state is MemberState.SUSPECT:
            shortest, longest = self._config.suspicion_timeouts(self._live_count)
            wanted = self._config.confirmations_wanted(self._live_count)
            member.suspicion = Suspicion(accuser, self._now, shortest, longest, wanted)
            self._schedule(member.suspicion.deadline, _Timer.SUSPICION, key)
        if state in _GONE:
            self._schedule(self._now + self._config.dead_reap_after, _Timer.REAP, key)
        if not announce:
            return
        record = member.record
        if state is MemberState.SUSPECT:
            self.counters["suspected"] += 1
            self._events.append(MemberSuspected(key, incarnation, accuser))
        elif state is MemberState.DEAD:
            self.counters["declared_dead"] += 1
            self._events.append(MemberDead(key, incarnation, accuser))
        elif state is MemberState.LEFT:
            self._events.append(MemberLeft(key, incarnation))
        elif old is MemberState.SUSPECT:
            self._events.append(MemberAlive(key, incarnation, record.endpoints, record.nat))
        else:
            self._events.append(MemberJoined(key, incarnation, record.endpoints, record.nat))

    def _forget(self, key: bytes) -> None:
        member = self._members.pop(key)
        if member.state in _LIVE:
            self._live_count -= 1
        self._alive.remove(key)
        self._dead.remove(key)
        self._queue.discard(key)
        member.suspicion = None

    def _insert_into_probe_order(self, member: _Member) -> None:
        """New and returning members go to a random place in the current round."""
        if member.in_probe_order or member.public_key == self._public_key:
            return
        position = self._rng.randint(0, len(self._probe_order))
        self._probe_order.insert(position, member.public_key)
        if position < self._probe_index:
            self._probe_index += 1
        member.in_probe_order = True

    def _enqueue(self, key: bytes, update: Update) -> None:
        if not len(self._queue) and self._gossip_at <= self._now:
            self._gossip_at = self._now + self._config.gossip_interval
        self._queue.put(key, update, update_size(update))

    def _heard_from(self, sender: bytes, addr: Address, *, knows_us: bool) -> None:
        """Remember where ``sender`` speaks from, and whether what it sent shows it knows us
        (it probed us, gossiped to us, asked us for help or exchanged state with us)."""
        member = self._members.get(sender)
        if member is not None:
            member.address = addr
            if knows_us:
                member.knows_us = True

    # -----------------------------------------------------------------------------------------
    # Gossip: records and accusations

    def _apply_updates(self, updates: tuple[Update, ...]) -> None:
        for update in updates:
            if isinstance(update, Alive):
                self._on_record(update.record)
            elif isinstance(update, Suspect):
                self._on_suspect(update.member, update.incarnation, update.accuser)
            else:
                self._on_dead(update.member, update.incarnation, update.accuser)

    def _on_record(self, record: MemberRecord, *, spread: bool = True) -> None:
        """A self-signed record (ALIVE or LEFT) reached us, by gossip, sync or directly.

        ``spread`` False: a member first learned here is not gossiped on. A joiner learns the
        whole cluster from its seed's state, which the cluster already knows: gossiping it
        again would cost λ·log N transmissions of every record by every joiner.
        """
        key = record.public_key
        member = self._members.get(key)
        if member is not None:
            held = member.record
            if record is held or record.incarnation < held.incarnation:
                return
            if record.signature == held.signature and record == held:
                return
        elif key not in self._trusted:
            self.counters["untrusted_member"] += 1
            return
        if not verify_record(record):
            self.counters["bad_signature"] += 1
            return
        record = _interned(record)
        if member is None:
            state = MemberState.ALIVE if record.status is RecordStatus.ALIVE else MemberState.LEFT
            self._add_member(record, state, key, record.incarnation)
            if spread:
                self._enqueue(key, Alive(record))

        elif key == self._public_key:
            if record.incarnation >= self._incarnation:
                self._refute(record.incarnation)
        else:
            self._merge_record(member, record)

    def _merge_record(self, member: _Member, record: MemberRecord) -> None:
        """Apply a verified record that differs from the one we hold (SWIM's Alive rules)."""
        held = member.record
        incarnation = record.incarnation
        if incarnation == held.incarnation and (record.status, record.signature) < (
            held.status,
            held.signature,
        ):
            return
        if record.status is RecordStatus.LEFT:
            if incarnation < member.incarnation:
                return
            member.record = record
            if member.state is not MemberState.LEFT:
                self._set_state(member, MemberState.LEFT, incarnation, member.public_key)
            else:
                member.incarnation = incarnation
            self._enqueue(member.public_key, Alive(record))
            return
        if incarnation < member.incarnation:
            return
        member.record = record
        if record.endpoints != held.endpoints:
            member.address = None
            member.endpoint_index = 0
        if incarnation > member.incarnation and member.state is not MemberState.ALIVE:
            self._set_state(member, MemberState.ALIVE, incarnation, member.public_key)
        else:
            member.incarnation = incarnation
            if member.state in _LIVE and (record.endpoints, record.nat) != (
                held.endpoints,
                held.nat,
            ):
                self._events.append(
                    MemberUpdated(member.public_key, incarnation, record.endpoints, record.nat)
                )
        self._enqueue(member.public_key, Alive(record))

    def _accused(
        self, member_key: bytes, incarnation: int, accuser: bytes, *, dead: bool = False
    ) -> _Member | None:
        """The member an accusation is about, if it may be believed at all.

        An accusation about ourselves is refuted; a stale ``Dead`` (older than our record)
        means some members hold us dead after our refutation passed them by, so our record
        is gossiped again.
        """
        if accuser not in self._trusted and accuser != self._public_key:
            self.counters["forged_claim"] += 1
            return None
        member = self._members.get(member_key)
        if member is None:
            if member_key in self._trusted:
                self.counters["unknown_member"] += 1
            else:
                self.counters["untrusted_member"] += 1
            return None
        if member_key == self._public_key:
            if self._status is RecordStatus.ALIVE:
                if incarnation >= self._incarnation:
                    self._refute(incarnation)
                elif dead and member_key not in self._queue:
                    self._enqueue(member_key, Alive(self._members[member_key].record))
            return None
        if incarnation < member.incarnation:
            return None
        return member

    def _on_suspect(self, member_key: bytes, incarnation: int, accuser: bytes) -> None:
        member = self._accused(member_key, incarnation, accuser)
        if member is None:
            return
        suspicion = member.suspicion
        if suspicion is not None:
            member.incarnation = incarnation
            if suspicion.confirm(accuser):
                self._schedule(suspicion.deadline, _Timer.SUSPICION, member_key)
                self._enqueue(member_key, Suspect(member_key, incarnation, accuser))
            return
        if member.state is not MemberState.ALIVE:
            return
        self._set_state(member, MemberState.SUSPECT, incarnation, accuser)
        self._enqueue(member_key, Suspect(member_key, incarnation, accuser))

    def _on_dead(self, member_key: bytes, incarnation: int, accuser: bytes) -> None:
        member = self._accused(member_key, incarnation, accuser, dead=True)
        if member is None or member.state in _GONE:
            return
        self._set_state(member, MemberState.DEAD, incarnation, accuser)
        self._enqueue(member_key, Dead(member_key, incarnation, accuser))

    # -----------------------------------------------------------------------------------------
    # Messages

    def _on_ping(self, sender: bytes, ping: Ping, addr: Address) -> None:
        self.counters["ping_received"] += 1
        self._heard_from(sender, addr, knows_us=True)
        self._apply_updates(ping.updates)
        if ping.target != self._public_key:
            self.counters["wrong_target"] += 1
            return
        first = self._accusation_for(sender)
        own = self._public_key
        answer_accusation = self._status is RecordStatus.ALIVE and any(
            not isinstance(update, Alive) and update.member == own for update in ping.updates
        )
        if answer_accusation:
            first += (Alive(self._members[own].record),)
        updates = self._piggyback(
            encoded_size(Ack(ping.seq)), first, skip=own if answer_accusation else None
        )
        self._send(sender, Ack(ping.seq, updates), addr)
        self.counters["ack_sent"] += 1

    def _on_ack(self, sender: bytes, ack: Ack, addr: Address) -> None:
        self._heard_from(sender, addr, knows_us=ack.seq == GOSSIP_SEQ)
        self._apply_updates(ack.updates)
        if ack.seq == GOSSIP_SEQ:
            return
        self.counters["ack_received"] += 1
        probe = self._probes.get(ack.seq)
        if probe is not None and probe.target == sender:
            if not probe.acked and probe.phase is not _ProbePhase.SETTLING:
                probe.acked = True
                if probe.phase is _ProbePhase.DIRECT:
                    self._awareness.apply(-1)
            return
        relay = self._relays.get(ack.seq)
        if relay is not None and relay.target == sender:
            del self._relays[ack.seq]
            updates = self._piggyback(encoded_size(IndirectAck(relay.origin_seq, sender)), ())
            message = IndirectAck(relay.origin_seq, sender, updates)
            self._send(relay.origin, message, relay.origin_address)
            self.counters["indirect_ack_sent"] += 1
            return
        self.counters["unexpected_ack"] += 1

    def _on_ping_req(self, sender: bytes, request: PingReq, addr: Address) -> None:
        self.counters["ping_req_received"] += 1
        self._heard_from(sender, addr, knows_us=True)
        self._apply_updates(request.updates)
        target = request.target
        if target == self._public_key:
            self._send(sender, IndirectAck(request.seq, target), addr)
            self.counters["indirect_ack_sent"] += 1
            return
        if target not in self._trusted or len(self._relays) >= MAX_RELAYS:
            self.counters["relay_refused"] += 1
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(sender, addr, request.seq, target)
        endpoint = request.target_endpoint
        self._send_ping(target, seq, (endpoint.host, endpoint.port))
        self._schedule(self._now + NACK_FRACTION * self._config.probe_timeout, _Timer.RELAY, seq)

    def _on_indirect_ack(self, sender: bytes, ack: IndirectAck, addr: Address) -> None:
        self.counters["indirect_ack_received"] += 1
        self._heard_from(sender, addr, knows_us=False)
        self._apply_updates(ack.updates)
        probe = self._probes.get(ack.seq)
        if probe is None or probe.target != ack.target or sender not in probe.helpers:
            self.counters["unexpected_ack"] += 1
            return
        if probe.phase is not _ProbePhase.SETTLING:
            probe.acked = True

    def _on_nack(self, sender: bytes, nack: Nack, addr: Address) -> None:
        self.counters["nack_received"] += 1
        self._heard_from(sender, addr, knows_us=False)
        probe = self._probes.get(nack.seq)
        if probe is not None and probe.target == nack.target and sender in probe.helpers:
            probe.nacks[sender] = None

    def _on_state_digest(self, sender: bytes, digest: StateDigest, addr: Address) -> None:
        """Push-pull by digest: answer an opening with ours, then each side sends the
        members of the buckets that differ.

        Two members that agree exchange two small datagrams instead of their whole states;
        after a partition or a missed update only the differing buckets travel. A digest
        answering an exchange we did not open (or no longer hold open) is ignored, so nobody
        can make us send our state by replaying one.
        """
        self.counters["state_digest_received"] += 1
        self._heard_from(sender, addr, knows_us=True)
        if digest.want_reply:
            if not self._may_answer(sender, digest.exchange):
                return
        elif self._digests_sent.get(sender) == digest.exchange:
            del self._digests_sent[sender]
        else:
            self.counters["unexpected_digest"] += 1
            return
        count = len(digest.buckets)
        own = self._state_digest(count)
        if digest.want_reply:
            self._send(sender, StateDigest(digest.exchange, False, own), addr)
            self.counters["state_digest_sent"] += 1
        differing = {bucket for bucket in range(count) if own[bucket] != digest.buckets[bucket]}
        if digest.exchange == self._quiet_exchange and (
            not differing or digest.buckets == self._pull_digest
        ):
            self._pull_attempts_left = 0
        if not differing:
            return
        wanted = [
            self._state_entry(m)
            for key, m in self._members.items()
            if digest_bucket(key, count) in differing
        ]
        chunks = chunk_state_entries(wanted)
        for part, chunk in enumerate(chunks):
            self._send(sender, StateSync(digest.exchange, part, len(chunks), False, chunk), addr)
        self.counters["state_sync_sent"] += 1

    def _state_digest(self, buckets: int) -> tuple[int, ...]:
        """``codec.state_digest`` of the entries ``_send_state`` would send, from each
        member's remembered hash."""
        return state_digest(((k, m.entry_digest()) for k, m in self._members.items()), buckets)

    def _may_answer(self, sender: bytes, exchange: int) -> bool:
        """Whether to answer ``sender``'s exchange: once per exchange id, and at most once per
        ``sync_reply_min_interval`` per sender (replayed requests cost one answer)."""
        last = self._sync_replies.get(sender)
        if last is not None and (
            last[0] == exchange or self._now - last[1] < self._config.sync_reply_min_interval
        ):
            return False
        self._sync_replies[sender] = (exchange, self._now)
        return True

    def _on_state_sync(self, sender: bytes, sync: StateSync, addr: Address) -> None:
        """Merge a chunk of someone's full state; answer with ours if asked.

        A member the sender holds suspect or dead is only *suspected* here (as memberlist
        does): after a partition each side holds the other dead, and suspicion lets the
        accused refute instead of dying on the spot. Members we never heard of arrive in the
        sender's state. A joiner remembers the dead ones quietly (from its seed's reply), so
        it can reach them to heal; an established member skips them, or two members would
        hand a member one of them has reaped back and forth forever.

        What a joiner learns from its seed's reply and from its follow-up pull is not
        gossiped on (see ``_on_record``); the reply's chunks are counted so that a lost one
        is asked for again (``_check_join_reply``).
        """
        self.counters["state_sync_received"] += 1
        self._heard_from(sender, addr, knows_us=True)
        known = self._members.get(sender)
        newcomer = known is None or known.state not in _LIVE
        join_reply = not sync.want_reply and sync.exchange == self._join_exchange
        pull_answer = not sync.want_reply and sync.exchange == self._quiet_exchange
        if pull_answer:
            self._pull_parts.add(sync.part)
            if len(self._pull_parts) >= sync.parts:
                self._pull_attempts_left = 0
        if join_reply:
            if not self._join_answered:
                self._join_answered = True
                self._join_seed = (addr, sender)
                if sync.parts != self._join_parts_total:
                    self._join_parts = set()
                    self._join_parts_total = sync.parts
                self._follow_up_due = True
                wait = self._rng.uniform(0.5, 1.0) * self._config.push_pull_interval
                self._push_pull_at = self._now + wait
            self._join_parts.add(sync.part)
        for entry in sync.entries:
            accusation = entry.suspect_or_dead
            record = entry.record
            if (
                isinstance(accusation, Dead)
                and record.public_key not in self._members
                and record.public_key in self._trusted
                and record.status is RecordStatus.ALIVE
            ):
                if not join_reply:
                    continue
                if verify_record(record):
                    self._add_member(
                        _interned(record),
                        MemberState.DEAD,
                        sender,
                        max(record.incarnation, accusation.incarnation),
                    )
                else:
                    self.counters["bad_signature"] += 1
                continue
            self._on_record(record, spread=not (join_reply or pull_answer))
            if accusation is not None:
                self._on_suspect(accusation.member, accusation.incarnation, accusation.accuser)
        if sync.want_reply and self._may_answer(sender, sync.exchange):
            self._send_state(sender, addr, sync.exchange, want_reply=False)
            if newcomer and len(self._newcomers) < MAX_NEWCOMERS:
                self._newcomers[sender] = (self._live_order, addr)
                later = self._now + JOIN_REPLY_PERIODS * self._config.protocol_period
                self._schedule(later, _Timer.NEWCOMER, sender)

    # -----------------------------------------------------------------------------------------
    # Timers

    def _schedule(self, when: float, kind: _Timer, ref: bytes | int) -> None:
        self._timer_order += 1
        heapq.heappush(self._timers, (when, self._timer_order, kind, ref))

    def _fire(self, kind: _Timer, ref: bytes | int) -> None:
        if kind is _Timer.SUSPICION:
            assert isinstance(ref, bytes)
            member = self._members.get(ref)
            suspicion = None if member is None else member.suspicion
            if (
                member is not None
                and suspicion is not None
                and suspicion.deadline <= self._now
                and not suspicion.last_chance_probe
                and not self._start_last_chance_probe(member, suspicion)
            ):
                self._declare_dead(member)
        elif kind is _Timer.REAP:
            assert isinstance(ref, bytes)
            member = self._members.get(ref)
            if (
                member is not None
                and member.state in _GONE
                and member.changed_at + self._config.dead_reap_after <= self._now
                and ref != self._public_key
            ):
                self._forget(ref)
                self.counters["reaped"] += 1
                self._events.append(MemberReaped(ref))
        elif kind is _Timer.NEWCOMER:
            assert isinstance(ref, bytes)
            self._tell_newcomer(ref)
        elif kind is _Timer.JOIN_RETRY:
            if ref == self._join_exchange:
                self._check_join_reply()
        elif kind is _Timer.PULL_RETRY:
            if ref == self._quiet_exchange:
                self._pull_from_seed()
        elif kind is _Timer.RELAY:
            assert isinstance(ref, int)
            relay = self._relays.pop(ref, None)
            if relay is not None:
                self._send(relay.origin, Nack(relay.origin_seq, relay.target), relay.origin_address)
                self.counters["nack_sent"] += 1
        else:
            assert isinstance(ref, int)
            probe = self._probes.get(ref)
            if probe is not None:
                self._advance_probe(probe, kind)

    # -----------------------------------------------------------------------------------------
    # Probing

    def _next_seq(self) -> int:
        self._seq = self._seq % 0xFFFFFFFF + 1
        return self._seq

    def _next_probe_target(self) -> _Member | None:
        """Randomised round-robin: walk a shuffled list, reshuffled after each full round."""
        rebuilt = False
        while True:
            if self._probe_index >= len(self._probe_order):
                if rebuilt:
                    return None
                self._rebuild_probe_order()
                rebuilt = True
                if not self._probe_order:
                    return None
            key = self._probe_order[self._probe_index]
            self._probe_index += 1
            member = self._members.get(key)
            if member is None:
                continue
            member.in_probe_order = False
            if member.state in _LIVE:
                return member

    def _rebuild_probe_order(self) -> None:
        order = [k for k, m in self._members.items() if m.state in _LIVE and k != self._public_key]
        self._rng.shuffle(order)
        for key in order:
            self._members[key].in_probe_order = True
        self._probe_order = order
        self._probe_index = 0

    def _start_probe(self) -> None:
        member = self._next_probe_target()
        if member is None:
            return
        addr = member.target_address()
        if addr is None:
            self.counters["no_address"] += 1
            return
        self._launch_probe(member.public_key, addr, last_chance=False)

    def _launch_probe(self, target: bytes, addr: Address, *, last_chance: bool) -> int:
        seq = self._next_seq()
        self._probes[seq] = _Probe(seq, target, last_chance=last_chance)
        self._send_ping(target, seq, addr)
        now = self._now
        self._schedule(
            now + self._awareness.scale(self._config.probe_timeout), _Timer.PROBE_TIMEOUT, seq
        )
        period = 2 * self._config.probe_timeout if last_chance else self._config.protocol_period
        self._schedule(now + self._awareness.scale(period), _Timer.PROBE_END, seq)
        return seq

    def _start_last_chance_probe(self, member: _Member, suspicion: Suspicion) -> bool:
        """Probe a member whose suspicion ran out before declaring it dead; False if we cannot.

        Gossip reaches each member a random number of times, so at high loss a few members
        miss a refutation entirely and would declare a live member dead. The ping carries
        the accusation and the member answers it with its newest record; a member that is
        gone answers nothing, directly or through helpers, and dies two probe timeouts later
        (the direct wait, then as long again for the helpers).
        """
        addr = member.target_address()
        if addr is None or self._status is not RecordStatus.ALIVE:
            return False
        self.counters["last_chance_probes"] += 1
        suspicion.last_chance_probe = self._launch_probe(member.public_key, addr, last_chance=True)
        return True

    def _end_last_chance_probe(self, probe: _Probe, member: _Member | None) -> None:
        """Restart the suspicion of a member that answered, declare one that did not dead."""
        suspicion = None if member is None else member.suspicion
        if member is None or suspicion is None or suspicion.last_chance_probe != probe.seq:
            return
        if probe.acked:
            suspicion.restart(self._now)
            self._schedule(suspicion.deadline, _Timer.SUSPICION, member.public_key)
        else:
            self._declare_dead(member)

    def _declare_dead(self, member: _Member) -> None:
        key = member.public_key
        self._set_state(member, MemberState.DEAD, member.incarnation, self._public_key)
        self._enqueue(key, Dead(key, member.incarnation, self._public_key))

    def _advance_probe(self, probe: _Probe, kind: _Timer) -> None:
        member = self._members.get(probe.target)
        if kind is _Timer.PROBE_TIMEOUT:
            if probe.acked or probe.phase is not _ProbePhase.DIRECT:
                return
            probe.phase = _ProbePhase.INDIRECT
            if member is None:
                return
            addr = member.target_address()
            if addr is None:
                return
            endpoint = Endpoint(addr[0], addr[1])
            helpers = self._alive.sample(
                self._rng, self._config.indirect_probes, (probe.target, self._public_key)
            )
            probe.helpers = tuple(helpers)
            for key in helpers:
                helper = self._members[key]
                helper_addr = helper.target_address()
                if helper_addr is None:
                    continue
                bare = encoded_size(PingReq(probe.seq, probe.target, endpoint))
                updates = self._piggyback(bare, ())
                self._send(key, PingReq(probe.seq, probe.target, endpoint, updates), helper_addr)
                self.counters["ping_req_sent"] += 1
        elif kind is _Timer.PROBE_END:
            if probe.phase is _ProbePhase.SETTLING:
                return
            probe.phase = _ProbePhase.SETTLING
            self._schedule(self._now + self._config.probe_timeout, _Timer.PROBE_SETTLE, probe.seq)
            if not probe.acked:
                self.counters["probe_failed"] += 1
                if member is not None:
                    member.address = None
                    member.endpoint_index += 1
            if probe.last_chance:
                self._end_last_chance_probe(probe, member)
            elif (
                not probe.acked
                and member is not None
                and member.state in _LIVE
                and self._status is RecordStatus.ALIVE
            ):
                self._on_suspect(probe.target, member.incarnation, self._public_key)
        else:
            del self._probes[probe.seq]
            if probe.acked:
                return
            expected = len(probe.helpers)
            self._awareness.apply(expected - len(probe.nacks) if expected else 1)

    # -----------------------------------------------------------------------------------------
    # Gossip rounds, push-pull, reconnecting and rejoining

    def _gossip_round(self) -> None:
        targets = self._alive.sample(self._rng, self._config.gossip_nodes, ())
        for key in targets:
            if not len(self._queue) or not self._send_gossip(self._members[key]):
                break

    def _push_pull(self) -> None:
        """State exchange with a random member; after a join, a quiet one with the seed.

        The joiner's follow-up fetches the members that joined after its seed's answer
        (gossip brings them too, but in a mass join the gossip queues hold hundreds of
        records and the last few take minutes). The seed heard of every joiner first hand,
        so its view is the fullest; what it sends is not gossiped on, as the join's answer.
        """
        if self._follow_up_due:
            self._follow_up_due = False
            self._pull_attempts_left = PULL_ATTEMPTS
            if self._pull_from_seed():
                return
        chosen = self._alive.sample(self._rng, 1, ())
        if chosen:
            member = self._members[chosen[0]]
            addr = member.target_address()
            if addr is not None:
                self._start_exchange(member.public_key, addr)

    def _pull_from_seed(self) -> bool:
        """One digest exchange of the follow-up pull; asked again ``JOIN_REPLY_PERIODS``
        later unless the seed's answer came whole: its digest equal to the one we opened with
        (it then sends nothing) or to our state now, or every chunk of what differs (a lost
        digest or chunk would otherwise leave members unknown until the next push-pull,
        minutes away at 1000 members, since what the pull brings is not gossiped; each new
        exchange asks only for what still differs). False: nothing sent.
        """
        seed_addr, seed = self._join_seed
        if self._pull_attempts_left <= 0 or seed is None or seed not in self._trusted:
            return False
        self._pull_attempts_left -= 1
        self._pull_parts = set()
        exchange = self._start_exchange(seed, seed_addr, quiet=True)
        retry_at = self._now + JOIN_REPLY_PERIODS * self._config.protocol_period
        self._schedule(retry_at, _Timer.PULL_RETRY, exchange)
        return True

    def _push_pull_wait(self, members: int) -> float:
        """Time to the next periodic exchange: the scaled period, jittered ±50% so that
        members that joined together do not exchange together."""
        return self._config.push_pull_period(members) * self._rng.uniform(0.5, 1.5)

    def _reconnect(self) -> None:
        """Try a dead member, and seeds that are not live members, now and then.

        Serf-style: the cluster as a whole tries each dead member about once per interval
        (probability dead / live per node), so two sides of a partition that declared each
        other dead find each other again. Seeds are tried with probability 1 / live per node:
        that rejoins an isolated node every interval and heals partitions that outlived
        ``dead_reap_after`` (when the other side is forgotten, a seed is the only way back).
        """
        dead = len(self._dead)
        if dead and self._rng.random() < dead / self._live_count:
            member = self._members[self._dead.sample(self._rng, 1, ())[0]]
            addr = member.target_address()
            if addr is not None:
                self.counters["reconnect_attempts"] += 1
                self._start_exchange(member.public_key, addr)
        if not self._seeds:
            return
        by_address: dict[Address, bytes] | None = None
        for addr, seed_key in list(self._seeds.items()):
            known = seed_key
            if known is None:
                if by_address is None:
                    by_address = self._members_by_address()
                known = by_address.get(addr)
            if known is not None and known in self._members and self._members[known].state in _LIVE:
                continue
            if self._rng.random() < 1 / self._live_count:
                self.counters["seed_attempts"] += 1
                self._contact_seed(addr, known)

    def _members_by_address(self) -> dict[Address, bytes]:
        by_address: dict[Address, bytes] = {}
        for key, member in self._members.items():
            if key == self._public_key:
                continue
            if member.address is not None:
                by_address.setdefault(member.address, key)
            for endpoint in member.record.endpoints:
                by_address.setdefault((endpoint.host, endpoint.port), key)
        return by_address

    def _contact_seed(self, addr: Address, known: bytes | None, exchange: int = 0) -> None:
        """Full state to a seed whose key we know, else a hello for each trusted key; both
        ask for the seed's state (``exchange`` 0: a fresh exchange id)."""
        exchange = exchange or self._rng.getrandbits(64)
        if known is not None and known in self._trusted:
            self._send_state(known, addr, exchange, True)
            return
        for key in tuple(self._trusted):
            self._send_hello(key, addr, exchange, True)

    def _tell_newcomer(self, newcomer: bytes) -> None:
        """Send a joiner we answered the records of members that became live since.

        Members joining together miss each other in their seeds' answers, and gossip about
        them may never pass a joiner's NAT (it accepts datagrams only from members it has
        contacted: at first, its seed). The seed knows what it told the joiner, so it sends
        the difference once, as gossip-only datagrams.
        """
        told = self._newcomers.pop(newcomer, None)
        if told is None or newcomer not in self._trusted:
            return
        order, addr = told
        fresh = [
            Alive(m.record)
            for m in self._members.values()
            if m.live_order > order and m.state in _LIVE and m.public_key != newcomer
        ]
        bare = encoded_size(Ack(GOSSIP_SEQ))
        batch: list[Update] = []
        room = MAX_DATAGRAM - bare
        for update in fresh:
            size = update_size(update)
            if size > room and batch:
                self._send(newcomer, Ack(GOSSIP_SEQ, tuple(batch)), addr)
                self.counters["newcomer_updates_sent"] += 1
                batch, room = [], MAX_DATAGRAM - bare
            batch.append(update)
            room -= size
        if batch:
            self._send(newcomer, Ack(GOSSIP_SEQ, tuple(batch)), addr)
            self.counters["newcomer_updates_sent"] += 1

    def _check_join_reply(self) -> None:
        """Ask again when the seed's full state did not come, or came with chunks missing.

        A lost chunk would otherwise leave its members unknown to the joiner until periodic
        push-pull, since what a joiner learns from its seed is not gossiped (``_on_record``).
        """
        if self._join_answered and len(self._join_parts) >= self._join_parts_total:
            return
        if self._join_attempts_left <= 0 or self._status is not RecordStatus.ALIVE:
            return
        self.counters["seed_attempts"] += 1
        if not self._join_answered and self._join_backups:
            self._ask_seed_for_state(*self._join_backups.pop(0))
        else:
            self._ask_seed_for_state(*self._join_seed, again=True)

    def _announce_to_seed(self, addr: Address, known: bytes | None) -> None:
        """Our record alone to a seed (its key, else every trusted key), asking nothing back."""
        keys = (known,) if known is not None and known in self._trusted else tuple(self._trusted)
        exchange = self._rng.getrandbits(64)
        for key in keys:
            self._send_hello(key, addr, exchange, False)

    def _ask_seed_for_state(
        self, addr: Address, known: bytes | None, *, again: bool = False
    ) -> None:
        """Start (or retry) the join's full state exchange with this seed.

        ``again``: the same seed once more; chunks already received count if its answer has
        as many chunks (its state did not change, so each chunk holds the same members): at
        1% loss a 100-chunk state arrives whole only 37% of the time, two answers 99%.
        """
        self._join_attempts_left -= 1
        self._join_exchange = self._rng.getrandbits(64) or 1
        self._join_answered = False
        self._join_seed = (addr, known)
        if not again:
            self._join_parts = set()
            self._join_parts_total = 0
        self._contact_seed(addr, known, self._join_exchange)
        retry_at = self._now + JOIN_REPLY_PERIODS * self._config.protocol_period
        self._schedule(retry_at, _Timer.JOIN_RETRY, self._join_exchange)
