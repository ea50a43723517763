"""The simulated underlay's delivery statistics: latency, loss, duplication, reordering,
bandwidth, partitions and the middlebox hook, measured over many datagrams."""

from __future__ import annotations

import itertools
import random
import statistics
from functools import partial

import networkx as nx
import pytest
import simpy

from meshguard.sansio.types import Address
from sim.network import Network, Packet, add_host, add_link
from sim.scenario import Latency, LinkSpec

A: Address = ("100.64.0.1", 51821)
B: Address = ("100.64.0.2", 51821)
C: Address = ("100.64.0.3", 51821)


def two_hosts(access: LinkSpec, core: LinkSpec | None = None,
              seed: int = 1) -> tuple[simpy.Environment, Network, list[tuple[float, bytes]]]:
    """Hosts a (group x) and b (group y) on routers joined by ``core``; c on router x."""
    graph = nx.Graph()
    graph.add_node("rx", kind="router", group="x")
    graph.add_node("ry", kind="router", group="y")
    add_link(graph, "rx", "ry", core or LinkSpec(Latency("constant", 0.0)))
    add_host(graph, "a", "x", "rx", access)
    add_host(graph, "b", "y", "ry", access)
    add_host(graph, "c", "x", "rx", access)
    env = simpy.Environment()
    network = Network(env, graph, random.Random(seed))
    for ip, node in ((A[0], "a"), (B[0], "b"), (C[0], "c")):
        network.assign_ip(ip, node)
    arrivals: list[tuple[float, bytes]] = []
    network.bind(B, lambda data, source: arrivals.append((env.now, data)))
    return env, network, arrivals


def send_many(env: simpy.Environment, network: Network, count: int, *, gap: float = 0.001,
              src: Address = A, dst: Address = B) -> None:
    def send(index: int, _event: simpy.Event) -> None:
        network.send(src, dst, index.to_bytes(4, "big"))

    for index in range(count):
        env.timeout(index * gap).callbacks.append(partial(send, index))
    env.run()


def test_constant_latency_adds_up_over_the_path() -> None:
    env, network, arrivals = two_hosts(LinkSpec(Latency("constant", 0.002)),
                                       LinkSpec(Latency("constant", 0.03)))
    send_many(env, network, 10, gap=0.1)
    assert [round(moment - 0.1 * i, 9) for i, (moment, _) in enumerate(arrivals)] == [0.034] * 10


def test_lognormal_latency_has_its_minimum_and_mean() -> None:
    link = LinkSpec(Latency("lognormal", 0.01, mean=0.025, sigma=0.5))
    env, network, arrivals = two_hosts(link)
    send_many(env, network, 4000, gap=0.0)
    delays = [moment for moment, _ in arrivals]
    assert min(delays) >= 0.02  # two access links, each at least 10 ms
    assert statistics.mean(delays) == pytest.approx(0.05, rel=0.05)


def test_loss_rate_matches_per_link_loss() -> None:
    env, network, arrivals = two_hosts(LinkSpec(Latency("constant", 0.001), loss=0.1))
    send_many(env, network, 10_000)
    # Two lossy access links: 0.9² delivered.
    assert len(arrivals) / 10_000 == pytest.approx(0.81, abs=0.015)
    assert network.counters["lost"] == 10_000 - len(arrivals)


def test_duplication_and_reordering() -> None:
    env, network, arrivals = two_hosts(LinkSpec(Latency("constant", 0.001), duplicate=0.05,
                                                reorder=0.1, reorder_delay=0.01))
    send_many(env, network, 5000)
    payloads = [data for _, data in arrivals]
    duplicates = len(payloads) - len(set(payloads))
    assert duplicates / 5000 == pytest.approx(1 - 0.95 ** 2, abs=0.02)
    out_of_order = sum(1 for first, second in itertools.pairwise(payloads)
                       if second < first)
    assert out_of_order > 100


def test_bandwidth_serialises_datagrams() -> None:
    env, network, arrivals = two_hosts(LinkSpec(Latency("constant", 0.0)),
                                       LinkSpec(Latency("constant", 0.0), bandwidth=8000.0))
    for _ in range(5):
        network.send(A, B, bytes(100))  # 800 bits each: 0.1 s on the wire
    env.run()
    assert [round(moment, 9) for moment, _ in arrivals] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_symmetric_and_one_way_partitions_and_heal() -> None:
    env, network, arrivals = two_hosts(LinkSpec(Latency("constant", 0.001)))
    at_a: list[bytes] = []
    network.bind(A, lambda data, source: at_a.append(data))
    network.partition("cut", ["x"], ["y"], one_way=False)
    network.send(A, B, b"1")
    network.send(B, A, b"2")
    network.send(C, A, b"same side")
    env.run()
    assert arrivals == [] and at_a == [b"same side"]
    network.heal("cut")
    network.partition("oneway", ["a"], ["b"], one_way=True)
    network.send(A, B, b"3")
    network.send(B, A, b"4")
    env.run()
    assert arrivals == [] and at_a == [b"same side", b"4"]
    network.heal("all")
    network.send(A, B, b"5")
    env.run()
    assert [data for _, data in arrivals] == [b"5"]
    assert network.counters["partitioned"] == 3


def test_extra_loss_between_groups() -> None:
    env, network, arrivals = two_hosts(LinkSpec(Latency("constant", 0.001)))
    network.set_loss(0.5, ("x", "y"))
    send_many(env, network, 4000)
    assert len(arrivals) / 4000 == pytest.approx(0.5, abs=0.03)


def test_unbound_and_unknown_addresses_are_counted() -> None:
    env, network, _ = two_hosts(LinkSpec(Latency("constant", 0.001)))
    network.send(A, ("10.0.0.9", 1), b"nowhere")
    network.send(A, (C[0], 9999), b"nobody listens")
    env.run()
    assert network.counters["no_route"] == 1 and network.counters["no_listener"] == 1


class PortRewriter:
    """A middlebox that redirects everything for its own IP to B, rewriting the source."""

    def __init__(self, public_ip: str) -> None:
        self.public_ip = public_ip
        self.seen: list[Packet] = []

    def forward(self, packet: Packet, now: float) -> Packet | None:
        self.seen.append(packet)
        if packet.data == b"drop":
            return None
        if packet.dst[0] == self.public_ip:
            return Packet(("203.0.113.1", 40000), B, packet.data)
        return packet


def test_middlebox_can_rewrite_redirect_and_drop() -> None:
    env, network, arrivals = two_hosts(LinkSpec(Latency("constant", 0.001)))
    box = PortRewriter("198.51.100.1")
    network.graph.add_node("box", kind="nat", group="y", middlebox=box)
    add_link(network.graph, "box", "ry", LinkSpec(Latency("constant", 0.01)))
    network.topology_changed()
    network.assign_ip("198.51.100.1", "box")
    sources: list[Address] = []

    def receive(data: bytes, source: Address) -> None:
        arrivals.append((env.now, data))
        sources.append(source)

    network.bind(B, receive)
    network.send(A, ("198.51.100.1", 1), b"via box")
    network.send(A, ("198.51.100.1", 1), b"drop")
    env.run()
    assert [data for _, data in arrivals] == [b"via box"]
    assert sources == [("203.0.113.1", 40000)]
    # a→rx→ry→box (0.011) then box→ry→b (0.011)
    assert arrivals[0][0] == pytest.approx(0.022)
    assert network.counters["middlebox_dropped"] == 1 and len(box.seen) == 2
