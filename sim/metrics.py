"""What a run measures: the trace hash, membership ground truth against every node's view,
convergence, failure detection, false positives, and the sampled time series.

Every node's view is tracked incrementally from the membership events its core emits, so
checking "does every live node know every live member" costs O(1) per event instead of
O(N²) per check. At the end of a run the tracked views are compared with each core's own
``members()`` table, so a core whose events disagree with its state is caught too.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import blake3

from meshguard.sansio.types import Address

KNOWN_STATES = ("ALIVE", "SUSPECT")
"""Member states in which an observer counts a member as part of its view."""

_ADD_EVENTS = frozenset(("MemberJoined", "MemberAlive", "MemberSuspected"))
_REMOVE_EVENTS = frozenset(("MemberDead", "MemberLeft", "MemberReaped", "MemberUntrusted"))
_ACCUSATION_EVENTS = frozenset(("MemberSuspected", "MemberDead"))


class MemberViewLike(Protocol):
    @property
    def public_key(self) -> bytes: ...
    @property
    def incarnation(self) -> int: ...
    @property
    def state(self) -> object: ...


class MembershipTable(Protocol):
    """The read side of a core that the metrics inspect."""

    def member(self, public_key: bytes) -> MemberViewLike | None: ...
    def members(self) -> Sequence[MemberViewLike]: ...


Observed = tuple[str, bytes | None, int | None]
"""A membership event as the tracker reads it: (event class name, member key, incarnation);
plain tuples, so a parallel run ships them between processes cheaply."""


def observed(events: Iterable[object]) -> list[Observed]:
    """A core's events as ``Observed`` tuples."""
    return [(type(event).__name__, getattr(event, "public_key", None),
             getattr(event, "incarnation", None)) for event in events]


def known_members(table: MembershipTable, own_key: bytes) -> set[bytes]:
    """The members a core's own table counts in its view (``KNOWN_STATES``, not itself)."""
    return {view.public_key for view in table.members()
            if view.public_key != own_key and state_name(view.state) in KNOWN_STATES}


def state_name(state: object) -> str:
    """``MemberState.ALIVE`` and ``"ALIVE"`` both read as ``"ALIVE"``."""
    name = getattr(state, "name", None)
    return name if isinstance(name, str) else str(state)


_DELIVERY = struct.Struct("<cdI")
_EVENT = _DELIVERY
_OBSERVATION = struct.Struct("<cdHi")
_CHAIN_FLUSH_PARTS = 96
"""Parts a chain keeps before hashing them: BLAKE3 of the concatenation is the same as of the
parts fed one by one, and one ``update`` per few dozen parts costs far less; bounded so that
a thousand chains do not hold many datagrams alive."""

GLOBAL_CHAIN = "G"
"""The chain of run-wide events (partitions, loss changes)."""


def delivery_chain(address: Address) -> str:
    return f"D{address[0]}:{address[1]}"


def host_chain(name: str) -> str:
    return f"H{name}"


def observer_chain(number: int) -> str:
    return f"M{number}"


class _Chain:
    """One ordered sequence of trace records and its running hash."""

    __slots__ = ("hasher", "pending", "records")

    def __init__(self) -> None:
        self.hasher = blake3.blake3()
        self.pending: list[bytes] = []
        self.records = 0

    def flush(self) -> None:
        self.hasher.update(b"".join(self.pending))
        self.pending.clear()

    def hexdigest(self) -> str:
        self.flush()
        return self.hasher.hexdigest()


class Trace:
    """A digest of everything that happened: deliveries and events, as ordered chains.

    Each host has a chain of the datagrams delivered to it, one of what happened to it
    (start, crash, leave) and one of the membership events its core reported; run-wide events
    have their own. Records are (time as IEEE double, kind, fields, payload). Two runs have
    the same hash exactly when every chain is the same: the same bytes delivered between the
    same addresses at the same times and the same events in the same order at each host. The
    order *between* hosts is left out on purpose: it carries no behaviour (a datagram takes
    at least the shortest link latency), and a parallel run interleaves hosts differently.
    """

    def __init__(self) -> None:
        self._chains: dict[str, _Chain] = {}
        self._delivery_chains: dict[Address, _Chain] = {}
        self._addresses: dict[Address, bytes] = {}
        self._kinds: dict[str, int] = {}

    def chain(self, label: str) -> _Chain:
        found = self._chains.get(label)
        if found is None:
            found = self._chains[label] = _Chain()
        return found

    def _address(self, address: Address) -> bytes:
        encoded = self._addresses.get(address)
        if encoded is None:
            encoded = f"{address[0]}:{address[1]}".encode()
            encoded = struct.pack("<B", len(encoded)) + encoded
            self._addresses[address] = encoded
        return encoded

    def _delivery_chain(self, address: Address) -> _Chain:
        chain = self._delivery_chains[address] = self.chain(delivery_chain(address))
        return chain

    def delivery(self, now: float, src: Address, dst: Address, data: bytes) -> None:
        chain = self._delivery_chains.get(dst) or self._delivery_chain(dst)
        pending = chain.pending
        pending += (_DELIVERY.pack(b"D", now, len(data)),
                    self._addresses.get(src) or self._address(src), data)
        chain.records += 1
        if len(pending) >= _CHAIN_FLUSH_PARTS:
            chain.flush()

    def event(self, now: float, text: str, label: str = GLOBAL_CHAIN) -> None:
        """A scheduled event, on the chain ``label`` (a host's, or the run-wide one)."""
        encoded = text.encode()
        chain = self.chain(label)
        chain.pending += (_EVENT.pack(b"E", now, len(encoded)), encoded)
        chain.records += 1
        if len(chain.pending) >= _CHAIN_FLUSH_PARTS:
            chain.flush()

    def observations(self, now: float, observer: int, items: list[tuple[str, int]]) -> None:
        """Membership events at ``now``: node number ``observer`` reports each ``(kind,
        subject)`` of ``items``, in order."""
        kinds = self._kinds
        pack = _OBSERVATION.pack
        chain = self.chain(observer_chain(observer))
        pending = chain.pending
        for kind, subject in items:
            code = kinds.get(kind)
            if code is None:
                code = kinds[kind] = len(kinds)
                self.event(now, f"kind {code} {kind}")
            pending.append(pack(b"M", now, code, subject))
        chain.records += len(items)
        if len(pending) >= _CHAIN_FLUSH_PARTS:
            chain.flush()

    def chain_digests(self) -> dict[str, tuple[str, int]]:
        """Every chain's (hash, record count), to be combined with other processes'."""
        return {label: (chain.hexdigest(), chain.records) for label, chain in self._chains.items()}

    def hexdigest(self) -> str:
        return combined_digest(self.chain_digests())


def combined_digest(chains: dict[str, tuple[str, int]]) -> str:
    """The trace hash: BLAKE3 over every chain's label and hash, in label order."""
    hasher = blake3.blake3()
    for label in sorted(chains):
        hasher.update(f"{label}={chains[label][0]};".encode())
    return hasher.hexdigest()


@dataclass(slots=True)
class _Subject:
    """A simulated node as the member an event is about: one lookup by public key gives its
    name, its number in the trace and whether it is live, which ``on_events`` needs for
    every event (three lookups in three tables cost a cache miss each with 1000 nodes)."""

    name: str
    number: int
    live: bool = False


@dataclass(slots=True)
class CrashRecord:
    """How the mesh noticed one crash."""

    node: str
    crashed_at: float
    known_by: int
    pending: set[str]
    first_suspicion: float | None = None
    first_death: float | None = None
    disseminated: float | None = None
    restarted_before_detection: bool = False

    def as_dict(self) -> dict[str, Any]:
        def after(moment: float | None) -> float | None:
            return None if moment is None else round(moment - self.crashed_at, 6)

        return {
            "node": self.node,
            "crashed_at": round(self.crashed_at, 6),
            "known_by": self.known_by,
            "first_suspicion": after(self.first_suspicion),
            "first_death": after(self.first_death),
            "full_dissemination": after(self.disseminated),
            "restarted_before_detection": self.restarted_before_detection,
        }


@dataclass(slots=True)
class Violation:
    """A broken invariant, with when it was seen."""

    at: float
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"t={self.at:.3f}s {self.invariant}: {self.detail}"


@dataclass(slots=True)
class Series:
    """Sampled time series, one row per sample (and per live node for views)."""

    views: list[tuple[float, str, int]] = field(default_factory=list)
    messages: list[dict[str, float]] = field(default_factory=list)

    VIEW_COLUMNS: ClassVar[tuple[str, ...]] = ("time", "node", "known_members")
    MESSAGE_COLUMNS: ClassVar[tuple[str, ...]] = (
        "time", "live_nodes", "converged", "converged_fraction", "sent", "delivered", "lost",
        "partitioned", "bytes_sent", "suspicions", "deaths")
    NETWORK_COLUMNS: ClassVar[tuple[str, ...]] = (
        "sent", "delivered", "lost", "partitioned", "bytes_sent")


class MembershipTracker:
    """Ground truth (who is live) against each node's view (whom it knows)."""

    def __init__(self, keys: dict[str, bytes], trace: Trace) -> None:
        self.keys = keys
        self.names = {key: name for name, key in keys.items()}
        self.numbers = {name: number for number, name in enumerate(keys)}
        self._subjects = {key: _Subject(name, self.numbers[name])
                          for key, name in self.names.items()}
        self.trace = trace
        self.live: dict[str, None] = {}
        self.known: dict[str, set[bytes]] = {}
        self.hits: dict[str, int] = {}
        self.full = 0
        self.ever_crashed: set[str] = set()
        self.incarnations: dict[str, dict[bytes, int]] = {}
        self.crashes: list[CrashRecord] = []
        self._open_crashes: dict[str, CrashRecord] = {}
        self.violations: list[Violation] = []
        self.false_suspicions: dict[tuple[bytes, int], int] = {}
        self.false_deaths: dict[tuple[bytes, int], int] = {}
        self.accusations_of_restarted = 0
        self.event_counts: dict[str, int] = {}
        self.converged = False
        self.converged_at: float | None = None
        self.awaiting_initial: set[str] = set()
        """Initial nodes not started yet: ``converged_at`` counts only after the mass join."""
        self.transitions: list[tuple[float, bool]] = []
        self.node_seconds = 0.0
        self._last_change = 0.0
        self._interval_events = {"MemberSuspected": 0, "MemberDead": 0}

    # -- ground truth ---------------------------------------------------------------------

    def _account_time(self, now: float) -> None:
        self.node_seconds += len(self.live) * (now - self._last_change)
        self._last_change = now

    def node_up(self, name: str, now: float) -> None:
        """``name`` starts a fresh core (first join or restart): it knows nobody yet."""
        self._account_time(now)
        key = self.keys[name]
        record = self._open_crashes.pop(name, None)
        if record is not None:
            record.restarted_before_detection = record.disseminated is None
        for observer in self.live:
            if key in self.known[observer]:
                self.hits[observer] += 1
        self.awaiting_initial.discard(name)
        self.live[name] = None
        self._subjects[key].live = True
        self.known[name] = set()
        self.hits[name] = 0
        self.incarnations[name] = {}
        self._recount(now)

    def node_down(self, name: str, now: float, *, crashed: bool) -> None:
        """``name`` stopped being a live member (crash, or graceful leave)."""
        self._account_time(now)
        key = self.keys[name]
        del self.live[name]
        self._subjects[key].live = False
        self.known.pop(name, None)
        self.hits.pop(name, None)
        self.incarnations.pop(name, None)
        for observer in self.live:
            if key in self.known[observer]:
                self.hits[observer] -= 1
        for record in list(self._open_crashes.values()):
            self._settle_observer(record, name, now)
        if crashed:
            self.ever_crashed.add(name)
            pending = {observer for observer in self.live if key in self.known[observer]}
            record = CrashRecord(name, now, len(pending), pending)
            self.crashes.append(record)
            self._open_crashes[name] = record
            if not pending:
                record.disseminated = now
        self._recount(now)

    def _settle_observer(self, record: CrashRecord, observer: str, now: float) -> None:
        record.pending.discard(observer)
        if not record.pending and record.disseminated is None:
            record.disseminated = now

    def _recount(self, now: float) -> None:
        target = len(self.live) - 1
        self.full = sum(1 for observer in self.live if self.hits[observer] == target)
        self._check_converged(now)

    def _check_converged(self, now: float) -> None:
        converged = self.full == len(self.live) and bool(self.live)
        if converged != self.converged:
            self.converged = converged
            self.transitions.append((now, converged))
        if converged and self.converged_at is None and not self.awaiting_initial:
            self.converged_at = now

    # -- observations ---------------------------------------------------------------------

    def on_events(self, observer: str, events: Iterable[Observed], now: float) -> None:
        """One core's batch of events (as ``observed`` gives them): counted, traced, and
        applied to the observer's tracked view (its hit count is kept in a local for the
        batch)."""
        if observer not in self.live:
            return
        own_key = self.keys[observer]
        known = self.known[observer]
        seen = self.incarnations[observer]
        live = self.live
        subjects = self._subjects
        counts = self.event_counts
        interval_events = self._interval_events
        observed: list[tuple[str, int]] = []
        target = len(live) - 1
        hits = self.hits[observer]
        full_change = 0
        for kind, key, incarnation in events:
            counts[kind] = counts.get(kind, 0) + 1
            if key is None:
                continue
            known_subject = subjects.get(key)
            if known_subject is None:
                observed.append((kind, -1))
                subject = key.hex()[:12]
                subject_live = subject in live
            else:
                observed.append((kind, known_subject.number))
                subject = known_subject.name
                subject_live = known_subject.live
            if key == own_key:
                continue
            if kind in interval_events:
                interval_events[kind] += 1
            if incarnation is None:
                seen.pop(key, None)  # reaped or untrusted: the core forgot the member
            else:
                previous = seen.get(key)
                if previous is None or incarnation > previous:
                    seen[key] = incarnation
                elif incarnation < previous:
                    self._incarnation_went_back(observer, subject, previous, incarnation, now)
            if subject_live and kind in _ACCUSATION_EVENTS:
                if subject in self.ever_crashed:
                    self.accusations_of_restarted += 1
                else:
                    episodes = (self.false_suspicions if kind == "MemberSuspected"
                                else self.false_deaths)
                    episode = (key, incarnation or 0)
                    episodes[episode] = episodes.get(episode, 0) + 1
            if self._open_crashes:
                record = self._open_crashes.get(subject)
                if record is not None:
                    if kind == "MemberSuspected" and record.first_suspicion is None:
                        record.first_suspicion = now
                    if kind in _REMOVE_EVENTS:
                        if kind == "MemberDead" and record.first_death is None:
                            record.first_death = now
                        self._settle_observer(record, observer, now)
            if kind in _ADD_EVENTS:
                if key not in known:
                    known.add(key)
                    if subject_live:
                        hits += 1
                        full_change += (hits == target) - (hits - 1 == target)
            elif kind in _REMOVE_EVENTS and key in known:
                known.discard(key)
                if subject_live:
                    hits -= 1
                    full_change += (hits == target) - (hits + 1 == target)
        self.hits[observer] = hits
        self.full += full_change
        if observed:
            self.trace.observations(now, self.numbers[observer], observed)
        self._check_converged(now)

    def _incarnation_went_back(self, observer: str, subject: str, previous: int,
                               incarnation: int, now: float) -> None:
        """The incarnation an event reports is the member's incarnation in the observer's
        table at that moment (the core sets both together), so events alone are checked."""
        self.violations.append(Violation(
            now, "incarnations never go backwards",
            f"{observer} saw {subject} go from incarnation {previous} to {incarnation}"))

    def check_views(self, now: float, views: dict[str, set[bytes]]) -> None:
        """Each live core's own table (``known_members``) must agree with the view built
        from its events."""
        for observer in self.live:
            actual = views[observer]
            tracked = self.known[observer]
            if actual != tracked:
                missing = sorted(self.names.get(key, key.hex()[:12]) for key in actual - tracked)
                extra = sorted(self.names.get(key, key.hex()[:12]) for key in tracked - actual)
                self.violations.append(Violation(
                    now, "events agree with members()",
                    f"{observer}: members() has {missing[:5]} without events, events left "
                    f"{extra[:5]} that members() no longer has alive"))

    # -- sampling -------------------------------------------------------------------------

    def sample(self, now: float, series: Series) -> None:
        """A row of the membership columns; the runner adds the network's (``NETWORK_COLUMNS``)
        once every process's counters are in."""
        for observer in self.live:
            series.views.append((now, observer, len(self.known[observer])))
        live = len(self.live)
        series.messages.append({
            "time": now,
            "live_nodes": live,
            "converged": int(self.converged),
            "converged_fraction": self.full / live if live else 0.0,
            "suspicions": self._interval_events["MemberSuspected"],
            "deaths": self._interval_events["MemberDead"],
        })
        self._interval_events = dict.fromkeys(self._interval_events, 0)

    @property
    def false_positive_suspicions(self) -> int:
        """Distinct (member, incarnation) suspicions of a live, never-crashed member."""
        return len(self.false_suspicions)

    @property
    def false_positive_deaths(self) -> int:
        """Distinct (member, incarnation) death declarations of a live, never-crashed member."""
        return len(self.false_deaths)

    def finish(self, now: float) -> None:
        self._account_time(now)

    def final_convergence(self) -> float | None:
        """When the mesh last became converged, if it is converged at the end."""
        if not self.converged or not self.transitions:
            return None
        return self.transitions[-1][0]


def summarise(values: Sequence[float]) -> dict[str, float] | None:
    """Count, mean, median, 95th percentile and max of a sample (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "count": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 6),
        "median": round(quantile(0.5), 6),
        "p95": round(quantile(0.95), 6),
        "max": round(ordered[-1], 6),
    }
