"""NAT devices of the simulator: each mapping and filtering behaviour, timeouts, hairpinning,
several hosts behind one NAT and nested NAT, on the device alone and through the network."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import simpy

import sim
from meshguard.sansio.types import Address
from sim.cores import NodeCore
from sim.nat import NAT_TYPES, Filtering, Mapping, Nat, NatBehaviour
from sim.network import Network, Packet, add_link
from sim.reachability import EffectiveNat, PairClass, classify_pair, effective_nat, nat_chain
from sim.scenario import Latency, LinkSpec

ROOT = Path(__file__).resolve().parent.parent
INSIDE: Address = ("192.168.1.10", 51821)
OTHER_INSIDE: Address = ("192.168.1.11", 51821)
PEER: Address = ("198.51.100.1", 51821)
PEER_OTHER_PORT: Address = ("198.51.100.1", 4000)
THIRD: Address = ("198.51.100.2", 51821)


def nat(kind: str, **changes: object) -> Nat:
    behaviour = dataclasses.replace(NAT_TYPES[kind], **changes)  # type: ignore[arg-type]
    device = Nat("nat", "203.0.113.1", behaviour, random.Random(1))
    device.add_inside(INSIDE[0])
    device.add_inside(OTHER_INSIDE[0])
    return device


def out(device: Nat, inside: Address, to: Address, now: float = 0.0) -> Address:
    packet = device.forward(Packet(inside, to, b"x"), now)
    assert packet is not None and packet.dst == to
    return packet.src


def back(device: Nat, source: Address, to: Address, now: float = 0.0) -> Address | None:
    packet = device.forward(Packet(source, to, b"y"), now)
    return None if packet is None else packet.dst


def test_endpoint_independent_mapping_keeps_one_port_for_every_destination() -> None:
    device = nat("port_restricted")
    public = out(device, INSIDE, PEER)
    assert public[0] == "203.0.113.1"
    assert out(device, INSIDE, THIRD) == public == out(device, INSIDE, PEER_OTHER_PORT)
    assert out(device, OTHER_INSIDE, PEER) != public


def test_address_dependent_mapping_changes_port_with_the_destination_ip_only() -> None:
    device = nat("address_dependent")
    public = out(device, INSIDE, PEER)
    assert out(device, INSIDE, PEER_OTHER_PORT) == public
    assert out(device, INSIDE, THIRD) != public


def test_symmetric_mapping_changes_port_per_destination_sequentially_or_randomly() -> None:
    device = nat("symmetric")
    ports = [out(device, INSIDE, to)[1] for to in (PEER, PEER_OTHER_PORT, THIRD)]
    assert ports == [ports[0], ports[0] + 1, ports[0] + 2]
    randomised = nat("symmetric_random")
    ports = [out(randomised, INSIDE, to)[1] for to in (PEER, PEER_OTHER_PORT, THIRD)]
    assert len(set(ports)) == 3 and sorted(ports) != list(range(ports[0], ports[0] + 3))


def test_full_cone_lets_anyone_reach_a_live_mapping() -> None:
    device = nat("full_cone")
    public = out(device, INSIDE, PEER)
    assert back(device, THIRD, public) == INSIDE
    assert back(device, PEER_OTHER_PORT, public) == INSIDE
    assert back(device, THIRD, ("203.0.113.1", public[1] + 1)) is None  # no mapping there


def test_address_restricted_filters_by_ip_and_port_restricted_by_ip_and_port() -> None:
    device = nat("address_restricted")
    public = out(device, INSIDE, PEER)
    assert back(device, PEER_OTHER_PORT, public) == INSIDE
    assert back(device, THIRD, public) is None
    device = nat("port_restricted")
    public = out(device, INSIDE, PEER)
    assert back(device, PEER, public) == INSIDE
    assert back(device, PEER_OTHER_PORT, public) is None
    assert back(device, THIRD, public) is None
    assert device.counters["filtered"] == 2
    out(device, INSIDE, THIRD)  # punching: sending out opens the hole
    assert back(device, THIRD, public) == INSIDE


def test_mappings_expire_after_the_timeout_and_traffic_refreshes_them() -> None:
    device = nat("port_restricted", timeout=30.0)
    public = out(device, INSIDE, PEER, now=0.0)
    assert back(device, PEER, public, now=25.0) == INSIDE  # inbound refreshes to 55
    assert back(device, PEER, public, now=50.0) == INSIDE
    assert back(device, PEER, public, now=81.0) is None
    assert device.mapping_for(INSIDE, PEER, 81.0) is None
    again = out(device, INSIDE, PEER, now=82.0)
    assert again != public and device.counters["expired"] == 1


def test_hairpinning_on_and_off() -> None:
    device = nat("full_cone")
    first = out(device, INSIDE, PEER)
    second = out(device, OTHER_INSIDE, PEER)
    hairpinned = device.forward(Packet(INSIDE, second, b"z"), 1.0)
    assert hairpinned == Packet(first, OTHER_INSIDE, b"z")  # seen from the public mapping
    closed = nat("full_cone", hairpinning=False)
    out(closed, OTHER_INSIDE, PEER)
    assert closed.forward(Packet(INSIDE, second, b"z"), 1.0) is None
    assert closed.counters["hairpin_dropped"] == 1


def test_hosts_behind_one_nat_talk_on_the_lan_and_outsiders_cannot_reach_private_ips() -> None:
    device = nat("symmetric")
    assert device.forward(Packet(INSIDE, OTHER_INSIDE, b"lan"), 0.0) == Packet(
        INSIDE, OTHER_INSIDE, b"lan")
    assert device.forward(Packet(PEER, INSIDE, b"in"), 0.0) is None
    assert device.counters["to_private_dropped"] == 1


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, Address]] = []

    def receiver(self, name: str) -> sim.network.Receiver:
        return lambda data, source: self.got.append((name, data, source))


def test_nested_nat_through_the_network() -> None:
    """host ─ home NAT ─ carrier NAT ─ router ─ server: the server sees the carrier's
    address; its reply crosses both NATs back; an unsolicited packet does not."""
    link = LinkSpec(Latency("constant", 0.001))
    graph = nx.Graph()
    graph.add_node("router", kind="router", group="g")
    behaviour = NatBehaviour(Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT)
    home = Nat("home", "100.64.0.1", behaviour, random.Random(1))
    carrier = Nat("carrier", "203.0.113.9", behaviour, random.Random(2))
    home.add_inside(INSIDE[0])
    carrier.add_inside(home.public_ip)
    graph.add_node("home", kind="nat", group="g", middlebox=home)
    graph.add_node("carrier", kind="nat", group="g", middlebox=carrier)
    for name in ("host", "server", "stranger"):
        graph.add_node(name, kind="host", group="g")
    add_link(graph, "host", "home", link)
    add_link(graph, "home", "carrier", link)
    add_link(graph, "carrier", "router", link)
    add_link(graph, "server", "router", link)
    add_link(graph, "stranger", "router", link)
    env = simpy.Environment()
    network = Network(env, graph, random.Random(3))
    for ip, owner in ((INSIDE[0], "host"), (PEER[0], "server"), (THIRD[0], "stranger"),
                      (home.public_ip, "home"), (carrier.public_ip, "carrier")):
        network.assign_ip(ip, owner)
    recorder = Recorder()
    for address, name in ((INSIDE, "host"), (PEER, "server"), (THIRD, "stranger")):
        network.bind(address, recorder.receiver(name))
    network.send(INSIDE, PEER, b"hello")
    env.run(until=1)
    ((name, data, seen),) = recorder.got
    assert (name, data, seen[0]) == ("server", b"hello", carrier.public_ip)
    network.send(PEER, seen, b"reply")
    network.send(THIRD, seen, b"unsolicited")
    network.send(THIRD, INSIDE, b"to a private address")
    env.run(until=2)
    assert recorder.got[1:] == [("host", b"reply", PEER)]
    assert network.counters["middlebox_dropped"] == 2


@pytest.mark.parametrize(("nat_field", "message"), [
    ({"fraction": 0.5, "mix": {"cone": 1}}, "nat.mix.cone: unknown NAT kind"),
    ({"fraction": 1.5}, "nat.fraction: must be a probability"),
    ({"fraction": 0.5, "mix": {"symmetric": 0}}, "nat.mix: needs at least one kind"),
    ({"fraction": 0.5, "hairpinning": "yes"}, "nat.hairpinning: must be true or false"),
])
def test_bad_nat_settings_are_one_line_errors(nat_field: dict[str, object],
                                              message: str) -> None:
    with pytest.raises(sim.ScenarioError) as caught:
        sim.load_scenario({"duration": 10, "core": "node", "nodes": {"count": 4},
                           "nat": nat_field})
    assert message in str(caught.value)


def test_nat_needs_the_node_core() -> None:
    with pytest.raises(sim.ScenarioError, match="nat: needs core: node"):
        sim.load_scenario({"duration": 10, "nodes": {"count": 4}, "nat": {"fraction": 0.5}})


def test_seeds_stay_public_and_shared_nats_hold_several_hosts() -> None:
    scenario = sim.load_scenario({
        "duration": 5, "settle": None, "core": "node", "nodes": {"count": 10, "seeds": 2},
        "nat": {"fraction": 0.8, "hosts_per_nat": 3, "mix": {"full_cone": 1}}})
    simulation = sim.Simulation(scenario)
    behind = simulation.nats.front_of
    assert len(behind) == 8 and not {"n0", "n1"} & set(behind)
    sizes = sorted(len(device.inside) for device in simulation.nats.devices.values())
    assert sizes == [2, 3, 3]


NAT_SCENARIO = """
duration: 40
settle: null
core: node
traffic: {interval: 2, start: 20}
nodes: {count: 8, seeds: 2, join_spread: 2}
protocol: {profile: lan}
nat: {fraction: 0.6, mix: {full_cone: 1, symmetric_random: 1, port_restricted: 1},
      hosts_per_nat: 2, cgnat: 0.5}
"""


def test_nat_run_is_deterministic_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "nat.yaml"
    path.write_text(NAT_SCENARIO)
    first = sim.run(sim.load_scenario(path), seed=4)
    lines = []
    for run in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "sim", str(path), "--seed", "4", "--quiet",
             "--out", str(tmp_path / f"out{run}")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": str(run + 3)})
        assert done.returncode == 0, done.stderr
        lines.append(done.stdout.splitlines()[-1])
    assert lines == [f"seed 4  trace {first.trace_hash}"] * 2


def device(kind: str, ip: str, **changes: object) -> Nat:
    behaviour = dataclasses.replace(NAT_TYPES[kind], **changes)  # type: ignore[arg-type]
    return Nat(ip, ip, behaviour, random.Random(1))


@pytest.mark.parametrize(("a", "b", "expected"), [
    ("full_cone", "symmetric_random", PairClass.DIRECT),
    ("port_restricted", "port_restricted", PairClass.PUNCHABLE),
    ("address_restricted", "port_restricted", PairClass.PUNCHABLE),
    ("address_restricted", "symmetric_random", PairClass.PUNCHABLE),
    ("address_restricted", "address_dependent", PairClass.PUNCHABLE),
    ("port_restricted", "symmetric", PairClass.PREDICTION),
    ("port_restricted", "address_dependent", PairClass.PREDICTION),
    ("port_restricted", "symmetric_random", PairClass.RELAY_ONLY),
    ("symmetric", "symmetric", PairClass.RELAY_ONLY),
    ("address_dependent", "symmetric_random", PairClass.RELAY_ONLY),
])
def test_pair_classes_of_single_nats(a: str, b: str, expected: PairClass) -> None:
    first, second = (device(a, "198.18.0.1"),), (device(b, "198.18.0.2"),)
    assert classify_pair(first, second) is expected
    assert classify_pair(second, first) is expected


def test_public_hosts_and_hosts_sharing_a_nat_connect_directly() -> None:
    home = device("symmetric_random", "198.18.0.1")
    other = device("symmetric_random", "198.18.0.2")
    assert classify_pair((), (home,)) is PairClass.DIRECT
    assert classify_pair((), ()) is PairClass.DIRECT
    assert classify_pair((home,), (home,)) is PairClass.DIRECT
    assert classify_pair((home,), (other,)) is PairClass.RELAY_ONLY


def test_nested_nats_add_up_innermost_first() -> None:
    carrier = device("port_restricted", "198.18.1.1")
    random_carrier = device("port_restricted", "198.18.1.2", random_ports=True)
    full_cone = device("full_cone", "198.18.0.1")
    symmetric_random = device("symmetric_random", "198.18.0.2")
    assert effective_nat((full_cone, carrier)) == EffectiveNat(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT, predictable=True)
    assert effective_nat((symmetric_random, carrier)) == EffectiveNat(
        Mapping.ADDRESS_AND_PORT_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT,
        predictable=True), "the outer device allocates the ports the world sees"
    assert not effective_nat((symmetric_random, random_carrier)).predictable  # type: ignore[union-attr]
    port_restricted = (device("port_restricted", "198.18.0.3"),)
    assert classify_pair((full_cone,), port_restricted) is PairClass.DIRECT
    assert classify_pair((full_cone, carrier), port_restricted) is PairClass.PUNCHABLE


def test_hosts_behind_one_carrier_nat_need_it_to_hairpin() -> None:
    carrier = device("port_restricted", "198.18.1.1")
    no_hairpin = device("port_restricted", "198.18.1.2", hairpinning=False)
    first, second = device("full_cone", "198.18.0.1"), device("port_restricted", "198.18.0.2")
    assert classify_pair((first, carrier), (second, carrier)) is PairClass.PUNCHABLE
    assert classify_pair((first, no_hairpin), (second, no_hairpin)) is PairClass.RELAY_ONLY


def test_nat_chain_follows_nesting_in_a_placed_scenario() -> None:
    scenario = sim.load_scenario({
        "duration": 5, "settle": None, "core": "node", "nodes": {"count": 12, "seeds": 2},
        "nat": {"fraction": 0.8, "hosts_per_nat": 1, "cgnat": 1.0,
                "mix": {"symmetric": 1}}})
    plan = sim.Simulation(scenario).nats
    for host, inner in plan.front_of.items():
        chain = nat_chain(plan, host)
        assert chain[0] is inner and len(chain) == 2
        assert chain[1].name.startswith("cgnat:") and inner.public_ip in chain[1].inside
    assert nat_chain(plan, "n0") == ()


def test_nat_mixed_30_connects_every_pair_and_punches_every_punchable_one() -> None:
    """Issue 6's targets on the small mixed-NAT scenario: every live pair connected, every
    pair the classifier calls direct or punchable connected without a relay, no live member
    declared dead, and port prediction from fresh side-port observations punching most pairs
    behind a sequential per-destination NAT and an endpoint-independent one: at most 24 of
    the 112 stay relayed (18 measured, 48 without side ports), all behind a random-port NAT
    inside a carrier-grade NAT whose counter every host of the region moves, most of them
    toward the node that restarts at 85 s (its punches wait ``fresh_quiet`` past the end)."""
    simulation = sim.Simulation(sim.load_scenario(ROOT / "scenarios" / "nat-mixed-30.yaml"))
    for _ in simulation.steps():
        pass
    summary = simulation.finish(0.0, 0.0).summary
    assert summary["pairs_unreachable"] == 0
    assert summary["pairs_total"] == summary["pairs_direct"] + summary["pairs_punched"] + \
        summary["pairs_relayed"]
    assert summary["pairs_punchable_but_relayed"] == 0, summary["punchable_but_relayed_examples"]
    assert summary["pairs_by_class"]["punchable"] > 0
    assert summary["pairs_by_class"]["prediction"] == 112
    assert summary["pairs_prediction_but_relayed"] <= 24
    assert summary["false_positive_deaths"] == 0
    observed = sum(host.core.node.traversal.counters["fresh_observations"]
                   for host in simulation.hosts.values()
                   if isinstance(host.core, NodeCore))
    assert observed > 0
