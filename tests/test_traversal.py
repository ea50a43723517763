"""NAT traversal between real ``Node`` cores on an in-memory network with simple NAT boxes.

The network is hand-driven with an explicit clock. A ``NatBox`` models what matters here:
endpoint-independent mapping with port-restricted filtering (most home routers) or
endpoint-dependent ("symmetric") mapping that allocates ports sequentially or at random,
mapping timeouts, and no hairpinning. Node 0 is a public member that answers STUN and may
relay; the others sit behind NATs, learn their public mapping from node 0 and find paths
to each other: punched, predicted (many probes), relayed, upgraded, roamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import ipaddress
import pickle
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshguard.identity.keys import Identity
from meshguard.identity.meshaddr import mesh_ipv4
from meshguard.sansio.codec import key_id, make_record, seal
from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.messages import (
    Endpoint,
    EndpointUpdate,
    NatFiltering,
    NatInfo,
    NatMapping,
    PunchProbe,
    PunchRequest,
    PunchResponse,
    RecordStatus,
    RelayEnvelope,
)
from meshguard.sansio.node import Node, NodeConfig
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.traversal import (
    PathChanged,
    PathKind,
    Traversal,
    TraversalConfig,
    is_virtual,
    virtual_address,
)
from meshguard.sansio.types import Address
from meshguard.sansio.wireguard import HandshakeCompleted
from tests.event_order import next_event
from tests.test_node import ipv4_udp_packet

PORT = 51821
PUBLIC = NatInfo(mapping=NatMapping.NONE, filtering=NatFiltering.ENDPOINT_INDEPENDENT)
PORT_RESTRICTED = NatInfo(
    mapping=NatMapping.ENDPOINT_INDEPENDENT, filtering=NatFiltering.ADDRESS_AND_PORT_DEPENDENT
)
SYMMETRIC = NatInfo(
    mapping=NatMapping.ADDRESS_AND_PORT_DEPENDENT,
    filtering=NatFiltering.ADDRESS_AND_PORT_DEPENDENT,
)


@dataclass
class NatBox:
    """One NAT: ``symmetric`` maps per destination, else one mapping per inside address.

    Filtering is port-restricted either way: an inbound datagram passes only if the mapping
    sent to exactly that address and port within ``timeout``. ``conntrack_clash`` models
    Linux masquerade without an input firewall: an unsolicited datagram leaves a conntrack
    entry, and a later outbound flow whose reply tuple would equal it gets another port
    instead of the usual mapping: the next one (old kernels), or with ``clash_random`` a
    random one (kernel 6.x).
    """

    public_ip: str
    symmetric: bool = False
    per_address: bool = False
    """With ``symmetric``: one mapping per destination IP, not per IP and port."""
    random_ports: bool = False
    conntrack_clash: bool = False
    clash_random: bool = False
    timeout: float = 30.0
    next_port: int = 40000
    rng: random.Random = field(default_factory=lambda: random.Random(5))
    mappings: dict[tuple[Address, Address | None], int] = field(default_factory=dict)
    inside_of: dict[int, Address] = field(default_factory=dict)
    allowed: dict[tuple[int, Address], float] = field(default_factory=dict)
    unsolicited: set[tuple[int, Address]] = field(default_factory=set)

    def outbound(self, inside: Address, destination: Address, now: float) -> Address:
        toward = (destination[0], 0) if self.per_address else destination
        key: tuple[Address, Address | None] = (inside, toward if self.symmetric else None)
        port = self.mappings.get(key)
        if port is not None and (port, destination) in self.unsolicited:
            key = (inside, destination)
            port = self.mappings.get(key)
        if port is None:
            if self.random_ports or (self.clash_random and key[1] is not None):
                port = self.rng.randrange(1024, 65536)
                while port in self.inside_of:
                    port = self.rng.randrange(1024, 65536)
            else:
                port = self.next_port
                self.next_port += 1
            self.mappings[key] = port
            self.inside_of[port] = inside
        self.allowed[(port, destination)] = now + self.timeout
        return (self.public_ip, port)

    def inbound(self, port: int, source: Address, now: float) -> Address | None:
        if self.allowed.get((port, source), -1.0) < now:
            if self.conntrack_clash and port in self.inside_of:
                self.unsolicited.add((port, source))
            return None
        self.allowed[(port, source)] = now + self.timeout
        return self.inside_of.get(port)


class Net:
    """Nodes on the Internet or behind NAT boxes, 10 ms one way, an explicit clock."""

    def __init__(
        self,
        nats: Sequence[NatInfo | NatBox | None],
        *,
        traversal: TraversalConfig | None = None,
        side_port_stun: bool = False,
    ) -> None:
        self.now = 0.0
        self.latency = 0.01
        self.boxes: dict[str, NatBox] = {}
        self.where: list[Address] = []
        self.box_of: list[NatBox | None] = []
        self.nodes: list[Node] = []
        self.events: list[list[object]] = []
        self.received: list[list[bytes]] = []
        self.sent_by: list[list[tuple[bytes, Address]]] = []
        self.limited_by: list[list[tuple[bytes, Address]]] = []
        self.blocked: set[frozenset[str]] = set()
        self.in_flight: list[tuple[float, int, bytes, Address, Address]] = []
        self.order = 0
        self.side_owner: dict[Address, int] = {}
        """Ephemeral local address → node, for side datagrams (``side_port_stun``)."""
        self.sent_at: list[list[tuple[float, Address, bool]]] = [[] for _ in nats]
        """Per node: (when, destination, from a side port) of everything it sent."""
        self.identities = [
            Identity.from_seed(hashlib.sha256(f"traversal:{i}".encode()).digest())
            for i in range(len(nats))
        ]
        self.keys = [i.public_key for i in self.identities]
        for i, nat in enumerate(nats):
            if nat is None:
                self.where.append((f"198.51.100.{i + 1}", PORT))
                self.box_of.append(None)
            else:
                box = nat if isinstance(nat, NatBox) else NatBox(f"203.0.113.{i + 1}")
                self.boxes[box.public_ip] = box
                self.where.append((f"10.{i}.0.2", PORT))
                self.box_of.append(box)
        config = traversal or TraversalConfig()
        for i, nat in enumerate(nats):
            public = nat is None
            nat_info = (
                PUBLIC
                if public
                else (SYMMETRIC if isinstance(nat, NatBox) and nat.symmetric else PORT_RESTRICTED)
            )
            if isinstance(nat, NatInfo):
                nat_info = nat
            self.nodes.append(
                Node(
                    self.identities[i],
                    config=NodeConfig(
                        swim=SwimConfig.lan(),
                        stun_servers=() if public else (self.where[0],),
                        nat=nat_info,
                        allow_relay=public,
                        traversal=config,
                        side_port_stun=side_port_stun,
                    ),
                    trusted_keys=self.keys,
                    advertised_endpoints=[Endpoint(*self.where[i])],
                    rng=random.Random(i),
                    entropy=random.Random(f"entropy:{i}").randbytes,
                    wallclock=lambda: 1_800_000_000.0 + self.now,
                    now=0.0,
                )
            )
            self.events.append([])
            self.received.append([])
            self.sent_by.append([])
            self.limited_by.append([])
        for i in range(len(nats)):
            self.flush(i)

    def flush(self, index: int) -> None:
        """Send what node ``index`` produced. A TTL-limited datagram passes the node's own
        NAT box (opening its mapping) and dies at the next hop: every path here has a router
        between two NAT boxes and between a NAT box and a public node."""
        node = self.nodes[index]
        ordinary, limited = node.split_datagrams_to_send()
        for data, destination, ttl in limited:
            assert 1 <= ttl < 255 and not is_virtual(destination)
            self.limited_by[index].append((data, destination))
            self.sent_at[index].append((self.now, destination, False))
            box = self.box_of[index]
            if box is not None:
                box.outbound(self.where[index], destination, self.now)
        for data, destination in ordinary:
            assert not is_virtual(destination), "a virtual address reached the network"
            self.sent_by[index].append((data, destination))
            self.sent_at[index].append((self.now, destination, False))
            self._transmit(self.where[index], self.box_of[index], data, destination)
        for data, destination in node.side_datagrams_to_send():
            local = (self.where[index][0], 30000 + len(self.side_owner))
            self.side_owner[local] = index
            self.sent_at[index].append((self.now, destination, True))
            self._transmit(local, self.box_of[index], data, destination)
        self.received[index].extend(node.tun_packets())
        self.events[index].extend(node.events())

    def _transmit(
        self, source: Address, box: NatBox | None, data: bytes, destination: Address
    ) -> None:
        if box is not None:
            source = box.outbound(source, destination, self.now)
        self.order += 1
        heapq.heappush(
            self.in_flight, (self.now + self.latency, self.order, data, source, destination)
        )

    def _receiver(
        self, source: Address, destination: Address
    ) -> tuple[int, Address, bool] | None:
        """(node, source as it sees it, whether it arrived at a side port)."""
        if frozenset((source[0], destination[0])) in self.blocked:
            return None
        box = self.boxes.get(destination[0])
        if box is not None and source[0] == box.public_ip:
            return None
        if box is not None:
            inside = box.inbound(destination[1], source, self.now)
            if inside is None:
                return None
            destination = inside
        for index, where in enumerate(self.where):
            if where == destination and (box is None) == (self.box_of[index] is None):
                return index, source, False
        side = self.side_owner.get(destination)
        if side is not None and self.box_of[side] is box:
            return side, source, True
        return None

    def run_until(self, end: float) -> None:
        while (step := next_event(self.nodes, self.in_flight, end)) is not None:
            moment, due = step
            self.now = max(self.now, moment)
            if due is None:
                _, _, data, source, destination = heapq.heappop(self.in_flight)
                found = self._receiver(source, destination)
                if found is None:
                    continue
                index, source, side = found
                if side:
                    self.nodes[index].receive_side_datagram(data, source, self.now)
                else:
                    self.nodes[index].receive_datagram(data, source, self.now)
                self.flush(index)
            else:
                self.nodes[due].on_timer(self.now)
                self.flush(due)
        self.now = end

    def join(self, index: int) -> None:
        """Node ``index`` joins through node 0, now."""
        self.nodes[index].join([self.where[0]], self.now)
        self.flush(index)

    def join_all(self) -> None:
        for i in range(1, len(self.nodes)):
            self.join(i)

    def send(self, source: int, destination: int, payload: bytes) -> None:
        packet = ipv4_udp_packet(
            mesh_ipv4(self.keys[source]), mesh_ipv4(self.keys[destination]), payload
        )
        self.nodes[source].send_packets([packet], self.now)
        self.flush(source)

    def exchange(self, a: int, b: int, tag: bytes) -> bool:
        """Both ways, one packet each; whether both arrived within two seconds."""
        self.send(a, b, tag + b"-ab")
        self.send(b, a, tag + b"-ba")
        self.run_until(self.now + 2.0)
        return any(p.endswith(tag + b"-ab") for p in self.received[b]) and any(
            p.endswith(tag + b"-ba") for p in self.received[a]
        )

    def path(self, a: int, b: int) -> PathKind:
        return self.nodes[a].paths()[self.keys[b]].kind

    def first_change(self, a: int, b: int, kind: PathKind) -> float | None:
        """When ``a`` first reported ``kind`` toward ``b`` (from the recorded events)."""
        return next(
            (
                at
                for at, event in self.timed_events[a]
                if isinstance(event, PathChanged)
                and event.public_key == self.keys[b]
                and event.path.kind is kind
            ),
            None,
        )

    timed_events: list[list[tuple[float, object]]]


class TimedNet(Net):
    """``Net`` that also records when each event came out."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.timed_events = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def flush(self, index: int) -> None:
        while len(self.timed_events) <= index:
            self.timed_events.append([])
        before = len(self.events[index]) if index < len(self.events) else 0
        super().flush(index)
        for event in self.events[index][before:]:
            self.timed_events[index].append((self.now, event))


def counter(net: Net, index: int, name: str) -> int:
    return net.nodes[index].traversal.counters[name]


def test_port_restricted_nats_are_punched_through_a_public_rendezvous() -> None:
    net = TimedNet([None, NatBox("203.0.113.2"), NatBox("203.0.113.3")])
    net.join_all()
    net.run_until(15.0)
    assert net.path(1, 2) is PathKind.PUNCHED
    assert net.path(2, 1) is PathKind.PUNCHED
    assert net.path(1, 0) is PathKind.DIRECT
    punched_at = net.first_change(1, 2, PathKind.PUNCHED)
    assert punched_at is not None and punched_at < 10.0
    path = net.nodes[1].paths()[net.keys[2]]
    assert path.endpoint is not None and path.endpoint[0] == "203.0.113.3"
    assert path.rtt is not None and 0.02 <= path.rtt < 0.5
    assert counter(net, 0, "punch_requests_forwarded") >= 1
    relayed_before = counter(net, 0, "relay_forwarded")
    assert net.exchange(1, 2, b"punched")
    assert counter(net, 0, "relay_forwarded") == relayed_before
    wireguard_key = net.nodes[1].wireguard_key_of(net.keys[2])
    assert net.nodes[1].device.peer_stats(wireguard_key).endpoint == path.endpoint


def test_punched_mappings_are_kept_alive_beyond_the_nat_timeout() -> None:
    net = Net([None, NatBox("203.0.113.2"), NatBox("203.0.113.3")])
    net.join_all()
    net.run_until(15.0)
    assert net.path(1, 2) is PathKind.PUNCHED
    net.run_until(200.0)
    assert net.path(1, 2) is PathKind.PUNCHED
    assert counter(net, 1, "paths_lost") + counter(net, 2, "paths_lost") == 0
    assert counter(net, 1, "keepalives_sent") + counter(net, 2, "keepalives_sent") >= 6
    assert net.exchange(1, 2, b"later")


def test_both_symmetric_fall_back_to_a_relay_that_sees_only_ciphertext() -> None:
    net = Net(
        [
            None,
            NatBox("203.0.113.2", symmetric=True, random_ports=True),
            NatBox("203.0.113.3", symmetric=True, random_ports=True),
        ]
    )
    net.join_all()
    net.run_until(30.0)
    assert net.path(1, 2) is PathKind.RELAYED
    assert net.nodes[1].paths()[net.keys[2]].relay == net.keys[0]
    forwarded_before = counter(net, 0, "relay_forwarded")
    sent_before = len(net.sent_by[0])
    secret = b"relay-must-not-read-this"
    assert net.exchange(1, 2, secret)
    assert counter(net, 0, "relay_forwarded") > forwarded_before
    assert net.received[0] == []
    assert all(secret not in data for data, _ in net.sent_by[0][sent_before:])
    assert counter(net, 1, "relay_wrapped") >= 1 and counter(net, 2, "relay_delivered") >= 1
    for i in (1, 2):
        for other in range(3):
            if other != i:
                peer = net.nodes[i].wireguard_key_of(net.keys[other])
                endpoint = net.nodes[i].device.peer_stats(peer).endpoint
                assert endpoint is not None
    rows = {row.public_key: row for row in net.nodes[1].status()}
    assert rows[net.keys[2]].path is PathKind.RELAYED
    assert rows[net.keys[2]].endpoint == ("198.51.100.1", PORT)
    assert rows[net.keys[2]].tx_bytes > 0


def test_one_symmetric_side_is_punched_by_port_prediction() -> None:
    net = TimedNet([None, NatBox("203.0.113.2"), NatBox("203.0.113.3", symmetric=True)])
    net.join_all()
    net.run_until(30.0)
    assert net.path(1, 2) is PathKind.PUNCHED
    assert net.path(2, 1) is PathKind.PUNCHED
    assert counter(net, 1, "spray_probes_sent") + counter(net, 2, "spray_probes_sent") > 0
    relayed_before = counter(net, 0, "relay_forwarded")
    assert net.exchange(1, 2, b"predicted")
    assert counter(net, 0, "relay_forwarded") == relayed_before


class BusyNatNet(TimedNet):
    """``TimedNet`` where other hosts behind ``busy`` (a sequential per-destination NAT)
    open ``rate`` new mappings per second (in bursts, whenever anything happens), as the
    node's own flows to other members and its NAT neighbours' flows do in a real mesh."""

    def __init__(self, *args: object, busy: NatBox, rate: float, **kwargs: object) -> None:
        self.busy = busy
        self.rate = rate
        self.churned = 0
        super().__init__(*args, **kwargs)

    def flush(self, index: int) -> None:
        while self.churned < int(self.now * self.rate):
            self.churned += 1
            destination = (f"192.0.{self.churned // 250}.{self.churned % 250 + 1}", 9)
            self.busy.outbound(("10.2.0.9", 40000), destination, self.now)
        super().flush(index)


@pytest.mark.parametrize("side_port_stun", [False, True])
def test_a_fresh_observation_from_a_side_port_lets_the_peer_predict_a_busy_nats_port(
    side_port_stun: bool,
) -> None:
    """Port prediction against a sequential per-destination NAT whose counter moves on
    (100 new mappings a second from its other hosts). From the mesh port, the punch can only
    name the mapping the rendezvous (and the STUN server) saw when the node joined: by the
    time its probes leave, the counter is hundreds of ports further and the peer's 64-port
    spray misses, so the pair is relayed. With a STUN request from a side port right before
    the punch, the peer sprays above the port the NAT has just allocated and the probes
    that follow land within a few ports of it."""
    busy = NatBox("203.0.113.3", symmetric=True)
    net = BusyNatNet(
        [None, NatBox("203.0.113.2"), busy], busy=busy, rate=100.0, side_port_stun=side_port_stun
    )
    net.join(2)
    net.run_until(3.0)
    net.join(1)
    net.run_until(40.0)
    kind = PathKind.PUNCHED if side_port_stun else PathKind.RELAYED
    assert (net.path(1, 2), net.path(2, 1)) == (kind, kind)
    assert counter(net, 2, "fresh_observations") == (1 if side_port_stun else 0)
    assert net.churned >= 3900
    toward_peer = [at for at, to, _ in net.sent_at[2] if to[0] == "203.0.113.2"]
    assert toward_peer
    if side_port_stun:
        observed_at = min(at for at, _, side in net.sent_at[2] if side)
        assert min(toward_peer) > observed_at, "our NAT had a mapping toward the peer already"
        relayed_before = counter(net, 0, "relay_forwarded")
        assert net.exchange(1, 2, b"fresh")
        assert counter(net, 0, "relay_forwarded") == relayed_before


@pytest.mark.parametrize("toward", [False, True])
def test_a_nat_mapping_per_destination_address_is_observed_through_the_peers_neighbour(
    toward: bool,
) -> None:
    """Behind a busy NAT that maps per destination *address*, toward a member whose NAT
    neighbour we already reach: our NAT's mapping toward their shared IP is the old one
    made for the neighbour, so the fresh port alone predicts nothing. The neighbour answers
    STUN on its mesh port, and its answer is the port the member will see; named as a
    candidate, the member probes it and the pair is punched."""
    busy = NatBox("203.0.113.4", symmetric=True, per_address=True)
    shared = NatBox("203.0.113.2")
    net = BusyNatNet([None, shared, shared, busy], busy=busy, rate=100.0, side_port_stun=True)
    if not toward:
        for node in net.nodes:
            node.traversal._member_at_ip_of = lambda path: None  # type: ignore[method-assign]
    net.join(3)
    net.run_until(5.0)
    net.join(1)
    net.run_until(15.0)
    assert (net.path(3, 1), net.path(1, 3)) == (PathKind.PUNCHED, PathKind.PUNCHED)
    net.join(2)
    net.run_until(40.0)
    kind = PathKind.PUNCHED if toward else PathKind.RELAYED
    assert (net.path(3, 2), net.path(2, 3)) == (kind, kind)
    assert counter(net, 3, "toward_observations") == (1 if toward else 0)


def test_one_symmetric_side_with_random_ports_is_relayed() -> None:
    net = Net(
        [None, NatBox("203.0.113.2"), NatBox("203.0.113.3", symmetric=True, random_ports=True)]
    )
    net.join_all()
    net.run_until(30.0)
    assert net.path(1, 2) is PathKind.RELAYED
    assert net.exchange(1, 2, b"random")


def test_relayed_pair_upgrades_to_a_punched_path_without_a_new_handshake() -> None:
    config = TraversalConfig(retry_min=5.0, retry_max=10.0)
    net = TimedNet([None, NatBox("203.0.113.2"), NatBox("203.0.113.3")], traversal=config)
    net.blocked.add(frozenset(("203.0.113.2", "203.0.113.3")))
    net.join_all()
    net.run_until(20.0)
    assert net.path(1, 2) is PathKind.RELAYED
    assert net.exchange(1, 2, b"relayed")
    handshakes = sum(isinstance(e, HandshakeCompleted) for e in net.events[1] + net.events[2])
    net.blocked.clear()
    net.run_until(45.0)
    assert net.path(1, 2) is PathKind.PUNCHED and net.path(2, 1) is PathKind.PUNCHED
    relayed_before = counter(net, 0, "relay_forwarded")
    assert net.exchange(1, 2, b"upgraded")
    assert counter(net, 0, "relay_forwarded") == relayed_before
    assert handshakes == sum(
        isinstance(e, HandshakeCompleted) for e in net.events[1] + net.events[2]
    )


def test_roaming_node_is_followed_by_its_peers() -> None:
    net = Net([None, None, None])
    net.join_all()
    net.run_until(5.0)
    assert net.exchange(1, 2, b"before")
    net.where[2] = ("198.51.100.99", PORT)
    net.nodes[2].set_advertised_endpoints([Endpoint(*net.where[2])], net.now)
    net.flush(2)
    assert net.nodes[2].counters["endpoint_updates_sent"] >= 1
    net.run_until(net.now + 1.0)
    for i in (0, 1):
        path = net.nodes[i].paths()[net.keys[2]]
        assert path.endpoint == net.where[2]
        peer = net.nodes[i].wireguard_key_of(net.keys[2])
        assert net.nodes[i].device.peer_stats(peer).endpoint == net.where[2]
    assert net.exchange(1, 2, b"after")


def test_nat_rebinding_is_noticed_by_stun_and_peers_follow() -> None:
    net = Net([None, NatBox("203.0.113.2"), None])
    net.join_all()
    net.run_until(10.0)
    assert net.exchange(1, 2, b"before")
    box = net.box_of[1]
    assert box is not None
    box.mappings.clear()
    box.inside_of.clear()
    box.allowed.clear()
    box.next_port = 50000
    net.run_until(net.now + 70.0)
    advertised = net.nodes[2].membership.member(net.keys[1])
    assert advertised is not None and advertised.endpoints[0] == Endpoint("203.0.113.2", 50000)
    assert net.exchange(1, 2, b"after")


def test_relay_refuses_untrusted_destinations_and_rate_limits() -> None:
    config = TraversalConfig(relay_rate=10.0, relay_burst=5.0)
    net = Net([None, None, None], traversal=config)
    net.join_all()
    net.run_until(5.0)
    relay = net.nodes[0]

    def envelope_from_origin(destination: bytes, inner_destination: bytes) -> bytes:
        inner = net.nodes[1].membership.seal_to(
            inner_destination, RelayEnvelope(inner_destination, b"\x04\x00\x00\x00" + bytes(40))
        )
        assert inner is not None
        outer = net.nodes[1].membership.seal_to(net.keys[0], RelayEnvelope(destination, inner))
        assert outer is not None
        return outer

    stranger = Identity.from_seed(bytes(32)).public_key
    before = relay.traversal.counters["relay_untrusted"]
    relay.receive_datagram(envelope_from_origin(stranger, net.keys[2]), net.where[1], net.now)
    assert relay.traversal.counters["relay_untrusted"] == before + 1

    untrusted_sender = Identity.from_seed(b"\x07" * 32)
    fake = seal(
        RelayEnvelope(net.keys[2], b"x" * 50),
        key_id(untrusted_sender.public_key),
        bytes(32),
        bytes(12),
    )
    relay.receive_datagram(fake, ("192.0.2.66", PORT), net.now)
    assert relay.membership.counters["untrusted_sender"] >= 1

    relay.datagrams_to_send()
    forwarded = relay.traversal.counters["relay_forwarded"]
    for _ in range(20):
        relay.receive_datagram(
            envelope_from_origin(net.keys[2], net.keys[2]), net.where[1], net.now
        )
    assert relay.traversal.counters["relay_forwarded"] - forwarded == 5
    assert relay.traversal.counters["relay_rate_limited"] == 15
    out = [d for d, addr in relay.datagrams_to_send() if addr == net.where[2]]
    assert len(out) == 5


def test_relay_needs_allow_relay() -> None:
    net = Net([None, NatBox("203.0.113.2"), None])
    net.join_all()
    net.run_until(5.0)
    assert not net.nodes[1].config.allow_relay
    inner = net.nodes[0].membership.seal_to(
        net.keys[2], RelayEnvelope(net.keys[2], b"\x04\x00\x00\x00" + bytes(40))
    )
    assert inner is not None
    outer = net.nodes[0].membership.seal_to(net.keys[1], RelayEnvelope(net.keys[2], inner))
    assert outer is not None
    net.nodes[1].receive_datagram(outer, net.where[0], net.now)
    assert net.nodes[1].traversal.counters["relay_refused"] == 1


def test_replayed_punch_request_starts_no_new_probes() -> None:
    net = Net([None, None, None])
    net.join_all()
    net.run_until(5.0)
    target = net.nodes[2]
    request = PunchRequest(12345, net.keys[1], net.keys[2], (Endpoint(*net.where[1]),))
    datagram = net.nodes[0].membership.seal_to(net.keys[2], request)
    assert datagram is not None
    target.receive_datagram(datagram, net.where[0], net.now)
    probes = target.traversal.counters["probes_sent"]
    assert probes > 0
    target.receive_datagram(datagram, net.where[0], net.now)
    assert target.traversal.counters["punch_replay"] == 1
    assert target.traversal.counters["probes_sent"] == probes


def test_forged_probe_reply_selects_no_path() -> None:
    net = Net([None, None, None])
    net.join_all()
    net.run_until(5.0)
    node = net.nodes[1]
    before = node.paths()[net.keys[2]]
    unexpected = node.traversal.counters["probe_unexpected"]
    reply = net.nodes[2].membership.seal_to(net.keys[1], PunchProbe(99, 7, True))
    assert reply is not None
    node.receive_datagram(reply, ("192.0.2.200", 9999), net.now)
    assert node.traversal.counters["probe_unexpected"] == unexpected + 1
    assert node.paths()[net.keys[2]] == before


def test_virtual_addresses_are_no_ip_addresses() -> None:
    virtual = virtual_address(b"\x01" * 32, b"\x02" * 32)
    assert is_virtual(virtual) and virtual[1] == 0
    with pytest.raises(ValueError):
        ipaddress.ip_address(virtual[0])
    with pytest.raises(LocalProtocolError):
        TraversalConfig(probe_interval=0)
    assert dataclasses.replace(TraversalConfig(), spray_ports=0).spray_ports == 0


def test_nat_type_is_detected_from_public_members_and_gossiped() -> None:
    net = Net([None, None, NatBox("203.0.113.3")])
    for i in (0, 1):
        net.nodes[i] = Node(
            net.identities[i],
            config=NodeConfig(swim=SwimConfig.lan(), nat=PUBLIC, allow_relay=True),
            trusted_keys=net.keys,
            advertised_endpoints=[Endpoint(*net.where[i])],
            rng=random.Random(i),
            entropy=random.Random(f"entropy:{i}").randbytes,
            wallclock=lambda: 1_800_000_000.0,
            now=0.0,
        )
    net.nodes[2] = Node(
        net.identities[2],
        config=NodeConfig(swim=SwimConfig.lan()),
        trusted_keys=net.keys,
        advertised_endpoints=[Endpoint(*net.where[2])],
        rng=random.Random(2),
        entropy=random.Random("entropy:2").randbytes,
        wallclock=lambda: 1_800_000_000.0,
        now=0.0,
    )
    net.join_all()
    net.run_until(60.0)
    nat = net.nodes[2].nat
    assert nat.mapping is NatMapping.ENDPOINT_INDEPENDENT
    seen = net.nodes[0].membership.member(net.keys[2])
    assert seen is not None and seen.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT
    assert seen.endpoints[0].host == "203.0.113.3"


def test_mixed_nat_mesh_connects_every_pair_and_keeps_every_member_alive() -> None:
    layout: list[NatBox | None] = [None, None, None]
    for i in range(3, 12):
        ip = f"203.0.113.{i + 1}"
        kind = i % 3
        if kind == 0:
            layout.append(NatBox(ip))
        elif kind == 1:
            layout.append(NatBox(ip, symmetric=True))
        else:
            layout.append(NatBox(ip, symmetric=True, random_ports=True, rng=random.Random(i)))
    net = TimedNet(layout)
    net.join_all()
    net.run_until(90.0)
    size = len(layout)
    kinds: dict[PathKind, int] = {}
    for a in range(size):
        paths = net.nodes[a].paths()
        assert len(paths) == size - 1, f"node {a} lost members"
        for path in paths.values():
            kinds[path.kind] = kinds.get(path.kind, 0) + 1
        for view in net.nodes[a].membership.members():
            assert view.state.value == "alive"
    assert set(kinds) <= {PathKind.DIRECT, PathKind.PUNCHED, PathKind.RELAYED}
    assert kinds[PathKind.RELAYED] > 0 and kinds[PathKind.PUNCHED] > 0
    for a in range(size):
        for b in range(size):
            if a != b:
                net.send(a, b, f"{a}>{b}".encode())
    net.run_until(net.now + 3.0)
    missing = [
        (a, b)
        for a in range(size)
        for b in range(size)
        if a != b and not any(p.endswith(f"{a}>{b}".encode()) for p in net.received[b])
    ]
    assert missing == []


_ENDPOINTS = st.builds(
    Endpoint,
    st.sampled_from(["198.51.100.1", "198.51.100.2", "203.0.113.2", "10.1.0.2", "2001:db8::1"]),
    st.integers(1, 65535),
)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.one_of(
                st.builds(
                    PunchRequest,
                    st.integers(0, 3),
                    st.sampled_from(range(3)),
                    st.sampled_from(range(3)),
                    st.lists(_ENDPOINTS, max_size=3).map(tuple),
                ),
                st.builds(
                    PunchResponse,
                    st.integers(0, 3),
                    st.sampled_from(range(3)),
                    st.sampled_from(range(3)),
                    st.lists(_ENDPOINTS, max_size=3).map(tuple),
                ),
                st.builds(PunchProbe, st.integers(0, 3), st.integers(0, 3), st.booleans()),
                st.builds(
                    RelayEnvelope,
                    st.sampled_from(range(3)),
                    st.one_of(st.binary(min_size=1, max_size=80), st.just(b"inner")),
                ),
            ),
            st.floats(0.0, 30.0),
        ),
        max_size=12,
    )
)
def test_authenticated_traversal_messages_never_raise(
    messages: list[tuple[int, object, float]],
) -> None:
    """Any mix of sealed punch and relay messages from trusted members is handled or counted."""
    net = _property_net()
    node = net.nodes[0]
    now = net.now
    for sender_index, message, delay in messages:
        if sender_index == 0:
            continue
        message = _with_keys(net, message)
        if isinstance(message, RelayEnvelope) and message.payload == b"inner":
            inner = net.nodes[sender_index].membership.seal_to(
                message.peer if message.peer != net.keys[sender_index] else net.keys[0],
                RelayEnvelope(net.keys[0], b"\x01\x00\x00\x00" + bytes(144)),
            )
            assert inner is not None
            message = RelayEnvelope(message.peer, inner)
        datagram = net.nodes[sender_index].membership.seal_to(net.keys[0], message)
        assert datagram is not None
        now += delay
        node.receive_datagram(datagram, net.where[sender_index], now)
        node.on_timer(now)
        for _, addr in node.datagrams_to_send():
            assert not is_virtual(addr)


def _with_keys(
    net: Net, message: object
) -> RelayEnvelope | PunchRequest | PunchResponse | PunchProbe:
    """Generated messages name members by index; put the real keys in."""
    if isinstance(message, PunchRequest | PunchResponse):
        return dataclasses.replace(
            message,
            initiator=net.keys[message.initiator],  # type: ignore[call-overload]
            target=net.keys[message.target],  # type: ignore[call-overload]
        )
    if isinstance(message, RelayEnvelope):
        return dataclasses.replace(message, peer=net.keys[message.peer])  # type: ignore[call-overload]
    assert isinstance(message, PunchProbe)
    return message


def _property_net() -> Net:
    net = Net([None, None, NatBox("203.0.113.3")])
    net.join_all()
    net.run_until(3.0)
    return net


def test_endpoint_update_about_someone_else_is_refused() -> None:
    net = Net([None, None, None])
    net.join_all()
    net.run_until(5.0)
    view = net.nodes[2].membership.member(net.keys[2])
    assert view is not None
    record = make_record(
        net.keys[2],
        view.incarnation + 5,
        RecordStatus.ALIVE,
        (Endpoint("192.0.2.77", PORT),),
        view.nat,
        net.identities[2].sign,
    )
    forwarded = net.nodes[1].membership.seal_to(net.keys[0], EndpointUpdate(record))
    assert forwarded is not None
    net.nodes[0].receive_datagram(forwarded, net.where[1], net.now)
    assert net.nodes[0].counters["endpoint_update_refused"] == 1
    seen = net.nodes[0].membership.member(net.keys[2])
    assert seen is not None and seen.endpoints == (Endpoint(*net.where[2]),)


def _bare_masquerade_net(traversal: TraversalConfig | None = None) -> TimedNet:
    """A public node and two behind Linux masquerade without a firewall (kernel 6.x)."""
    return TimedNet(
        [
            None,
            NatBox("203.0.113.2", conntrack_clash=True, clash_random=True),
            NatBox("203.0.113.3", conntrack_clash=True, clash_random=True),
        ],
        traversal=traversal,
    )


def test_bare_masquerade_nats_are_punched_because_no_full_ttl_datagram_arrives_unasked() -> None:
    """Opening probes (and membership datagrams) to the other NATed member carry a small
    TTL until its NAT has opened toward us, so neither NAT ever sees an unsolicited datagram
    from the other: no conntrack clash, and the pair is punched, not relayed."""
    net = _bare_masquerade_net()
    net.join_all()
    net.run_until(15.0)
    boxes = [box for box in net.box_of if box is not None]
    assert all(not box.unsolicited for box in boxes), [box.unsolicited for box in boxes]
    assert net.path(1, 2) is PathKind.PUNCHED and net.path(2, 1) is PathKind.PUNCHED
    relayed_before = counter(net, 0, "relay_forwarded")
    assert net.exchange(1, 2, b"clash")
    assert counter(net, 0, "relay_forwarded") == relayed_before
    assert counter(net, 1, "opening_probes_sent") + counter(net, 2, "opening_probes_sent") > 0
    assert net.limited_by[1] or net.limited_by[2]
    assert all(dest != net.where[0] for i in (1, 2) for _, dest in net.limited_by[i])
    punched = max(net.first_change(a, b, PathKind.PUNCHED) or 99.0 for a, b in ((1, 2), (2, 1)))
    assert punched < 10.0


def test_without_opening_probes_a_conntrack_clash_leaves_only_the_relay() -> None:
    """The same network with ``opening_ttl=0``: whichever datagram arrives first makes the
    other NAT give its own flow a random port, and the pair ends relayed."""
    net = _bare_masquerade_net(TraversalConfig(opening_ttl=0))
    net.join_all()
    net.run_until(15.0)
    boxes = [box for box in net.box_of if box is not None]
    assert any(box.unsolicited for box in boxes), "the race the test is about did not happen"
    assert all(not limited for limited in net.limited_by)
    assert net.path(1, 2) is PathKind.RELAYED and net.path(2, 1) is PathKind.RELAYED
    assert net.exchange(1, 2, b"relayed")


def test_the_punch_target_opens_its_nat_and_waits_for_the_initiator() -> None:
    """The target of a punch sends only TTL-limited probes to the initiator until
    ``opening_wait`` has passed when nothing arrives from it (here the two NATs cannot
    reach each other at all), then full-TTL probes."""
    config = TraversalConfig(opening_wait=1.5)
    net = _bare_masquerade_net(config)
    net.blocked.add(frozenset(("203.0.113.2", "203.0.113.3")))
    target = 1 if net.keys[1] > net.keys[2] else 2
    net.join_all()
    samples: list[tuple[float, int, int]] = []
    while net.now < 12.0:
        net.run_until(net.now + 0.05)
        opening = counter(net, target, "opening_probes_sent")
        samples.append((net.now, opening, counter(net, target, "probes_sent") - opening))
    started = net.nodes[target].traversal.counters["punch_started"]
    assert started >= 1
    asked = next(at for at, opening, _ in samples if opening > samples[0][1])
    full_before = next(full for at, _, full in samples if at >= asked - 0.01)
    during = [full for at, _, full in samples if asked <= at < asked + config.opening_wait - 0.1]
    assert during and all(full == full_before for full in during), "full probes came too soon"
    after = [full for at, _, full in samples if at >= asked + config.opening_wait + 0.1]
    assert after and after[0] > full_before, "no full-TTL probes after opening_wait"


def test_a_punch_that_came_too_early_is_answered_once_the_initiator_is_known() -> None:
    """The initiator learned of the target first; its PunchRequest reached a target that
    did not know it yet (refused). When the initiator's record reaches the target, the
    target punches back at once, even when its greater key would otherwise make it wait."""
    net = Net([None, NatBox("203.0.113.2"), NatBox("203.0.113.3")])
    target, initiator = (1, 2) if net.keys[1] > net.keys[2] else (2, 1)
    net.join(target)
    net.run_until(3.0)
    assert net.keys[initiator] not in net.nodes[target].paths()
    request = PunchRequest(777, net.keys[initiator], net.keys[target], ())
    datagram = net.nodes[0].membership.seal_to(net.keys[target], request)
    assert datagram is not None
    net.nodes[target].receive_datagram(datagram, net.where[0], net.now)
    assert counter(net, target, "punch_refused") == 1
    sent = counter(net, target, "punch_requests_sent")
    net.join(initiator)
    while net.keys[initiator] not in net.nodes[target].paths() and net.now < 20.0:
        net.run_until(net.now + 0.01)
    assert counter(net, target, "punch_requests_sent") == sent + 1
    learned = net.now
    net.run_until(learned + 2.0)
    assert net.path(target, initiator) is PathKind.PUNCHED


class LoneTraversal:
    """One ``Traversal`` driven by hand: datagrams are pickled (peer, message) pairs."""

    def __init__(self, own: bytes, config: TraversalConfig | None = None) -> None:
        self.traversal = Traversal(
            own,
            config=config or TraversalConfig(),
            rng=random.Random(3),
            seal=lambda peer, message: pickle.dumps((peer, message)),
            open_datagram=lambda data: None,
        )
        self.sent: list[tuple[object, Address, int | None]] = []

    def add_public_relay(self, relay: bytes) -> None:
        """``relay`` joins as a public member that allows relaying, confirmed direct at 0.01 s."""
        public = NatInfo(mapping=NatMapping.NONE, allows_relay=True)
        self.traversal.add_member(relay, [Endpoint("203.0.113.1", PORT)], public, 0.0)
        probe = next(m for m, _, _ in self.drain() if isinstance(m, PunchProbe))
        reply = PunchProbe(probe.session, probe.seq, True)
        self.traversal.on_message(relay, reply, ("203.0.113.1", PORT), 0.01)

    def drain(self) -> list[tuple[object, Address, int | None]]:
        out: list[tuple[object, Address, int | None]] = [
            (pickle.loads(data)[1], addr, ttl)
            for data, addr, ttl in self.traversal.limited_datagrams_to_send()
        ]
        out += [(pickle.loads(d)[1], a, None) for d, a in self.traversal.datagrams_to_send()]
        self.sent += out
        return out

    def run_until(self, end: float) -> None:
        while (deadline := self.traversal.next_deadline()) is not None and deadline <= end:
            self.traversal.on_timer(deadline)
            self.drain()


def test_after_the_members_punch_toward_us_failed_a_restarted_search_relays_at_once() -> None:
    """Seen in the real NAT test: the member (smaller key) punched us and failed while its
    new record restarted our direct check; when that check fails we relay at once instead
    of waiting the key-order defer (4 s) and repeating a punch through the same NATs."""
    relay, member, own = b"\x01" * 32, b"\x05" * 32, b"\x09" * 32
    lone = LoneTraversal(own)
    traversal = lone.traversal
    lone.add_public_relay(relay)
    assert traversal.paths()[relay].kind is PathKind.DIRECT
    traversal.add_member(member, [Endpoint("192.168.4.2", PORT)], NatInfo(), 0.1)
    candidates = (Endpoint("198.51.103.1", 34821),)
    request = PunchRequest(4242, member, own, candidates)
    traversal.on_message(relay, request, ("203.0.113.1", PORT), 0.2)
    assert any(isinstance(m, PunchResponse) for m, _, _ in lone.drain())
    lone.run_until(3.0)
    endpoints = [Endpoint("198.51.103.1", 34821), Endpoint("192.168.4.2", PORT)]
    traversal.update_member(member, endpoints, NatInfo(), 3.0)
    lone.drain()
    lone.run_until(4.0)
    assert traversal.counters["punch_failed"] == 1, "the member's punch should have failed"
    assert traversal.paths()[member].kind is PathKind.CONNECTING
    lone.run_until(4.5)
    path = traversal.paths()[member]
    assert path.kind is PathKind.RELAYED and path.relay == relay
    assert traversal.counters["punch_requests_sent"] == 0


def test_a_deferred_punch_waits_for_the_members_punch_that_is_running() -> None:
    """The greater key deferred its punch; the member's punch toward us starts meanwhile.
    When our deferred retry comes while that punch runs we do not start a second one
    through the same NATs: its failure relays the path."""
    relay, member, own = b"\x01" * 32, b"\x05" * 32, b"\x09" * 32
    lone = LoneTraversal(own)
    traversal = lone.traversal
    lone.add_public_relay(relay)
    traversal.add_member(member, [Endpoint("198.51.103.1", 34821)], NatInfo(), 0.1)
    lone.run_until(4.0)
    assert traversal.counters["direct_checks"] == 2, "checks of the relay and the member"
    assert traversal.paths()[member].kind is PathKind.CONNECTING
    request = PunchRequest(4242, member, own, (Endpoint("198.51.103.1", 34821),))
    traversal.on_message(relay, request, ("203.0.113.1", PORT), 4.0)
    lone.drain()
    lone.run_until(7.0)
    assert traversal.counters["punch_requests_sent"] == 0
    assert traversal.paths()[member].kind is PathKind.CONNECTING
    lone.run_until(7.6)
    assert traversal.paths()[member].kind is PathKind.RELAYED
    assert traversal.counters["punch_requests_sent"] == 0


def test_probes_and_datagrams_to_a_member_not_heard_from_carry_the_opening_ttl() -> None:
    """Toward a member of unknown NAT that we have not heard from, the direct check sends
    opening probes (TTL 2) and ``opening_ttl`` tells the node to send SWIM's datagrams the
    same way; once the member's datagram arrived from that address, full TTL, and the path
    its answer confirms counts as punched (its NAT opened toward us)."""
    member, own = b"\x05" * 32, b"\x09" * 32
    lone = LoneTraversal(own)
    traversal = lone.traversal
    mapping, lan = ("198.51.104.1", PORT), ("192.168.5.2", PORT)
    endpoints = [Endpoint(*mapping), Endpoint(*lan)]
    traversal.add_member(member, endpoints, NatInfo(), 0.0)
    first = [(addr, ttl) for m, addr, ttl in lone.drain() if isinstance(m, PunchProbe)]
    assert first == [(mapping, 2), (lan, 2)]
    assert traversal.opening_ttl(member, mapping) == 2
    assert traversal.opening_ttl(b"\x07" * 32, mapping) is None, "not a member"

    traversal.heard(member, mapping)
    assert traversal.opening_ttl(member, mapping) is None
    assert traversal.opening_ttl(member, lan) == 2
    lone.run_until(0.2)
    second = [(addr, ttl) for m, addr, ttl in lone.sent[len(first) :] if isinstance(m, PunchProbe)]
    assert sorted(second, key=str) == sorted([(mapping, None), (lan, 2)], key=str)
    probe = next(m for m, addr, ttl in lone.sent if ttl is None and isinstance(m, PunchProbe))
    traversal.on_message(member, PunchProbe(probe.session, probe.seq, True), mapping, 0.21)
    assert traversal.paths()[member].kind is PathKind.PUNCHED
    assert traversal.opening_ttl(member, lan) is None, "the path is confirmed"


@pytest.mark.parametrize(
    ("nat", "config"),
    [
        (NatInfo(mapping=NatMapping.NONE), TraversalConfig()),
        (NatInfo(filtering=NatFiltering.ENDPOINT_INDEPENDENT), TraversalConfig()),
        (NatInfo(), TraversalConfig(opening_ttl=0)),
    ],
    ids=["public", "open-filtering", "turned-off"],
)
def test_no_opening_ttl_toward_a_member_whose_nat_lets_us_in(
    nat: NatInfo, config: TraversalConfig
) -> None:
    lone = LoneTraversal(b"\x09" * 32, config)
    lone.traversal.add_member(b"\x05" * 32, [Endpoint("198.51.104.1", PORT)], nat, 0.0)
    assert all(ttl is None for _, _, ttl in lone.drain())
    assert lone.traversal.opening_ttl(b"\x05" * 32, ("198.51.104.1", PORT)) is None
    assert lone.traversal.counters["opening_probes_sent"] == 0


def test_behind_a_per_destination_nat_the_punch_waits_for_our_nat_facts_and_a_fresh_port() -> None:
    """A node that can observe from side ports sends a member that will predict its port
    (endpoint-independent mapping, filtering) nothing directly before the punch: no direct
    check while its own NAT facts are unknown (relayed meanwhile), then, as soon as they say
    per-destination, a fresh observation first, and the PunchRequest names that port first."""
    own, rendezvous, peer = b"\x01" * 32, b"\x05" * 32, b"\x02" * 32
    observed_at: list[float] = []

    def observe(now: float, toward: Address | None) -> bool:
        assert toward is None
        observed_at.append(now)
        return True

    lone = LoneTraversal(own)
    lone.traversal = Traversal(
        own,
        config=TraversalConfig(),
        rng=random.Random(3),
        seal=lambda key, message: pickle.dumps((key, message)),
        open_datagram=lambda data: None,
        observe=observe,
    )
    traversal = lone.traversal
    mine = Endpoint("10.0.0.5", PORT)
    traversal.set_local([mine], NatInfo())
    relay_info = dataclasses.replace(PUBLIC, allows_relay=True)
    traversal.add_member(rendezvous, [Endpoint("198.51.100.1", PORT)], relay_info, 0.0)
    probe = next(m for m, _, _ in lone.drain() if isinstance(m, PunchProbe))
    traversal.on_message(
        rendezvous, PunchProbe(probe.session, probe.seq, True), ("198.51.100.1", PORT), 0.02
    )
    peer_address = ("203.0.113.2", PORT)
    traversal.add_member(peer, [Endpoint(*peer_address)], PORT_RESTRICTED, 0.1)
    assert traversal.paths()[peer].kind is PathKind.RELAYED
    lone.run_until(4.0)
    assert traversal.paths()[peer].kind is PathKind.RELAYED
    assert traversal.counters["punch_postponed"] >= 1 and observed_at == []
    assert all(addr != peer_address for _, addr, _ in lone.sent)
    traversal.set_local([mine], SYMMETRIC, 4.5)
    lone.run_until(4.5)
    assert observed_at == [4.5]
    assert not any(isinstance(m, PunchRequest) for m, _, _ in lone.drain())
    fresh = Endpoint("203.0.113.5", 40100)
    traversal.fresh_mapping(fresh, 4.55)
    request = next(m for m, _, _ in lone.drain() if isinstance(m, PunchRequest))
    assert request.candidates[:2] == (fresh, mine)
    assert traversal.counters["fresh_observations"] == 1
    assert all(addr != peer_address for _, addr, _ in lone.sent)
