"""``NodeConfig(external_wireguard=True)``: the Node keeps the port, another WireGuard encrypts.

Node 0 of a three-node in-memory mesh hands its WireGuard datagrams to a second, separate
``WireGuardDevice`` standing for wireguard-go (the driver's proxy, done here by hand: one
virtual "loopback" address per member), and sends that device's datagrams with
``send_wireguard``. The other two nodes run the normal data plane. Traffic must flow both
ways, every received datagram must be attributed to the right member, and node 0's own
device must never take part.
"""

from __future__ import annotations

import ipaddress
import random

from meshguard.identity.meshaddr import mesh_ipv4, mesh_ipv6
from meshguard.sansio.messages import Endpoint
from meshguard.sansio.node import Node, NodeConfig, PeerAdded, PeerRemoved
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.types import Address
from meshguard.sansio.wireguard import WireGuardDevice
from tests.test_node import Mesh, ipv4_udp_packet, ipv6_udp_packet


def _proxy_address(member: bytes) -> Address:
    return (f"proxy-{member.hex()}", 1)


class ExternalMesh(Mesh):
    """A Mesh whose node 0 runs with an external WireGuard device behind a proxy."""

    def __init__(self) -> None:
        super().__init__(3)
        identity = self.identities[0]
        self.nodes[0] = Node(
            identity,
            config=NodeConfig(swim=SwimConfig.lan(), external_wireguard=True),
            trusted_keys=self.keys,
            advertised_endpoints=[Endpoint(*self.addresses[0])],
            rng=random.Random(0),
            entropy=random.Random("entropy:0").randbytes,
            wallclock=lambda: 1_800_000_000.0 + self.now,
            now=0.0,
        )
        self.external = WireGuardDevice(
            identity.x25519_private,
            entropy=random.Random("external").randbytes,
            rng=random.Random(1),
            wallclock=lambda: 1_800_000_000.0 + self.now,
        )
        self.attributed: list[bytes | None] = []

    def flush(self, index: int) -> None:
        if index != 0:
            super().flush(index)
            return
        node = self.nodes[0]
        for event in node.events():
            self.events[0].append(event)
            if isinstance(event, PeerAdded):
                self.external.add_peer(
                    node.wireguard_key_of(event.public_key),
                    allowed_ips=(
                        ipaddress.ip_network(event.mesh_ipv4),
                        ipaddress.ip_network(event.mesh_ipv6),
                    ),
                    endpoint=_proxy_address(event.public_key),
                    now=self.now,
                )
            elif isinstance(event, PeerRemoved):
                self.external.remove_peer(node.wireguard_key_of(event.public_key), self.now)
        for data, member, _source in node.wireguard_datagrams():
            self.attributed.append(member)
            if member is not None:
                self.external.receive_datagram(data, _proxy_address(member), self.now)
        for data, address in self.external.datagrams_to_send():
            node.send_wireguard(bytes.fromhex(address[0].removeprefix("proxy-")), [data], self.now)
        self.received[0].extend(self.external.tun_packets())
        super().flush(0)

    def send_external(self, packets: list[bytes]) -> None:
        self.external.send_packets(packets, self.now)
        self.flush(0)


def test_traffic_flows_both_ways_through_the_external_device() -> None:
    mesh = ExternalMesh()
    mesh.join_all()
    mesh.run_until(10.0)
    node = mesh.nodes[0]
    assert node.peer_keys() == sorted(mesh.keys[1:])
    keys = mesh.keys
    for other in (1, 2):
        mesh.send(other, [ipv4_udp_packet(mesh_ipv4(keys[other]), mesh_ipv4(keys[0]), b"in-4")])
        mesh.send(other, [ipv6_udp_packet(mesh_ipv6(keys[other]), mesh_ipv6(keys[0]), b"in-6")])
        mesh.send_external(
            [ipv4_udp_packet(mesh_ipv4(keys[0]), mesh_ipv4(keys[other]), b"out4")]
        )
    mesh.run_until(12.0)
    assert sorted(packet[-4:] for packet in mesh.received[0]) == [b"in-4"] * 2 + [b"in-6"] * 2
    assert [packet[-4:] for packet in mesh.received[1]] == [b"out4"]
    assert [packet[-4:] for packet in mesh.received[2]] == [b"out4"]
    assert mesh.attributed and set(mesh.attributed) == {keys[1], keys[2]}
    for key in node.peer_keys():
        own = node.device.peer_stats(node.wireguard_key_of(key))
        assert not own.handshake_completed and own.rx_bytes == own.tx_bytes == 0
        assert mesh.external.peer_stats(node.wireguard_key_of(key)).handshake_completed


def test_member_at_knows_paths_and_nothing_else() -> None:
    mesh = ExternalMesh()
    mesh.join_all()
    mesh.run_until(10.0)
    node = mesh.nodes[0]
    assert node.member_at(mesh.addresses[1]) == mesh.keys[1]
    assert node.member_at(mesh.addresses[2]) == mesh.keys[2]
    assert node.member_at(("198.51.100.9", 51821)) is None
    assert node.member_at(mesh.addresses[0]) is None


def test_send_wireguard_without_a_path_is_counted_not_raised() -> None:
    mesh = ExternalMesh()
    node = mesh.nodes[0]
    node.send_wireguard(b"\x01" * 32, [b"\x01\x00\x00\x00" + b"x" * 144], 0.0)
    assert node.counters["external_wireguard_unroutable"] == 1
    assert node.datagrams_to_send() == []
