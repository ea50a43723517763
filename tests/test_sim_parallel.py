"""Parallel runs (``sim.parallel``): hosts split across processes give the same run.

A split run is correct only if it is the *same* run: the same trace hash, summary, time
series and invariant verdicts as one process, for every kind of scheduled event. These tests
run the real SWIM core on a small mesh with every event kind, with one, two and three
workers.
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import simpy

import sim
from meshguard.sansio.types import Address
from sim.cores import HostContext, membership_core
from sim.metrics import Trace
from sim.network import Network, build_underlay
from sim.parallel import lookahead, next_event_time, parallel_problem

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"wall_seconds", "speed_factor", "cpu_seconds", "cpu_seconds_per_worker",
          "peak_rss_mib_per_worker", "workers"}


def every_event_scenario(**overrides: Any) -> sim.Scenario:
    data: dict[str, Any] = {
        "name": "every-event",
        "seed": 5,
        "duration": 70,
        "settle": 25,
        "sample_interval": 2,
        "nodes": {"groups": [{"name": "eu", "count": 7}, {"name": "us", "count": 6}],
                  "seeds": 2, "join_spread": 4},
        "network": {"access": {"latency": {"dist": "lognormal", "min": 0.002, "mean": 0.006},
                               "loss": 0.01},
                    "inter": {"latency": {"dist": "uniform", "min": 0.03, "max": 0.05}}},
        "events": [
            {"at": 12, "crash": {"count": 2, "restart_after": 9}},
            {"at": 15, "partition": {"name": "sea", "a": ["eu"], "b": ["us"],
                                     "one_way": True}},
            {"at": 19, "heal": "sea"},
            {"at": 22, "loss": {"loss": 0.05, "between": ["eu", "us"]}},
            {"at": 26, "leave": {"count": 1, "group": "us"}},
            {"at": 28, "join": {"count": 2, "group": "eu"}},
            {"at": 32, "loss": {"loss": 0.0}},
            {"at": 34, "crash": "eu-3"},
            {"at": 38, "restart": "eu-3"},
        ],
    }
    data.update(overrides)
    return sim.load_scenario(data)


def comparable(result: sim.Result) -> dict[str, Any]:
    return {key: value for key, value in result.summary.items() if key not in TIMING}


def test_two_and_three_workers_give_the_same_run_as_one() -> None:
    scenario = every_event_scenario()
    alone = sim.run(scenario)
    assert alone.summary["workers"] == 1
    assert alone.summary["membership_events"]["MemberLeft"] > 0
    assert alone.summary["network"]["partitioned"] > 0
    assert alone.summary["converged_at"] is not None
    for workers in (2, 3):
        split = sim.run(scenario, workers=workers)
        assert split.summary["workers"] == workers
        assert len(split.summary["cpu_seconds_per_worker"]) == workers
        assert comparable(split) == comparable(alone)
        assert split.series == alone.series
        assert [str(v) for v in split.violations] == [str(v) for v in alone.violations]
    assert multiprocessing.active_children() == []


def test_a_different_seed_still_gives_a_different_trace_when_split() -> None:
    scenario = every_event_scenario(duration=20, events=[])
    first = sim.run(scenario, workers=2)
    second = sim.run(scenario, seed=6, workers=2)
    assert first.trace_hash != second.trace_hash


def test_a_failing_worker_is_reported_and_every_process_ends() -> None:
    broken_host = "eu-0"  # a seed (live at once), host 0: worker (2 - 1 - 0) % 2 = 1

    def factory(context: HostContext) -> Any:
        if context.name == broken_host and context.now > 3:
            raise ValueError("core exploded on purpose")
        return membership_core(context)

    scenario = every_event_scenario(duration=20, events=[
        {"at": 2, "crash": broken_host}, {"at": 4, "restart": broken_host}])
    with pytest.raises(RuntimeError, match=r"(?s)worker 1 failed.*core exploded on purpose"):
        sim.run(scenario, workers=2, core_factory=factory)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("scenario_file, problem", [
    ("nat-mixed-30.yaml", "membership cores only"),
    ("dataplane-10.yaml", "membership cores only"),
])
def test_scenarios_that_cannot_be_split_are_refused(scenario_file: str, problem: str) -> None:
    scenario = sim.load_scenario(ROOT / "scenarios" / scenario_file)
    with pytest.raises(sim.ScenarioError, match=problem):
        sim.run(scenario, workers=2)


def test_a_network_without_a_minimum_latency_has_no_lookahead() -> None:
    scenario = every_event_scenario(network={"access": {"latency": {"dist": "uniform",
                                                                    "min": 0, "max": 0.01}}})
    assert lookahead(scenario) == 0
    problem = parallel_problem(scenario)
    assert problem is not None and "latency.min above 0" in problem
    assert parallel_problem(every_event_scenario()) is None
    assert lookahead(every_event_scenario()) == pytest.approx(0.004)


def test_cli_splits_a_run_and_refuses_a_bad_worker_count(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "sim", str(ROOT / "scenarios" / "smoke-5.yaml"),
               "--quiet", "--out", str(tmp_path)]
    split = subprocess.run([*command, "--workers", "2"], capture_output=True, text=True,
                           cwd=ROOT, timeout=300, check=False)
    alone = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                           check=False)
    assert split.returncode == alone.returncode == 0, split.stderr + alone.stderr
    trace_line = [line for line in alone.stdout.splitlines() if "trace" in line]
    assert trace_line and trace_line[0] in split.stdout.splitlines()
    for bad, message in (("0", "must be an integer >= 1"),
                         ("two", "must be an integer >= 1")):
        refused = subprocess.run([*command, "--workers", bad], capture_output=True, text=True,
                                 cwd=ROOT, timeout=60, check=False)
        assert refused.returncode == 2 and message in refused.stderr
    nat = subprocess.run([sys.executable, "-m", "sim",
                          str(ROOT / "scenarios" / "nat-mixed-30.yaml"), "--workers", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert nat.returncode == 2
    assert nat.stderr.count("\n") == 1 and "--workers" in nat.stderr
    assert "Traceback" not in nat.stderr


def test_a_datagram_handed_over_for_the_past_is_refused() -> None:
    scenario = every_event_scenario()
    env = simpy.Environment()
    graph = build_underlay(scenario, [("eu-0", "eu"), ("us-0", "us")])
    network = Network(env, graph, sim.runner.stream(1, "network"))
    env.run(until=1.0)
    source: Address = ("100.64.0.1", 51820)
    destination: Address = ("100.64.0.2", 51820)
    with pytest.raises(RuntimeError, match="lookahead"):
        network.hand_in([(0.5, source, destination, b"late")])
    network.hand_in([(1.25, source, destination, b"on time")])
    assert next_event_time(env) == 1.25


def test_a_split_network_keeps_datagrams_for_other_workers() -> None:
    scenario = every_event_scenario()
    env = simpy.Environment()
    graph = build_underlay(scenario, [("eu-0", "eu"), ("us-0", "us")])
    network = Network(env, graph, sim.runner.stream(1, "network"))
    a: Address = ("100.64.0.1", 51820)
    b: Address = ("100.64.0.2", 51820)
    network.assign_ip(a[0], "eu-0")
    network.assign_ip(b[0], "us-0")
    network.split({"eu-0": 0, "us-0": 1}, worker=0, workers=2)
    for index in range(50):
        network.send(a, b, bytes([index]))
    outbox = network.take_outbox()
    assert outbox[0] == [] and 40 <= len(outbox[1]) <= 50
    assert all(moment >= lookahead(scenario) for moment, _, _, _ in outbox[1])
    assert [data for _, _, _, data in outbox[1]] == sorted(data for _, _, _, data in outbox[1])
    assert network.take_outbox() == [[], []]
    assert env.peek() == float("inf")


def test_the_trace_hash_is_per_host_and_ignores_interleaving_between_hosts() -> None:
    a: Address = ("100.64.0.1", 51820)
    b: Address = ("100.64.0.2", 51820)
    c: Address = ("100.64.0.3", 51820)

    def digest(order: list[tuple[float, Address, Address, bytes]]) -> str:
        trace = Trace()
        for moment, src, dst, data in order:
            trace.delivery(moment, src, dst, data)
        return trace.hexdigest()

    to_b = [(1.0, a, b, b"x"), (1.5, c, b, b"y")]
    to_c = [(1.2, a, c, b"z")]
    assert digest(to_b + to_c) == digest(to_c + to_b)
    assert digest(to_b + to_c) == digest([to_b[0], to_c[0], to_b[1]])
    assert digest(to_b[::-1] + to_c) != digest(to_b + to_c)
    assert digest([(1.0, a, b, b"x"), (1.5, c, b, b"Y"), *to_c]) != digest(to_b + to_c)
