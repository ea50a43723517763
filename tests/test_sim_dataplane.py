"""The composed Node in the simulator: IP packets cross on-demand WireGuard tunnels between
simulated hosts, and the summary says how many arrived."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

import sim
from sim.traffic import TrafficLedger, ipv4_udp_packet, sequence_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataplane() -> sim.Result:
    return sim.run(sim.load_scenario(ROOT / "scenarios" / "dataplane-10.yaml"))


def test_every_live_pair_that_sends_traffic_gets_it_through(dataplane: sim.Result) -> None:
    summary = dataplane.summary
    assert dataplane.ok, dataplane.violations
    assert summary["traffic_eligible"] > 300
    assert summary["traffic_delivery_ratio"] == 1.0
    assert summary["traffic_pairs_reached"] == summary["traffic_pairs"] > 40
    assert summary["traffic_pairs_failing"] == []
    assert summary["traffic_misdelivered"] == 0
    assert 0 < summary["traffic_median_latency"] < 0.1
    # Tunnels were set up by real WireGuard handshakes, and torn down for the crashed node.
    assert summary["node_events"]["HandshakeCompleted"] > 0
    assert summary["node_events"]["PeerRemoved"] > 0


def test_dataplane_run_is_deterministic(dataplane: sim.Result) -> None:
    again = sim.run(sim.load_scenario(ROOT / "scenarios" / "dataplane-10.yaml"))
    assert again.trace_hash == dataplane.trace_hash
    assert again.summary["traffic_delivered"] == dataplane.summary["traffic_delivered"]


def test_traffic_goes_only_to_live_nodes_and_arrives() -> None:
    scenario = sim.load_scenario({
        "duration": 60, "settle": None, "core": "node",
        "traffic": {"interval": 1, "start": 10},
        "nodes": {"count": 4}, "protocol": {"profile": "lan"},
        "events": [{"at": 30, "crash": {"nodes": ["n3"]}}]})
    simulation = sim.Simulation(scenario)
    for _ in simulation.steps():
        pass
    ledger = simulation.traffic
    assert ledger is not None
    assert all(record.src != "n3" and record.dst != "n3"
               for record in ledger.sent if record.at >= 30)
    before = [record for record in ledger.sent if record.dst == "n3" and 15 <= record.at < 30]
    assert before and all(record.delivered_at is not None for record in before)


def test_packets_carry_their_sequence_and_a_valid_header() -> None:
    ledger = TrafficLedger(payload=40)
    src, dst = ipaddress.IPv4Address("10.99.0.1"), ipaddress.IPv4Address("10.99.0.2")
    first = ledger.packet("a", "b", src, dst, 1.0)
    second = ledger.packet("b", "a", dst, src, 2.0)
    assert len(first) == 28 + 40 and first[12:16] == src.packed and first[16:20] == dst.packed
    header_sum = sum(int.from_bytes(first[i:i + 2], "big") for i in range(0, 20, 2))
    assert (header_sum & 0xFFFF) + (header_sum >> 16) == 0xFFFF
    assert (sequence_of(first), sequence_of(second)) == (0, 1)
    assert sequence_of(ipv4_udp_packet(src, dst, b"other traffic")) is None
    ledger.received("a", [first], 3.0)  # wrong host: counted, not delivered
    ledger.received("b", [first, first], 4.0)
    assert ledger.misdelivered == 1 and ledger.sent[0].delivered_at == 4.0
    summary = ledger.summary(ledger.sent)
    assert summary["traffic_delivery_ratio"] == 0.5
    assert summary["traffic_pairs_failing"] == ["b->a"]


@pytest.mark.parametrize(("patch", "message"), [
    ({"traffic": {"interval": 1}}, "traffic: needs core: node"),
    ({"core": "swim"}, "core: must be membership or node"),
    ({"core": "node", "traffic": {"payload": 5}}, "traffic.payload: must be a payload size"),
    ({"core": "node", "traffic": {"every": 5}}, "traffic.every: unknown field"),
])
def test_bad_traffic_settings_are_one_line_errors(patch: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(sim.ScenarioError) as caught:
        sim.load_scenario({"duration": 10, "nodes": {"count": 2}, **patch})
    assert message in str(caught.value)


def test_mixed_nat_mesh_reaches_full_connectivity() -> None:
    result = sim.run(sim.load_scenario(ROOT / "scenarios" / "nat-mixed-30.yaml"))
    summary = result.summary
    assert result.ok, result.violations
    assert summary["pairs_total"] == 30 * 29  # ordered pairs of live nodes
    assert summary["pairs_unreachable"] == summary["pairs_connecting"] == 0
    assert summary["pairs_none"] == 0
    # NAT'd pairs needed every technique: some punched, the symmetric ones relayed.
    assert summary["pairs_punched"] > 0 and summary["pairs_relayed"] > 0
    assert summary["time_to_full_connectivity"] is not None
    assert summary["time_to_full_connectivity"] < 60
    assert sum(summary["nat_hosts"].values()) == 18  # 60% of 30, never a seed
    assert any(kind.startswith("cgnat+") for kind in summary["nat_hosts"])
    assert summary["nat_counters"]["filtered"] > 0
    assert summary["traffic_delivery_ratio"] == 1.0 and summary["traffic_eligible"] > 500
