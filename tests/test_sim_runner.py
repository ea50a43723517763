"""The simulator's runner, metrics and determinism, driving a small toy core.

The toy core is a heartbeat membership (everyone tells everyone it knows, peers silent for
``TIMEOUT`` seconds are declared dead). It is simple enough to reason about exactly, so these
tests check the simulator itself: wake-ups, crashes, restarts, partitions, the view
tracking, the invariants and the trace hash. The real SWIM core is exercised in
tests/test_sim_scenarios.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

import sim
from meshguard.sansio.types import Address
from sim.cores import HostContext

PERIOD = 1.0
TIMEOUT = 3.5


@dataclass(frozen=True, slots=True)
class ToyJoined:
    public_key: bytes


@dataclass(frozen=True, slots=True)
class ToyDead:
    public_key: bytes


@dataclass(frozen=True, slots=True)
class ToyView:
    public_key: bytes
    incarnation: int
    state: str


class HeartbeatCore:
    """Every period, tell every known peer about every known peer."""

    def __init__(self, host: HostContext) -> None:
        self.key = host.identity.public_key
        self.address = host.address
        self.rng = host.rng
        self.peers: dict[bytes, tuple[Address, float]] = {}
        self.outbox: list[tuple[bytes, Address]] = []
        self.pending_events: list[object] = []
        self.next_beat = host.now + PERIOD * host.rng.random()
        self.left = False

    def _encode(self) -> bytes:
        entries = [(self.key, self.address)] + [(key, address) for key, (address, _) in
                                                 self.peers.items()]
        return b"|".join(key.hex().encode() + b"@" + f"{a[0]}:{a[1]}".encode()
                         for key, a in entries)

    def join(self, seeds: Sequence[Address], now: float, *,
             seed_keys: Sequence[bytes] = ()) -> None:
        message = self._encode()
        self.outbox.extend((message, seed) for seed in seeds)

    def leave(self, now: float) -> None:
        self.left = True

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if self.left:
            return
        for index, entry in enumerate(data.split(b"|")):
            key_hex, _, where = entry.partition(b"@")
            key = bytes.fromhex(key_hex.decode())
            host, _, port = where.decode().rpartition(":")
            if key == self.key:
                continue
            heard = now if index == 0 else self.peers.get(key, ((host, int(port)), now))[1]
            if key not in self.peers:
                self.pending_events.append(ToyJoined(key))
            self.peers[key] = ((host, int(port)), heard)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out, self.outbox = self.outbox, []
        return out

    def events(self) -> list[object]:
        out, self.pending_events = self.pending_events, []
        return out

    def next_deadline(self) -> float | None:
        return None if self.left else self.next_beat

    def on_timer(self, now: float) -> None:
        if now < self.next_beat:
            return
        self.next_beat = now + PERIOD
        for key, (_, heard) in list(self.peers.items()):
            if now - heard > TIMEOUT:
                del self.peers[key]
                self.pending_events.append(ToyDead(key))
        message = self._encode()
        self.outbox.extend((message, address) for address, _ in self.peers.values())

    def member(self, public_key: bytes) -> ToyView | None:
        return ToyView(public_key, 0, "ALIVE") if public_key in self.peers else None

    def members(self) -> list[ToyView]:
        return [ToyView(key, 0, "ALIVE") for key in self.peers]


# The tracker reads event kinds by class name; the toy's map onto the SWIM names.
ToyJoined.__name__ = "MemberJoined"
ToyDead.__name__ = "MemberDead"


def toy_scenario(**overrides: Any) -> sim.Scenario:
    data: dict[str, Any] = {
        "name": "toy",
        "seed": 3,
        "duration": 40,
        "settle": 15,
        "nodes": {"groups": [{"name": "eu", "count": 4}, {"name": "us", "count": 4}],
                  "seeds": 1, "join_spread": 2},
        "network": {"access": {"latency": {"dist": "uniform", "min": 0.001, "max": 0.003}},
                    "inter": {"latency": {"dist": "lognormal", "min": 0.02, "mean": 0.03}}},
    }
    data.update(overrides)
    return sim.load_scenario(data)


def run_toy(scenario: sim.Scenario, seed: int | None = None) -> sim.Result:
    return sim.run(scenario, seed=seed, core_factory=HeartbeatCore)


def test_mesh_converges_and_views_match_cores() -> None:
    result = run_toy(toy_scenario())
    assert result.ok, result.violations
    summary = result.summary
    # Seed first at t=0, others within 2 s; one heartbeat spreads the full list.
    assert summary["converged_at"] is not None
    assert 0 < summary["converged_at"] < 2 + 3 * PERIOD
    assert summary["converged_at_end"] is True
    assert summary["false_positive_deaths"] == 0
    assert summary["messages_per_node_per_s"] > 0
    sizes = {node: known for moment, node, known in result.series.views if moment == 40}
    assert sizes == {name: 7 for name in sizes} and len(sizes) == 8


def test_crash_is_detected_and_restart_rejoins() -> None:
    scenario = toy_scenario(
        events=[{"at": 10, "crash": {"nodes": ["us-2"], "restart_after": 12}}])
    result = run_toy(scenario)
    assert result.ok, result.violations
    (crash,) = result.summary["detection_latency"]
    assert crash["node"] == "us-2" and crash["known_by"] == 7
    # Last heard up to one period before the crash; declared dead at the first heartbeat
    # of each of the 7 others after TIMEOUT of silence.
    assert TIMEOUT - PERIOD < crash["first_death"] <= crash["full_dissemination"]
    assert crash["full_dissemination"] <= TIMEOUT + PERIOD + 0.1
    assert crash["restarted_before_detection"] is False
    # After the restart at 22 s, it rejoins through the seed and everyone knows it again.
    assert result.summary["final_convergence_at"] is not None
    assert 22 <= result.summary["final_convergence_at"] < 22 + 3 * PERIOD


def test_partition_splits_views_and_heal_merges_them() -> None:
    scenario = toy_scenario(duration=60, events=[
        {"at": 10, "partition": {"name": "atlantic", "a": ["eu"], "b": ["us"]}},
        {"at": 30, "heal": "atlantic"},
    ])
    result = run_toy(scenario)
    at_25 = {node: known for moment, node, known in result.series.views if moment == 25}
    # Each side forgot the other (TIMEOUT) and still knows its own 3 peers.
    assert at_25 == {name: 3 for name in at_25} and len(at_25) == 8
    # The toy cannot heal (nobody remembers the other side), so the settle check fails and
    # names the command that reproduces it.
    assert not result.ok
    assert "every live node knows every live member" in str(result.violations[0])
    assert result.reproduce_command() == "python -m sim scenario --seed 3"


def test_one_way_partition_blocks_one_direction_only() -> None:
    scenario = toy_scenario(duration=20, settle=None, events=[
        {"at": 5, "partition": {"a": ["eu-1"], "b": ["eu-2"], "one_way": True}}])
    result = run_toy(scenario)
    # eu-2 stops hearing eu-1 directly and declares it dead (a false positive: eu-1 is
    # alive); the direction itself is checked exactly in test_sim_network.py.
    assert result.summary["false_positive_deaths"] >= 1
    assert result.summary["network"]["partitioned"] > 0


def test_leave_and_join_events() -> None:
    scenario = toy_scenario(duration=30, events=[
        {"at": 5, "join": {"count": 2, "group": "us"}},
        {"at": 10, "leave": {"nodes": ["eu-3"]}},
    ])
    result = run_toy(scenario)
    assert result.ok, result.violations
    assert result.summary["nodes"] == 10 and result.summary["live_nodes_at_end"] == 9
    at_30 = {node: known for moment, node, known in result.series.views if moment == 30}
    assert set(at_30) == {f"eu-{i}" for i in range(3)} | {f"us-{i}" for i in range(6)}
    assert set(at_30.values()) == {8}


def test_random_picks_are_seeded_and_skip_seed_nodes() -> None:
    scenario = toy_scenario(duration=20, settle=None,
                            events=[{"at": 5, "crash": {"fraction": 0.5}}])
    first = run_toy(scenario)
    crashed = [crash["node"] for crash in first.summary["detection_latency"]]
    assert len(crashed) == 4 and "eu-0" not in crashed
    again = [crash["node"] for crash in run_toy(scenario).summary["detection_latency"]]
    assert again == crashed


def test_same_seed_same_trace_and_different_seed_differs() -> None:
    scenario = toy_scenario()
    first = run_toy(scenario)
    second = run_toy(scenario)
    assert first.trace_hash == second.trace_hash
    assert first.summary["network"] == second.summary["network"]
    assert run_toy(scenario, seed=4).trace_hash != first.trace_hash


def test_outputs_are_written(tmp_path: Any) -> None:
    result = sim.run(toy_scenario(), out_dir=tmp_path, plot=True, core_factory=HeartbeatCore)
    import json

    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("seed", "trace_hash", "nodes", "sim_seconds", "wall_seconds", "converged_at",
                "detection_latency", "false_positive_suspicions", "false_positive_deaths",
                "messages_per_node_per_s", "bytes_per_node_per_s"):
        assert key in summary
    assert summary["trace_hash"] == result.trace_hash
    views = (tmp_path / "views.csv").read_text().splitlines()
    assert views[0] == "time,node,known_members" and len(views) > 8 * 30
    messages = (tmp_path / "messages.csv").read_text().splitlines()
    assert messages[0].startswith("time,live_nodes,converged") and len(messages) == 41
    for name in ("convergence.png", "detection.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("seed", [1, 2])
def test_wakeups_follow_deadlines(seed: int) -> None:
    """Each heartbeat fires once per period: sent count matches the arithmetic."""
    scenario = toy_scenario(duration=10.5, settle=None, nodes={"count": 3, "seeds": 3},
                            network={"access": {"latency": 0.001}})
    result = run_toy(scenario, seed=seed)
    # 3 nodes; initial join datagrams to the 2 other seeds each; then 10 beats to 2 peers.
    sent = result.summary["network"]["sent"]
    assert 3 * 2 + 3 * 10 * 2 <= sent <= 3 * 2 + 3 * 11 * 2
