"""An in-memory cluster of ``Membership`` cores joined by a hand-driven network.

No sockets, no clock: the test owns time. Datagrams wait in flight for a fixed latency and are
delivered in order of arrival time; per-pair rules drop them (partitions, one-way breaks),
a seeded random loss rate drops some more, nodes crash and restart with the same key.
Every datagram a core emits is checked against the 1280-byte budget on the way out.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from meshguard.identity.keys import Identity
from meshguard.sansio.codec import MAX_DATAGRAM
from meshguard.sansio.messages import Endpoint
from meshguard.sansio.swim import Membership, MembershipEvent, MemberState, SwimConfig
from meshguard.sansio.types import Address

PORT = 51821


def identity(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(f"swim-test:{name}".encode()).digest())


def entropy_stream(rng: random.Random) -> Callable[[int], bytes]:
    return rng.randbytes


@dataclass(order=True)
class _InFlight:
    arrives: float
    order: int
    data: bytes = field(compare=False)
    source: Address = field(compare=False)
    destination: Address = field(compare=False)


class Cluster:
    """``size`` nodes with addresses 10.0.0.1.. on one port; nodes start stopped."""

    def __init__(
        self,
        size: int,
        *,
        config: SwimConfig | None = None,
        seed: int = 1,
        latency: float = 0.01,
        loss: float = 0.0,
        extra_trusted: Sequence[bytes] = (),
    ) -> None:
        self.config = config if config is not None else SwimConfig()
        self.seed = seed
        self.latency = latency
        self.loss = loss
        self.now = 0.0
        self.identities = [identity(f"{seed}:{i}") for i in range(size)]
        self.keys = [i.public_key for i in self.identities]
        self.trusted = [*self.keys, *extra_trusted]
        self.addresses: list[Address] = [(f"10.0.0.{i + 1}", PORT) for i in range(size)]
        self.index_of = {address: i for i, address in enumerate(self.addresses)}
        self.nodes: list[Membership | None] = [None] * size
        self.events: list[list[tuple[float, MembershipEvent]]] = [[] for _ in range(size)]
        self.blocked: dict[tuple[int, int], None] = {}
        self.network_rng = random.Random(f"network:{seed}")
        self._flight: list[_InFlight] = []
        self._order = 0
        self._restarts = [0] * size
        self.sent = [0] * size
        self.delivered = 0
        self.dropped = 0
        self.largest_datagram = 0
        self.taps: list[Callable[[int, Address, bytes], None]] = []
        """Called with (sender index, destination, datagram) for every datagram sent."""

    # -- nodes -------------------------------------------------------------------------

    def start(self, index: int, *, config: SwimConfig | None = None, incarnation: int = 0) -> None:
        label = f"{self.seed}:{index}:{self._restarts[index]}"
        self._restarts[index] += 1
        host, port = self.addresses[index]
        self.nodes[index] = Membership(
            self.identities[index],
            config=config if config is not None else self.config,
            trusted_keys=self.trusted,
            advertised_endpoints=[Endpoint(host, port)],
            rng=random.Random(f"rng:{label}"),
            entropy=entropy_stream(random.Random(f"entropy:{label}")),
            now=self.now,
            incarnation=incarnation,
        )

    def start_all(self, *, join_via: int | None = 0, spread: float = 0.0) -> None:
        """Start every node; each joins through node ``join_via`` (by address and key)."""
        for index in range(len(self.nodes)):
            self.start(index)
        if join_via is None:
            return
        for index in range(len(self.nodes)):
            if index != join_via:
                self.join(index, [join_via])
                if spread:
                    self.run_for(spread)

    def node(self, index: int) -> Membership:
        node = self.nodes[index]
        assert node is not None, f"node {index} is not running"
        return node

    def join(self, index: int, seeds: Iterable[int], *, with_keys: bool = True) -> None:
        seeds = list(seeds)
        node = self.node(index)
        keys = [self.keys[s] for s in seeds] if with_keys else []
        node.join([self.addresses[s] for s in seeds], self.now, seed_keys=keys)
        self._flush(index)

    def crash(self, index: int) -> None:
        self.nodes[index] = None

    def running(self) -> list[int]:
        return [i for i, node in enumerate(self.nodes) if node is not None]

    # -- network rules -----------------------------------------------------------------

    def block(self, a: int, b: int, *, both_ways: bool = True) -> None:
        self.blocked[(a, b)] = None
        if both_ways:
            self.blocked[(b, a)] = None

    def unblock(self, a: int, b: int) -> None:
        self.blocked.pop((a, b), None)
        self.blocked.pop((b, a), None)

    def partition(self, *groups: Sequence[int]) -> None:
        for group in groups:
            for other in groups:
                if other is not group:
                    for a in group:
                        for b in other:
                            self.blocked[(a, b)] = None

    def heal(self) -> None:
        self.blocked.clear()

    # -- time --------------------------------------------------------------------------

    def inject(self, data: bytes, source: Address, destination: int) -> None:
        """Deliver a datagram from outside the cluster (a forger, a stranger) right now."""
        self.node(destination).receive_datagram(data, source, self.now)
        self._flush(destination)

    def _flush(self, index: int) -> None:
        node = self.nodes[index]
        if node is None:
            return
        for data, destination in node.datagrams_to_send():
            assert len(data) <= MAX_DATAGRAM, f"datagram of {len(data)} bytes"
            self.largest_datagram = max(self.largest_datagram, len(data))
            self.sent[index] += 1
            for tap in self.taps:
                tap(index, destination, data)
            self._send(data, self.addresses[index], destination)
        for event in node.events():
            self.events[index].append((self.now, event))

    def _send(self, data: bytes, source: Address, destination: Address) -> None:
        target = self.index_of.get(destination)
        if target is None:
            self.dropped += 1
            return
        if (self.index_of[source], target) in self.blocked:
            self.dropped += 1
            return
        if self.loss and self.network_rng.random() < self.loss:
            self.dropped += 1
            return
        self._order += 1
        heapq.heappush(
            self._flight, _InFlight(self.now + self.latency, self._order, data, source, destination)
        )

    def _next_time(self) -> float | None:
        times = [item for item in (node.next_deadline() for node in self.nodes if node) if item]
        if self._flight:
            times.append(self._flight[0].arrives)
        return min(times) if times else None

    def run_until(self, end: float) -> None:
        while True:
            when = self._next_time()
            if when is None or when > end:
                self.now = max(self.now, end)
                return
            assert when >= self.now - 1e-9, "a core asked for a deadline in the past"
            self.now = max(self.now, when)
            while self._flight and self._flight[0].arrives <= self.now:
                item = heapq.heappop(self._flight)
                target = self.index_of[item.destination]
                node = self.nodes[target]
                if node is None:
                    self.dropped += 1
                    continue
                self.delivered += 1
                node.receive_datagram(item.data, item.source, self.now)
                self._flush(target)
            for index, node in enumerate(self.nodes):
                if node is not None:
                    deadline = node.next_deadline()
                    if deadline is not None and deadline <= self.now:
                        node.on_timer(self.now)
                        self._flush(index)

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    # -- observations ------------------------------------------------------------------

    def state(self, observer: int, member: int) -> MemberState | None:
        view = self.node(observer).member(self.keys[member])
        return None if view is None else view.state

    def converged(self, among: Iterable[int] | None = None) -> bool:
        """Every running node in ``among`` sees every other one alive."""
        group = list(among) if among is not None else self.running()
        for observer in group:
            node = self.node(observer)
            for other in group:
                if other == observer:
                    continue
                view = node.member(self.keys[other])
                if view is None or view.state is not MemberState.ALIVE:
                    return False
        return True

    def run_until_converged(self, limit: float, among: Iterable[int] | None = None) -> float:
        """Run in 0.1 s steps until converged; the time it took (fails past ``limit``)."""
        group = list(among) if among is not None else None
        start = self.now
        while not self.converged(group):
            assert self.now - start < limit, f"not converged after {limit} s"
            self.run_for(0.1)
        return self.now - start

    def events_of(self, index: int, kind: type) -> list[MembershipEvent]:
        return [event for _, event in self.events[index] if isinstance(event, kind)]
