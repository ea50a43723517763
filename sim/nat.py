"""NAT devices as simulated hosts: ``Nat`` is a ``sim.network.Middlebox`` on a graph node
between its inside hosts (or inner NATs) and the rest of the underlay.

Behaviour follows RFC 4787 terms. *Mapping*: endpoint-independent (one public port per inside
address), address-dependent (one per inside address and destination IP) or
address-and-port-dependent (one per destination IP and port: "symmetric"), with sequential
or random port allocation. *Filtering*: endpoint-independent (full cone: anyone may send to a
live mapping), address-dependent (only IPs the mapping sent to) or address-and-port-dependent
(only the exact IP and port). Mappings and their permissions expire ``timeout`` seconds after
the last packet through them (either way). *Hairpinning*: an inside host sending to the
NAT's own public address reaches the inside host behind that mapping, seen from the sender's
public mapping; without it such packets are dropped.

Inside addresses are private: a packet from outside addressed to an inside address is
dropped, as the Internet would. Nesting (carrier-grade NAT) is a NAT whose inside holds
another NAT's public address.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx

from meshguard.sansio.types import Address
from sim.network import Packet, add_link, router_name
from sim.scenario import Latency, LinkSpec, NatSpec

FIRST_PORT = 20000
LAST_PORT = 65535


class Mapping(enum.Enum):
    ENDPOINT_INDEPENDENT = "endpoint_independent"
    ADDRESS_DEPENDENT = "address_dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address_and_port_dependent"


class Filtering(enum.Enum):
    ENDPOINT_INDEPENDENT = "endpoint_independent"
    ADDRESS_DEPENDENT = "address_dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address_and_port_dependent"


@dataclass(frozen=True, slots=True)
class NatBehaviour:
    mapping: Mapping
    filtering: Filtering
    random_ports: bool = False
    hairpinning: bool = True
    timeout: float = 120.0


NAT_TYPES: dict[str, NatBehaviour] = {
    "full_cone": NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ENDPOINT_INDEPENDENT),
    "address_restricted": NatBehaviour(Mapping.ENDPOINT_INDEPENDENT,
                                       Filtering.ADDRESS_DEPENDENT),
    "port_restricted": NatBehaviour(Mapping.ENDPOINT_INDEPENDENT,
                                    Filtering.ADDRESS_AND_PORT_DEPENDENT),
    "address_dependent": NatBehaviour(Mapping.ADDRESS_DEPENDENT,
                                      Filtering.ADDRESS_AND_PORT_DEPENDENT),
    "symmetric": NatBehaviour(Mapping.ADDRESS_AND_PORT_DEPENDENT,
                              Filtering.ADDRESS_AND_PORT_DEPENDENT),
    "symmetric_random": NatBehaviour(Mapping.ADDRESS_AND_PORT_DEPENDENT,
                                     Filtering.ADDRESS_AND_PORT_DEPENDENT, random_ports=True),
}
"""The scenario names of NAT behaviours (``nat.mix`` keys)."""


@dataclass(slots=True)
class _Binding:
    """One public port: the inside address behind it and who may send to it, until when."""

    inside: Address
    key: tuple[Address, str | None, int | None]
    expires: float
    permissions: dict[Address | str, float] = field(default_factory=dict)


class Nat:
    """One NAT device with one public IP; see the module docstring for the behaviours."""

    def __init__(self, name: str, public_ip: str, behaviour: NatBehaviour,
                 rng: random.Random) -> None:
        self.name = name
        self.public_ip = public_ip
        self.behaviour = behaviour
        self.rng = rng
        self.inside: set[str] = set()
        self._bindings: dict[int, _Binding] = {}
        self._port_of: dict[tuple[Address, str | None, int | None], int] = {}
        self._next_port = FIRST_PORT
        self.counters: dict[str, int] = dict.fromkeys(
            ("mapped", "expired", "filtered", "hairpinned", "hairpin_dropped",
             "to_private_dropped", "no_mapping", "ports_exhausted"), 0)

    def add_inside(self, ip: str) -> None:
        """``ip`` (a host or an inner NAT's public IP) is behind this NAT."""
        self.inside.add(ip)

    def forward(self, packet: Packet, now: float) -> Packet | None:
        src_inside = packet.src[0] in self.inside
        if packet.dst[0] == self.public_ip:
            if src_inside:
                return self._hairpin(packet, now)
            return self._inbound(packet, packet.src, now)
        if packet.dst[0] in self.inside:
            if src_inside:
                return packet
            self.counters["to_private_dropped"] += 1
            return None
        if src_inside:
            public = self._outbound(packet.src, packet.dst, now)
            if public is None:
                return None
            return Packet(public, packet.dst, packet.data)
        return packet

    def mapping_for(self, inside: Address, destination: Address, now: float) -> Address | None:
        """The public address ``inside`` would be seen from by ``destination`` now, if any."""
        port = self._port_of.get(self._key(inside, destination))
        if port is None or self._bindings[port].expires < now:
            return None
        return (self.public_ip, port)

    def _key(self, inside: Address, destination: Address
             ) -> tuple[Address, str | None, int | None]:
        mapping = self.behaviour.mapping
        if mapping is Mapping.ENDPOINT_INDEPENDENT:
            return (inside, None, None)
        if mapping is Mapping.ADDRESS_DEPENDENT:
            return (inside, destination[0], None)
        return (inside, destination[0], destination[1])

    def _permission(self, remote: Address) -> Address | str | None:
        filtering = self.behaviour.filtering
        if filtering is Filtering.ENDPOINT_INDEPENDENT:
            return None
        if filtering is Filtering.ADDRESS_DEPENDENT:
            return remote[0]
        return remote

    def _outbound(self, inside: Address, destination: Address, now: float) -> Address | None:
        key = self._key(inside, destination)
        port = self._port_of.get(key)
        binding = None if port is None else self._bindings[port]
        if binding is not None and binding.expires < now:
            self.counters["expired"] += 1
            self._release(port, binding)
            binding = None
        if binding is None:
            port = self._allocate()
            if port is None:
                self.counters["ports_exhausted"] += 1
                return None
            binding = _Binding(inside, key, now)
            self._bindings[port] = binding
            self._port_of[key] = port
            self.counters["mapped"] += 1
        assert port is not None
        timeout = self.behaviour.timeout
        binding.expires = now + timeout
        permission = self._permission(destination)
        if permission is not None:
            binding.permissions[permission] = now + timeout
        return (self.public_ip, port)

    def _inbound(self, packet: Packet, seen_source: Address, now: float) -> Packet | None:
        binding = self._bindings.get(packet.dst[1])
        if binding is None or binding.expires < now:
            self.counters["no_mapping"] += 1
            return None
        permission = self._permission(seen_source)
        if permission is not None and binding.permissions.get(permission, -1.0) < now:
            self.counters["filtered"] += 1
            return None
        timeout = self.behaviour.timeout
        binding.expires = now + timeout
        if permission is not None:
            binding.permissions[permission] = now + timeout
        return Packet(seen_source, binding.inside, packet.data)

    def _hairpin(self, packet: Packet, now: float) -> Packet | None:
        if not self.behaviour.hairpinning:
            self.counters["hairpin_dropped"] += 1
            return None
        public = self._outbound(packet.src, packet.dst, now)
        if public is None:
            return None
        forwarded = self._inbound(packet, public, now)
        if forwarded is not None:
            self.counters["hairpinned"] += 1
        return forwarded

    def _allocate(self) -> int | None:
        in_use = self._bindings
        if len(in_use) > LAST_PORT - FIRST_PORT:
            return None
        if self.behaviour.random_ports:
            port = self.rng.randint(FIRST_PORT, LAST_PORT)
            while port in in_use:
                port = self.rng.randint(FIRST_PORT, LAST_PORT)
            return port
        port = self._next_port
        while port in in_use:
            port = FIRST_PORT if port >= LAST_PORT else port + 1
        self._next_port = FIRST_PORT if port >= LAST_PORT else port + 1
        return port

    def _release(self, port: int | None, binding: _Binding) -> None:
        if port is not None:
            self._bindings.pop(port, None)
        self._port_of.pop(binding.key, None)


PUBLIC_POOL = ipaddress.IPv4Network("198.18.0.0/15")
"""Public addresses of NAT devices (the benchmarking range, never a host pool default)."""
LAN_LINK = LinkSpec(Latency("constant", 0.0005))
"""Between a NAT and what is behind it."""


@dataclass(slots=True)
class NatPlan:
    """The NAT devices of a run: by graph node name, and the device in front of each host."""

    devices: dict[str, Nat] = field(default_factory=dict)
    front_of: dict[str, Nat] = field(default_factory=dict)
    kind_of: dict[str, str] = field(default_factory=dict)
    """Host → the NAT kind in front of it (``cgnat+<kind>`` when nested)."""

    def counters(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for device in self.devices.values():
            for key, value in device.counters.items():
                total[key] = total.get(key, 0) + value
        return total


def place_nats(graph: nx.Graph, spec: NatSpec, hosts: Sequence[tuple[str, str, str]],
               candidates: Sequence[str], access: LinkSpec, rng: random.Random) -> NatPlan:
    """Moves ``spec.fraction`` of ``hosts`` (name, group, IP), drawn from ``candidates``,
    behind new NAT devices on ``graph``.

    A device takes the host's access link to its group router (or hangs off the group's
    carrier-grade NAT); hosts reach it over a LAN link. Every draw is from ``rng``.
    """
    plan = NatPlan()
    by_name = {name: (group, ip) for name, group, ip in hosts}
    wanted = min(len(candidates), round(spec.fraction * len(hosts)))
    chosen = set(rng.sample(list(candidates), wanted))
    kinds = [kind for kind, _ in spec.mix]
    weights = [weight for _, weight in spec.mix]
    addresses = (str(address) for address in PUBLIC_POOL.hosts())
    groups: dict[str, list[str]] = {}
    for name, group, _ in hosts:
        if name in chosen:
            groups.setdefault(group, []).append(name)
    carriers: dict[str, Nat] = {}

    def device(name: str, kind: str, group: str) -> Nat:
        behaviour = dataclasses.replace(NAT_TYPES[kind], timeout=spec.timeout,
                                        hairpinning=spec.hairpinning)
        nat = Nat(name, next(addresses), behaviour, random.Random(rng.random()))
        graph.add_node(name, kind="nat", group=group, middlebox=nat)
        plan.devices[name] = nat
        return nat

    for group, members in groups.items():
        for start in range(0, len(members), spec.hosts_per_nat):
            inside = members[start:start + spec.hosts_per_nat]
            kind = rng.choices(kinds, weights)[0]
            name = f"nat:{len(plan.devices)}"
            nat = device(name, kind, group)
            label = kind
            if spec.cgnat and rng.random() < spec.cgnat:
                carrier = carriers.get(group)
                if carrier is None:
                    carrier = device(f"cgnat:{group}", spec.cgnat_type, group)
                    carriers[group] = carrier
                    add_link(graph, carrier.name, router_name(group), access)
                carrier.add_inside(nat.public_ip)
                add_link(graph, name, carrier.name, LAN_LINK)
                label = f"cgnat+{kind}"
            else:
                add_link(graph, name, router_name(group), access)
            for host in inside:
                graph.remove_edge(host, router_name(group))
                add_link(graph, host, name, LAN_LINK)
                nat.add_inside(by_name[host][1])
                plan.front_of[host] = nat
                plan.kind_of[host] = label
    return plan
