"""The simulated underlay: a networkx graph of hosts, routers (and later NAT devices) whose
edges are links, and a SimPy-timed datagram delivery over it.

A datagram is addressed by (IP, port). The network finds the graph node that owns the
destination IP, takes the shortest path (by mean latency), and draws loss, delay, jitter,
reordering and duplication per link from the sending graph node's own seeded stream (so a
host's draws do not depend on what other hosts sent, nor on which process simulates them).
Delivery is a single SimPy timeout callback per datagram, never a process, so a thousand
chatty nodes stay cheap.

In a parallel run (``sim.parallel``) each process simulates some of the hosts: a datagram
for a host simulated elsewhere goes to ``outbox`` and is handed over at the next barrier.

Graph nodes may carry a ``middlebox`` attribute (a ``Middlebox``): every packet whose path
crosses it is handed to it, and it may rewrite the addresses or drop the packet. NAT devices
(issue 6) plug in here; if a middlebox changes the destination, routing continues from the
middlebox to the new destination's owner.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from heapq import heappush
from typing import Protocol

import networkx as nx
import simpy
from simpy.events import NORMAL

from meshguard.sansio.types import Address
from sim.scenario import Latency, LinkSpec, Scenario

MAX_MIDDLEBOX_HOPS = 8


@dataclass(frozen=True, slots=True)
class Packet:
    """A UDP datagram in flight."""

    src: Address
    dst: Address
    data: bytes


class Call:
    """One entry in SimPy's event queue that runs ``callbacks`` with itself at its time.

    ``simpy.Environment.step`` needs only ``callbacks`` and ``_ok`` of what it pops, so this
    slotted object stands in for a ``Timeout`` plus a ``partial`` per scheduled call: the
    simulator schedules one per datagram and per wake-up. It is queued as
    ``Environment.schedule`` queues an event, with a Timeout's priority, so ties keep SimPy's
    FIFO order.
    """

    __slots__ = ("callbacks", "value")
    _ok = True

    def __init__(self, callbacks: tuple[Callable[[Call], None], ...], value: object) -> None:
        self.callbacks: tuple[Callable[[Call], None], ...] | None = callbacks
        self.value = value


def call_later(env: simpy.Environment, delay: float,
               callbacks: tuple[Callable[[Call], None], ...], value: object) -> None:
    """Runs each of ``callbacks`` with a ``Call`` carrying ``value`` after ``delay``.

    The queue entry is the one ``Environment.schedule`` pushes, built here to save its call
    on the per-datagram path.
    """
    heappush(env._queue, (env._now + delay, NORMAL, next(env._eid),  # type: ignore[misc]
                          Call(callbacks, value)))


def call_at(env: simpy.Environment, moment: float,
            callbacks: tuple[Callable[[Call], None], ...], value: object) -> None:
    """``call_later`` at an absolute ``moment`` (not before now): a datagram handed over
    from another process arrives at exactly the time its sender computed."""
    heappush(env._queue, (moment, NORMAL, next(env._eid),  # type: ignore[misc]
                          Call(callbacks, value)))


class Middlebox(Protocol):
    """A device on a path that can rewrite or drop packets (a NAT device, a firewall)."""

    def forward(self, packet: Packet, now: float) -> Packet | None:
        """The packet as it leaves the device, or None to drop it."""
        ...


class Link:
    """A link's parameters plus the per-direction transmit queue used when bandwidth is set."""

    __slots__ = ("_high", "_low", "_mu", "_sigma", "busy_until", "dist", "duplicate", "ends",
                 "jitter", "loss", "mean_latency", "plain", "reorder", "reorder_delay",
                 "seconds_per_bit")

    def __init__(self, spec: LinkSpec, ends: tuple[str, str]) -> None:
        self.ends = ends
        latency = spec.latency
        self.dist = latency.dist
        self._low = latency.min
        self._high = latency.max
        self._sigma = latency.sigma
        self._mu = (math.log(latency.mean - latency.min) - latency.sigma ** 2 / 2
                    if latency.dist == "lognormal" else 0.0)
        self.mean_latency = mean_latency(latency)
        self.jitter = spec.jitter
        self.loss = spec.loss
        self.duplicate = spec.duplicate
        self.reorder = spec.reorder
        self.reorder_delay = spec.reorder_delay
        self.seconds_per_bit = 0.0 if spec.bandwidth is None else 1.0 / spec.bandwidth
        self.busy_until = [0.0, 0.0]
        self.plain = not (self.seconds_per_bit or self.reorder or self.duplicate)
        """Only loss and delay: a datagram crosses it without any per-link state."""

    def sample_delay(self, rng: random.Random) -> float:
        if self.dist == "constant":
            delay = self._low
        elif self.dist == "uniform":
            delay = self._low + (self._high - self._low) * rng.random()
        else:
            delay = self._low + math.exp(rng.gauss(self._mu, self._sigma))
        if self.jitter:
            delay += self.jitter * rng.random()
        return delay


def mean_latency(latency: Latency) -> float:
    if latency.dist == "uniform":
        return (latency.min + latency.max) / 2
    if latency.dist == "lognormal":
        return latency.mean
    return latency.min


def router_name(group: str) -> str:
    return f"router:{group}"


def build_underlay(scenario: Scenario, hosts: Iterable[tuple[str, str]]) -> nx.Graph:
    """The graph for a scenario: one router per group, routers fully meshed by ``inter``
    links (``between`` overrides), each host on its group's router by an ``access`` link.

    ``hosts`` are (host name, group) pairs, every host the run may ever start.
    """
    graph = nx.Graph()
    groups = [group.name for group in scenario.nodes.groups]
    for group in groups:
        graph.add_node(router_name(group), kind="router", group=group)
    overrides = {frozenset(pair.groups): pair.link for pair in scenario.network.between}
    for index, first in enumerate(groups):
        for second in groups[index + 1:]:
            spec = overrides.get(frozenset((first, second)), scenario.network.inter)
            add_link(graph, router_name(first), router_name(second), spec)
    for host, group in hosts:
        add_host(graph, host, group, router_name(group), scenario.network.access)
    return graph


def add_host(graph: nx.Graph, host: str, group: str, attach_to: str, spec: LinkSpec) -> None:
    graph.add_node(host, kind="host", group=group)
    add_link(graph, host, attach_to, spec)


def add_link(graph: nx.Graph, first: str, second: str, spec: LinkSpec) -> None:
    link = Link(spec, (first, second))
    graph.add_edge(first, second, link=link, weight=link.mean_latency)


@dataclass(frozen=True, slots=True)
class _Cut:
    """An active partition: side a cannot reach side b (nor b reach a unless one-way)."""

    a_groups: frozenset[str]
    a_nodes: frozenset[str]
    b_groups: frozenset[str]
    b_nodes: frozenset[str]
    one_way: bool

    def blocks(self, src: str, src_group: str, dst: str, dst_group: str) -> bool:
        src_in_a = src in self.a_nodes or src_group in self.a_groups
        dst_in_b = dst in self.b_nodes or dst_group in self.b_groups
        if src_in_a and dst_in_b:
            return True
        if self.one_way:
            return False
        return ((src in self.b_nodes or src_group in self.b_groups)
                and (dst in self.a_nodes or dst_group in self.a_groups))


Hop = tuple[Link, int, str, "Middlebox | None"]
"""One link crossed in a direction (0: ends[0] to ends[1]), the node reached, its middlebox."""
Receiver = Callable[[bytes, Address], None]
DeliveryObserver = Callable[[float, Address, Address, bytes], None]
"""Called with (time, source, destination, data) for every datagram handed to a receiver."""
Datagram = tuple[Address, Address, bytes]
"""A datagram scheduled for delivery: (source, destination, data), cheaper to build than a
``Packet`` on the path that needs no middlebox."""
HandedOver = tuple[float, Address, Address, bytes]
"""A datagram for a host simulated by another process: (arrival time, source, destination,
data)."""


class Network:
    """Delivers datagrams between bound addresses over the underlay graph."""

    def __init__(self, env: simpy.Environment, graph: nx.Graph, rng: random.Random,
                 on_delivery: DeliveryObserver | None = None) -> None:
        self.env = env
        self.graph = graph
        self._stream_base = rng.getrandbits(64)
        """Each sending graph node draws from ``random.Random(f"{base}:{node}")``."""
        self._rngs: dict[str, random.Random] = {}
        self.on_delivery = on_delivery
        self.counters: dict[str, int] = dict.fromkeys(
            ("sent", "bytes_sent", "delivered", "bytes_delivered", "lost", "partitioned",
             "no_route", "no_listener", "duplicated", "middlebox_dropped"), 0)
        self._owner: dict[str, str] = {}
        self._receivers: dict[Address, Receiver] = {}
        self._group: dict[str, str] = {}
        self._cuts: dict[str, _Cut] = {}
        self._extra_loss = 0.0
        self._group_loss: dict[tuple[str, str], float] = {}
        self._leaf: dict[str, tuple[str, Hop, Hop]] = {}
        """Single-homed hosts: (attachment point, hop out of the host, hop into it)."""
        self._core_routes: dict[tuple[str, str], tuple[Hop, ...]] = {}
        self._plain_leaf: dict[str, tuple[str, Link]] = {}
        """Leaves whose link is plain and whose attachment point has no middlebox:
        (attachment point, link) for ``send``'s fast path."""
        self._plain_core: dict[tuple[str, str], tuple[Link, ...] | None] = {}
        """Core routes as bare links, None when a hop is not plain or has a middlebox."""
        self._deliver_callbacks = (self._deliver,)
        self._worker_of: dict[str, int] = {}
        """Hosts another process simulates, by that process's number (parallel runs)."""
        self.outbox: list[list[HandedOver]] = []
        """Datagrams for each process's hosts since the last ``take_outbox``."""
        self.topology_changed()

    def rng_of(self, node: str) -> random.Random:
        """The random stream of everything ``node`` sends."""
        rng = self._rngs.get(node)
        if rng is None:
            rng = self._rngs[node] = random.Random(f"{self._stream_base}:{node}")
        return rng

    # -- parallel runs -----------------------------------------------------------------------

    def split(self, worker_of: dict[str, int], worker: int, workers: int) -> None:
        """This process simulates the hosts ``worker_of`` maps to ``worker``; datagrams for
        the others are kept in ``outbox[their worker]``."""
        self._worker_of = {host: owner for host, owner in worker_of.items() if owner != worker}
        self.outbox = [[] for _ in range(workers)]

    def take_outbox(self) -> list[list[HandedOver]]:
        """The datagrams for other processes since the last call, by process number."""
        taken = self.outbox
        self.outbox = [[] for _ in taken]
        return taken

    def hand_in(self, datagrams: Iterable[HandedOver]) -> None:
        """Schedules datagrams another process sent to hosts simulated here."""
        env = self.env
        callbacks = self._deliver_callbacks
        for moment, src, dst, data in datagrams:
            if moment < env.now:
                raise RuntimeError(f"a datagram handed over at {env.now} arrives at {moment}: "
                                   "the lookahead is longer than the shortest path")
            call_at(env, moment, callbacks, (src, dst, data))

    # -- topology --------------------------------------------------------------------------

    def topology_changed(self) -> None:
        """Re-reads node attributes after the graph changed (new hosts or devices)."""
        self._group = {node: data.get("group", "") for node, data in self.graph.nodes(data=True)}
        self._core_routes.clear()
        self._leaf.clear()
        self._plain_leaf.clear()
        self._plain_core.clear()
        for node, data in self.graph.nodes(data=True):
            if data.get("kind") == "host" and self.graph.degree(node) == 1:
                (neighbour,) = self.graph.neighbors(node)
                link: Link = self.graph.edges[node, neighbour]["link"]
                middlebox = self.graph.nodes[neighbour].get("middlebox")
                direction = 0 if link.ends[0] == node else 1
                self._leaf[node] = (neighbour, (link, direction, neighbour, middlebox),
                                    (link, 1 - direction, node, None))
                if link.plain and middlebox is None:
                    self._plain_leaf[node] = (neighbour, link)

    def add_host(self, host: str, group: str, attach_to: str, spec: LinkSpec) -> None:
        add_host(self.graph, host, group, attach_to, spec)
        self.topology_changed()

    def assign_ip(self, ip: str, graph_node: str) -> None:
        """``graph_node`` owns ``ip``: datagrams to it are routed there."""
        if graph_node not in self.graph:
            raise KeyError(graph_node)
        self._owner[ip] = graph_node

    def bind(self, address: Address, receiver: Receiver) -> None:
        """Datagrams delivered to ``address`` go to ``receiver(data, source_address)``."""
        self._receivers[address] = receiver

    def unbind(self, address: Address) -> None:
        self._receivers.pop(address, None)

    # -- faults ----------------------------------------------------------------------------

    def partition(self, name: str, a: Iterable[str], b: Iterable[str], *, one_way: bool) -> None:
        """Cuts side ``a`` from side ``b``; each side lists group names and/or node names."""
        groups = set(self._group.values())

        def split(side: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
            items = list(side)
            return (frozenset(item for item in items if item in groups),
                    frozenset(item for item in items if item not in groups))

        a_groups, a_nodes = split(a)
        b_groups, b_nodes = split(b)
        self._cuts[name] = _Cut(a_groups, a_nodes, b_groups, b_nodes, one_way)

    def heal(self, name: str) -> None:
        """Ends one partition, or every partition for ``"all"``."""
        if name == "all":
            self._cuts.clear()
        else:
            self._cuts.pop(name, None)

    def set_loss(self, loss: float, between: tuple[str, str] | None = None) -> None:
        """Extra loss on top of the links': everywhere, or between two groups."""
        if between is None:
            self._extra_loss = loss
        else:
            self._group_loss[between] = loss
            self._group_loss[(between[1], between[0])] = loss

    # -- delivery --------------------------------------------------------------------------

    def send(self, src: Address, dst: Address, data: bytes) -> None:
        """Puts a datagram on the wire at the current simulated time."""
        counters = self.counters
        counters["sent"] += 1
        counters["bytes_sent"] += len(data)
        node = self._owner.get(src[0])
        target = self._owner.get(dst[0])
        if node is None or target is None:
            counters["no_route"] += 1
            return
        rng = self._rngs.get(node) or self.rng_of(node)
        if not (self._cuts or self._extra_loss or self._group_loss):
            links = self._plain_links(node, target)
            if links is not None:
                delay = 0.0
                for link in links:
                    loss = link.loss
                    if loss and rng.random() < loss:
                        counters["lost"] += 1
                        return
                    delay += link.sample_delay(rng)
                self._schedule(delay, target, (src, dst, data))
                return
        packet = Packet(src, dst, data)
        now = self.env.now
        delay = 0.0
        duplicate = False
        for _ in range(MAX_MIDDLEBOX_HOPS):
            if self._cuts or self._extra_loss or self._group_loss:
                verdict = self._fault(node, target, rng)
                if verdict is not None:
                    counters[verdict] += 1
                    return
            hops = self._route(node, target)
            if hops is None:
                counters["no_route"] += 1
                return
            redirected = False
            for link, direction, far_end, middlebox in hops:
                if link.loss and rng.random() < link.loss:
                    counters["lost"] += 1
                    return
                delay += link.sample_delay(rng)
                if link.seconds_per_bit:
                    start = max(now + delay, link.busy_until[direction])
                    link.busy_until[direction] = start + 8 * len(data) * link.seconds_per_bit
                    delay = link.busy_until[direction] - now
                if link.reorder and rng.random() < link.reorder:
                    delay += link.reorder_delay
                if link.duplicate and rng.random() < link.duplicate:
                    duplicate = True
                if middlebox is not None:
                    forwarded = middlebox.forward(packet, now + delay)
                    if forwarded is None:
                        counters["middlebox_dropped"] += 1
                        return
                    redirected = forwarded.dst != packet.dst
                    packet = forwarded
                    if redirected:
                        node = far_end
                        break
            if not redirected:
                break
            next_target = self._owner.get(packet.dst[0])
            if next_target is None:
                counters["no_route"] += 1
                return
            target = next_target
        else:
            counters["no_route"] += 1
            return
        datagram = (packet.src, packet.dst, packet.data)
        self._schedule(delay, target, datagram)
        if duplicate:
            counters["duplicated"] += 1
            self._schedule(delay + rng.random() * max(delay, 1e-3), target, datagram)

    def _schedule(self, delay: float, target: str, datagram: Datagram) -> None:
        """Delivers ``datagram`` to graph node ``target`` after ``delay``, here or in the
        process that simulates it."""
        owner = self._worker_of.get(target)
        if owner is None:
            call_later(self.env, delay, self._deliver_callbacks, datagram)
        else:
            self.outbox[owner].append((self.env.now + delay, *datagram))

    def _plain_links(self, src: str, dst: str) -> tuple[Link, ...] | None:
        """The links from host ``src`` to host ``dst`` when every one is plain and no
        middlebox is on the way (the common case, handled without per-hop bookkeeping and
        with the same random draws as the general path), else None."""
        src_leaf = self._plain_leaf.get(src)
        dst_leaf = self._plain_leaf.get(dst)
        if src_leaf is None or dst_leaf is None or src == dst:
            return None
        pair = (src_leaf[0], dst_leaf[0])
        core = self._plain_core.get(pair, ())
        if core == () and pair not in self._plain_core:
            hops = self._core_routes.get(pair) or self._core_route(*pair)
            core = (None if hops is None or any(
                not link.plain or middlebox is not None for link, _, _, middlebox in hops)
                else tuple(link for link, _, _, _ in hops))
            self._plain_core[pair] = core
        if core is None:
            return None
        return (src_leaf[1], *core, dst_leaf[1])

    def _fault(self, src: str, dst: str, rng: random.Random) -> str | None:
        """Why a datagram from graph node ``src`` to ``dst`` is dropped now, if it is."""
        src_group = self._group.get(src, "")
        dst_group = self._group.get(dst, "")
        for cut in self._cuts.values():
            if cut.blocks(src, src_group, dst, dst_group):
                return "partitioned"
        loss = self._extra_loss
        if self._group_loss:
            extra = self._group_loss.get((src_group, dst_group), 0.0)
            loss = 1 - (1 - loss) * (1 - extra)
        if loss and rng.random() < loss:
            return "lost"
        return None

    def _deliver(self, call: Call) -> None:
        datagram: Datagram = call.value  # type: ignore[assignment]
        src, dst, data = datagram
        receiver = self._receivers.get(dst)
        counters = self.counters
        if receiver is None:
            counters["no_listener"] += 1
            return
        counters["delivered"] += 1
        counters["bytes_delivered"] += len(data)
        on_delivery = self.on_delivery
        if on_delivery is not None:
            on_delivery(self.env.now, src, dst, data)
        receiver(data, src)

    # -- routing ---------------------------------------------------------------------------

    def _route(self, src: str, dst: str) -> tuple[Hop, ...] | None:
        """Links from ``src`` to ``dst`` by least mean latency; None if there is no path.

        Single-homed hosts are routed through their attachment point, so the shortest-path
        cache grows with the routers and devices, not with the pairs of hosts.
        """
        src_leaf = self._leaf.get(src)
        dst_leaf = self._leaf.get(dst)
        first = src_leaf[0] if src_leaf is not None else src
        last = dst_leaf[0] if dst_leaf is not None else dst
        if src == dst:
            return ()
        core = self._core_routes.get((first, last))
        if core is None:
            core = self._core_route(first, last)
            if core is None:
                return None
        if src_leaf is not None:
            core = (src_leaf[1], *core)
        if dst_leaf is not None:
            core = (*core, dst_leaf[2])
        return core

    def _core_route(self, src: str, dst: str) -> tuple[Hop, ...] | None:
        try:
            path = nx.shortest_path(self.graph, src, dst, weight="weight")
        except nx.NetworkXNoPath:
            return None
        nodes = self.graph.nodes
        hops = []
        for first, second in itertools.pairwise(path):
            link = self.graph.edges[first, second]["link"]
            direction = 0 if link.ends[0] == first else 1
            hops.append((link, direction, second, nodes[second].get("middlebox")))
        route = tuple(hops)
        self._core_routes[(src, dst)] = route
        return route
