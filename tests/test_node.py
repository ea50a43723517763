"""The composed Node: membership turns into WireGuard peers and traffic flows between them.

A small in-memory network of real ``Node`` cores (SWIM + WireGuard + STUN) with an explicit
clock: nodes join through one seed, every pair exchanges IP packets over tunnels set up on
demand, a dead or untrusted member stops being a peer, and one port carries all three
protocols.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import random
import struct

from meshguard.identity.keys import Identity
from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.sansio import stun
from meshguard.sansio.messages import Endpoint, NatFiltering, NatInfo, NatMapping
from meshguard.sansio.natdetect import NatDetected
from meshguard.sansio.node import Node, NodeConfig, PeerAdded, PeerRemoved
from meshguard.sansio.swim import MemberDead, MemberState, MemberSuspected
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.traversal import PathKind
from meshguard.sansio.types import Address
from sim.nat import NAT_TYPES, Nat
from sim.network import Packet
from tests.event_order import next_event

PORT = 51821


def ipv4_udp_packet(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, payload: bytes
) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0, 64, 17, 0, src.packed, dst.packed
    )
    checksum = ~sum(struct.unpack("!10H", header)) % 0xFFFF
    header = header[:10] + struct.pack("!H", checksum) + header[12:]
    return header + struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload


def ipv6_udp_packet(
    src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, payload: bytes
) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, 8 + len(payload), 17, 64, src.packed, dst.packed)
    return header + struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload


class Mesh:
    """Nodes on one hand-driven network with a fixed latency and an explicit clock."""

    def __init__(self, size: int, *, eager: bool = False, latency: float = 0.005) -> None:
        self.now = 0.0
        self.latency = latency
        self.identities = [
            Identity.from_seed(hashlib.sha256(f"node-test:{i}".encode()).digest())
            for i in range(size)
        ]
        self.keys = [identity.public_key for identity in self.identities]
        self.addresses: list[Address] = [(f"192.0.2.{i + 1}", PORT) for i in range(size)]
        self.index_of = {address: i for i, address in enumerate(self.addresses)}
        self.down: set[int] = set()
        self.in_flight: list[tuple[float, int, bytes, Address, Address]] = []
        self.order = 0
        self.nodes = [
            Node(
                identity,
                config=NodeConfig(swim=SwimConfig.lan(), eager_tunnels=eager),
                trusted_keys=self.keys,
                advertised_endpoints=[Endpoint(*self.addresses[i])],
                rng=random.Random(i),
                entropy=random.Random(f"entropy:{i}").randbytes,
                wallclock=lambda: 1_800_000_000.0 + self.now,
                now=0.0,
            )
            for i, identity in enumerate(self.identities)
        ]
        self.events: list[list[object]] = [[] for _ in range(size)]
        self.received: list[list[bytes]] = [[] for _ in range(size)]

    def flush(self, index: int) -> None:
        node = self.nodes[index]
        for data, destination in node.datagrams_to_send():
            self.order += 1
            arrival = (
                self.now + self.latency,
                self.order,
                data,
                self.addresses[index],
                destination,
            )
            heapq.heappush(self.in_flight, arrival)
        self.received[index].extend(node.tun_packets())
        self.events[index].extend(node.events())

    def run_until(self, end: float) -> None:
        while (step := next_event(self.nodes, self.in_flight, end, skip=self.down)) is not None:
            moment, due = step
            self.now = max(self.now, moment)
            if due is None:
                _, _, data, source, destination = heapq.heappop(self.in_flight)
                index = self.index_of.get(destination)
                if index is None or index in self.down:
                    continue
                self.nodes[index].receive_datagram(data, source, self.now)
                self.flush(index)
            else:
                self.nodes[due].on_timer(self.now)
                self.flush(due)
        self.now = end

    def send(self, source: int, packets: list[bytes]) -> None:
        self.nodes[source].send_packets(packets, self.now)
        self.flush(source)

    def join_all(self) -> None:
        for i in range(1, len(self.nodes)):
            self.nodes[i].join([self.addresses[0]], self.now)
            self.flush(i)


def test_members_become_peers_and_packets_cross_on_demand_tunnels() -> None:
    mesh = Mesh(4)
    mesh.join_all()
    mesh.run_until(10.0)
    for i, node in enumerate(mesh.nodes):
        assert node.peer_keys() == sorted(k for j, k in enumerate(mesh.keys) if j != i)
    assert not any(
        node.device.peer_stats(node.wireguard_key_of(key)).handshake_completed
        for node in mesh.nodes
        for key in node.peer_keys()
    ), "tunnels must not be set up before traffic needs them"

    for src in range(4):
        for dst in range(4):
            if src != dst:
                payload = f"{src}->{dst}".encode()
                mesh.send(
                    src,
                    [
                        ipv4_udp_packet(
                            mesh_ipv4(mesh.keys[src]), mesh_ipv4(mesh.keys[dst]), payload
                        )
                    ],
                )
                mesh.send(
                    src,
                    [
                        ipv6_udp_packet(
                            mesh_ipv6(mesh.keys[src]), mesh_ipv6(mesh.keys[dst]), payload
                        )
                    ],
                )
    mesh.run_until(12.0)
    for dst in range(4):
        payloads = sorted(packet[-4:] for packet in mesh.received[dst])
        expected = sorted(
            f"{src}->{dst}".encode() for src in range(4) if src != dst for _ in range(2)
        )
        assert payloads == expected


def test_eager_mode_handshakes_with_every_member() -> None:
    mesh = Mesh(3, eager=True)
    mesh.join_all()
    mesh.run_until(15.0)
    for node in mesh.nodes:
        assert len(node.peer_keys()) == 2
        for key in node.peer_keys():
            assert node.device.peer_stats(node.wireguard_key_of(key)).handshake_completed


def test_dead_member_is_removed_as_peer_and_its_traffic_stops() -> None:
    mesh = Mesh(4)
    mesh.join_all()
    mesh.run_until(10.0)
    mesh.down.add(3)
    mesh.run_until(60.0)
    for i in range(3):
        assert mesh.keys[3] not in mesh.nodes[i].peer_keys()
        removed = [e for e in mesh.events[i] if isinstance(e, PeerRemoved)]
        assert [(e.public_key, e.reason) for e in removed] == [(mesh.keys[3], "dead")]
    before = len(mesh.received[1])
    mesh.send(0, [ipv4_udp_packet(mesh_ipv4(mesh.keys[0]), mesh_ipv4(mesh.keys[3]), b"gone")])
    mesh.run_until(62.0)
    assert mesh.nodes[0].device.counters["no_route"] >= 1
    assert len(mesh.received[1]) == before


def test_untrusting_a_member_removes_its_tunnel() -> None:
    mesh = Mesh(3)
    mesh.join_all()
    mesh.run_until(10.0)
    mesh.send(0, [ipv4_udp_packet(mesh_ipv4(mesh.keys[0]), mesh_ipv4(mesh.keys[2]), b"hi!!")])
    mesh.run_until(11.0)
    assert mesh.received[2]
    mesh.nodes[0].set_trusted_keys(mesh.keys[:2], mesh.now)
    mesh.flush(0)
    assert mesh.nodes[0].peer_keys() == [mesh.keys[1]]
    assert PeerRemoved(mesh.keys[2], "untrusted") in mesh.events[0]


def test_peer_added_events_carry_mesh_addresses() -> None:
    mesh = Mesh(2)
    mesh.join_all()
    mesh.run_until(5.0)
    added = [e for e in mesh.events[0] if isinstance(e, PeerAdded)]
    assert added == [
        PeerAdded(mesh.keys[1], mesh_ipv4(mesh.keys[1]), mesh_ipv6(mesh.keys[1]), mesh.addresses[1])
    ]


def test_the_mesh_port_answers_stun_binding_requests() -> None:
    mesh = Mesh(1)
    client = stun.StunClient(entropy=random.Random(7).randbytes)
    transaction = client.query(mesh.addresses[0], 0.0)
    [(request, _)] = client.datagrams_to_send()
    mesh.nodes[0].receive_datagram(request, ("203.0.113.9", 40000), 0.0)
    [(answer, destination)] = [
        item for item in mesh.nodes[0].datagrams_to_send() if stun.is_stun(item[0])
    ]
    assert destination == ("203.0.113.9", 40000)
    client.receive_datagram(answer, mesh.addresses[0], 0.01)
    assert client.public_address(mesh.addresses[0]) == ("203.0.113.9", 40000)
    assert transaction


def test_garbage_on_the_port_never_raises() -> None:
    mesh = Mesh(2)
    rng = random.Random(3)
    for size in range(0, 200):
        data = rng.randbytes(size)
        for prefix in (b"", b"\x01\x00\x00\x00", b"\x04\x00\x00\x00", b"mg\x01\x01"):
            mesh.nodes[0].receive_datagram(prefix + data, mesh.addresses[1], 1.0)
            mesh.nodes[0].receive_datagrams([prefix + data, data], mesh.addresses[1], 1.0)
    mesh.flush(0)


def test_paths_and_status_show_direct_paths_on_a_flat_network() -> None:
    mesh = Mesh(3)
    mesh.join_all()
    mesh.run_until(5.0)
    for i, node in enumerate(mesh.nodes):
        paths = node.paths()
        assert sorted(paths) == sorted(k for j, k in enumerate(mesh.keys) if j != i)
        for key, path in paths.items():
            assert path.kind is PathKind.DIRECT
            assert path.endpoint == mesh.addresses[mesh.keys.index(key)]
            assert path.relay is None
            assert path.rtt is not None and abs(path.rtt - 2 * mesh.latency) < 1e-6
    mesh.send(0, [ipv4_udp_packet(mesh_ipv4(mesh.keys[0]), mesh_ipv4(mesh.keys[1]), b"row!")])
    mesh.run_until(6.0)
    rows = mesh.nodes[0].status()
    assert [row.public_key for row in rows] == sorted(mesh.keys[1:])
    by_key = {row.public_key: row for row in rows}
    assert by_key[mesh.keys[1]].state == "alive"
    assert by_key[mesh.keys[1]].path is PathKind.DIRECT
    assert by_key[mesh.keys[1]].last_handshake is not None
    assert by_key[mesh.keys[1]].tx_bytes > 0 and by_key[mesh.keys[1]].rx_bytes > 0
    assert by_key[mesh.keys[2]].last_handshake is None
    assert by_key[mesh.keys[2]].tx_bytes == 0


def test_direct_paths_among_nodes_of_unknown_nat_get_keepalives_from_one_side() -> None:
    mesh = Mesh(2)
    mesh.join_all()
    mesh.run_until(80.0)
    sent = [node.traversal.counters["keepalives_sent"] for node in mesh.nodes]
    assert sorted(sent) == [0, 3]
    assert all(
        node.paths()[key].kind is PathKind.DIRECT for node in mesh.nodes for key in node.paths()
    )


def test_a_node_that_is_its_own_stun_server_learns_its_address() -> None:
    """Our own Binding request comes back with our own transaction ID: it is a request, so the
    responder answers it, and the answer (same ID) then completes our query."""
    own: Address = ("203.0.113.1", PORT)
    identity = Identity.from_seed(hashlib.sha256(b"node-test:own-stun").digest())
    node = Node(
        identity,
        config=NodeConfig(swim=SwimConfig.lan(), stun_servers=(own,)),
        trusted_keys=[identity.public_key],
        advertised_endpoints=[Endpoint(*own)],
        rng=random.Random(1),
        entropy=random.Random("entropy:own-stun").randbytes,
        wallclock=lambda: 1_800_000_000.0,
        now=0.0,
    )
    mapped: list[stun.MappedAddress] = []
    now = 0.0
    for _ in range(6):
        now += 0.01
        for data, destination in node.datagrams_to_send():
            if destination == own:
                node.receive_datagram(data, own, now)
        mapped.extend(e for e in node.events() if isinstance(e, stun.MappedAddress))
    assert [(event.server, event.mapped) for event in mapped][:1] == [(own, own)]


LAN_HOST = "192.168.1.2"
"""Every site's LAN uses the same private address, as home routers do."""


PUBLIC = NatInfo(NatMapping.NONE, NatFiltering.ENDPOINT_INDEPENDENT)


def nat_facts(kind: str) -> NatInfo:
    """What a node behind a simulated NAT of ``kind`` would have measured about it."""
    behaviour = NAT_TYPES[kind]
    return NatInfo(
        NatMapping[behaviour.mapping.name], NatFiltering[behaviour.filtering.name]
    )


class SiteMesh:
    """Nodes on public addresses, and one node per site behind that site's simulated NAT
    (``sim.nat.Nat``); every site's node has the same private address ``LAN_HOST``.

    The NATed nodes are told their NAT facts, so they do not ask for their public mapping
    by STUN and advertise only ``LAN_HOST``.
    """

    def __init__(
        self, public: int, sites: list[str], *, latency: float = 0.01, public_latency: float = 0.01
    ) -> None:
        self.now = 0.0
        self.latency = latency
        self.public_latency = public_latency
        """One-way delay of datagrams to or from a public node."""
        self.public: list[Address] = [(f"198.51.100.{i + 1}", PORT) for i in range(public)]
        self.nats = [
            Nat(f"nat{i}", f"203.0.113.{i + 1}", NAT_TYPES[kind], random.Random(i))
            for i, kind in enumerate(sites)
        ]
        for nat in self.nats:
            nat.add_inside(LAN_HOST)
        size = public + len(sites)
        self.site_of: list[int | None] = [None] * public + list(range(len(sites)))
        self.keys = [
            Identity.from_seed(hashlib.sha256(f"site-test:{i}".encode()).digest()).public_key
            for i in range(size)
        ]
        self.nodes: list[Node] = []
        for i in range(size):
            identity = Identity.from_seed(hashlib.sha256(f"site-test:{i}".encode()).digest())
            site = self.site_of[i]
            config = NodeConfig(
                swim=SwimConfig.lan(),
                nat=PUBLIC if site is None else nat_facts(sites[site]),
                allow_relay=site is None,
            )
            self.nodes.append(
                Node(
                    identity,
                    config=config,
                    trusted_keys=self.keys,
                    advertised_endpoints=[Endpoint(*self.local_address(i))],
                    rng=random.Random(i),
                    entropy=random.Random(f"site-entropy:{i}").randbytes,
                    wallclock=lambda: 1_800_000_000.0 + self.now,
                    now=0.0,
                )
            )
        self.in_flight: list[tuple[float, int, bytes, Address, int]] = []
        self.order = 0
        self.events: list[list[object]] = [[] for _ in range(size)]

    def local_address(self, index: int) -> Address:
        return self.public[index] if self.site_of[index] is None else (LAN_HOST, PORT)

    def _deliver_to(self, destination: Address, site: int | None) -> int | None:
        for index, node_site in enumerate(self.site_of):
            if node_site == site and self.local_address(index) == destination:
                return index
        return None

    def route(self, source: int, destination: Address, data: bytes) -> None:
        """Through the sender's NAT, across the Internet, through the receiver's NAT."""
        packet = Packet(self.local_address(source), destination, data)
        site = self.site_of[source]
        delay = self.latency
        if site is None or destination in self.public:
            delay = self.public_latency
        if site is not None:
            forwarded = self.nats[site].forward(packet, self.now)
            if forwarded is None:
                return
            if forwarded.dst[0] == LAN_HOST:
                self._enqueue(forwarded, self._deliver_to(forwarded.dst, site), delay)
                return
            packet = forwarded
        for index, nat in enumerate(self.nats):
            if packet.dst[0] == nat.public_ip:
                inbound = nat.forward(packet, self.now)
                if inbound is not None:
                    self._enqueue(inbound, self._deliver_to(inbound.dst, index), delay)
                return
        self._enqueue(packet, self._deliver_to(packet.dst, None), delay)

    def _enqueue(self, packet: Packet, receiver: int | None, delay: float) -> None:
        if receiver is not None:
            self.order += 1
            heapq.heappush(
                self.in_flight,
                (self.now + delay, self.order, packet.data, packet.src, receiver),
            )

    def flush(self, index: int) -> None:
        node = self.nodes[index]
        for data, destination in node.datagrams_to_send():
            self.route(index, destination, data)
        self.events[index].extend(node.events())

    def run_until(self, end: float) -> None:
        while (step := next_event(self.nodes, self.in_flight, end)) is not None:
            moment, due = step
            self.now = max(self.now, moment)
            if due is None:
                _, _, data, source, receiver = heapq.heappop(self.in_flight)
                self.nodes[receiver].receive_datagram(data, source, self.now)
                self.flush(receiver)
            else:
                self.nodes[due].on_timer(self.now)
                self.flush(due)
        self.now = end

    def join_all(self) -> None:
        for i in range(1, len(self.nodes)):
            self.nodes[i].join([self.public[0]], self.now)
            self.flush(i)

    def suspicions(self) -> list[tuple[int, int]]:
        """(observer, suspected member) of every MemberSuspected or MemberDead event."""
        found = []
        for observer, events in enumerate(self.events):
            for event in events:
                if isinstance(event, MemberSuspected | MemberDead):
                    found.append((observer, self.keys.index(event.public_key)))
        return found


def test_members_behind_nats_sharing_one_private_address_are_never_suspected() -> None:
    """Three sites behind NATs that map per destination with random ports, each node on
    192.168.1.2 and advertising only that: every pair of them is relayed through a public
    member. Membership datagrams (probes, and the helpers' indirect probes) must follow
    each member's path: the shared private address reaches the sender's own LAN, or
    nothing, never the member."""
    mesh = SiteMesh(2, ["symmetric_random"] * 3)
    mesh.join_all()
    mesh.run_until(90.0)
    natted = range(2, 5)
    for i in natted:
        for j in natted:
            if i != j:
                assert mesh.nodes[i].paths()[mesh.keys[j]].kind is PathKind.RELAYED
    assert mesh.suspicions() == []
    for node in mesh.nodes:
        assert [m.state for m in node.membership.members()] == [MemberState.ALIVE] * 5
        assert node.membership.counters["probe_failed"] == 0


def test_nat_detection_runs_again_when_the_public_mapping_changes() -> None:
    """A node's NAT is replaced under it (a new router, another uplink): the periodic STUN
    refresh sees another mapping, and the node probes the new NAT and gossips what it is."""
    servers: list[Address] = [("203.0.113.10", 3478), ("203.0.113.11", 3478)]
    responders = {server: stun.StunResponder() for server in servers}
    identity = Identity.from_seed(hashlib.sha256(b"node-test:nat-change").digest())
    node = Node(
        identity,
        config=NodeConfig(swim=SwimConfig.lan(), stun_servers=tuple(servers)),
        trusted_keys=[identity.public_key],
        advertised_endpoints=[Endpoint(LAN_HOST, PORT)],
        rng=random.Random(7),
        entropy=random.Random("entropy:nat-change").randbytes,
        wallclock=lambda: 1_800_000_000.0,
        now=0.0,
    )

    def cone(server: Address) -> Address:
        return ("198.51.100.1", 40000)

    def symmetric(server: Address) -> Address:
        return ("198.51.100.99", 41000 + servers.index(server))

    def run(nat: object, until: float, now: float) -> tuple[float, list[NatDetected]]:
        detected: list[NatDetected] = []
        while now < until:
            deadline = node.next_deadline()
            now = until if deadline is None else min(max(deadline, now), until)
            node.on_timer(now)
            for data, destination in node.datagrams_to_send():
                responder = responders.get(destination)
                answer = None if responder is None else responder.answer(data, nat(destination))
                if answer is not None:
                    node.receive_datagram(answer, destination, now)
            detected.extend(e for e in node.events() if isinstance(e, NatDetected))
        return now, detected

    now, first = run(cone, 60.0, 0.0)
    assert [d.report.nat.mapping for d in first] == [NatMapping.ENDPOINT_INDEPENDENT]
    assert node.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT

    now, second = run(symmetric, 150.0, now)
    assert len(second) == 1
    assert second[0].report.nat.mapping is not NatMapping.ENDPOINT_INDEPENDENT
    assert node.nat.mapping is second[0].report.nat.mapping
    own = node.membership.member(identity.public_key)
    assert own is not None and own.nat.mapping is second[0].report.nat.mapping
    assert Endpoint("198.51.100.99", 41000) in own.endpoints


def test_a_punch_answered_before_its_response_arrives_is_punched_both_ways() -> None:
    """A full-cone member punches toward one behind a per-destination NAT with random
    ports, through a far public rendezvous. The other member's probes arrive before the
    forwarded PunchResponse: the full-cone side must probe back at once, or the other side
    sees a punched path while the full-cone side falls back to a relay (its probes to the
    response's candidates and predicted ports cannot pass a random per-destination NAT)."""
    for sites in (["full_cone", "symmetric_random"], ["symmetric_random", "full_cone"]):
        mesh = SiteMesh(2, sites, public_latency=0.05)
        mesh.join_all()
        mesh.run_until(30.0)
        kinds = {mesh.nodes[i].paths()[mesh.keys[j]].kind for i, j in ((2, 3), (3, 2))}
        assert kinds <= {PathKind.DIRECT, PathKind.PUNCHED}, (sites, kinds)


def test_joining_members_behind_nats_are_probed_through_a_relay_before_their_paths_exist() -> None:
    """Six members behind random per-destination NATs join at once: for seconds no pair of
    them has a path (checks, then punches that fail, then relays), and SWIM's helpers have
    none either. Membership datagrams to a member without a path also go through a public
    relay, so none of them is suspected meanwhile."""
    mesh = SiteMesh(1, ["symmetric_random"] * 6)
    mesh.join_all()
    mesh.run_until(20.0)
    assert mesh.suspicions() == []
    assert mesh.nodes[0].traversal.counters["relay_forwarded"] > 0
