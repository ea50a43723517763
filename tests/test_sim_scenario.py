"""Scenario validation: every shipped scenario loads, and every mistake gets one line naming
the field, exit status 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import sim
from sim.scenario import Crash, Join, Partition, parse_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))


def base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"duration": 60, "nodes": {"count": 5}}
    data.update(overrides)
    return data


def error_of(data: object) -> str:
    with pytest.raises(sim.ScenarioError) as caught:
        parse_scenario(data)
    return str(caught.value)


@pytest.mark.parametrize("path", SCENARIOS, ids=[path.name for path in SCENARIOS])
def test_every_shipped_scenario_validates(path: Path) -> None:
    scenario = sim.load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.size in ("small", "large")


def test_the_required_scenarios_are_shipped() -> None:
    names = {path.stem for path in SCENARIOS}
    assert {"smoke-5", "churn-100", "loss-500", "partition-heal", "bench-1000"} <= names


def test_defaults_and_names() -> None:
    scenario = sim.load_scenario(base(nodes={"groups": [{"name": "eu", "count": 2},
                                                        {"name": "us", "count": 1}]},
                                      events=[{"at": 5, "join": {"count": 2, "group": "eu"}},
                                              {"at": 9, "crash": {"nodes": ["eu-3"]}}]))
    assert scenario.seed == 1 and scenario.nodes.port == 51821 and scenario.size == "small"
    join, crash = (event.action for event in scenario.events)
    assert isinstance(join, Join) and join.names == ("eu-2", "eu-3")
    assert isinstance(crash, Crash) and crash.select.nodes == ("eu-3",)


def test_events_are_sorted_by_time_and_partitions_named() -> None:
    scenario = sim.load_scenario(base(events=[
        {"at": 20, "heal": "cut"},
        {"at": 10, "partition": {"name": "cut", "a": ["n0"], "b": ["n1", "n2"],
                                 "one_way": True}}]))
    first = scenario.events[0].action
    assert isinstance(first, Partition) and first.one_way and first.b == ("n1", "n2")
    assert scenario.last_event_at == 20


@pytest.mark.parametrize(("data", "message"), [
    (base(nodes={"count": -3}), "nodes.count: must be a positive integer, got -3"),
    (base(nodes={"count": 5, "colour": "red"}), "nodes.colour: unknown field"),
    (base(extra=1), "extra: unknown field"),
    ({"nodes": {"count": 5}}, "duration: must be a duration in seconds > 0, got None"),
    (base(duration="long"), "duration: must be a duration in seconds > 0, got 'long'"),
    (base(nodes={"count": 5, "seeds": 9}), "nodes.seeds: must be at most the node count (5)"),
    (base(nodes={"count": 2, "groups": []}), "nodes: give exactly one of count or groups"),
    (base(network={"access": {"loss": 1.0}}),
     "network.access.loss: must be a probability in [0, 1), got 1.0"),
    (base(network={"access": {"latency": {"dist": "pareto"}}}),
     "network.access.latency.dist: must be one of constant, uniform, lognormal"),
    (base(network={"access": {"latency": {"dist": "lognormal", "min": 0.01, "mean": 0.005}}}),
     "network.access.latency.mean: must be a delay in seconds > min (0.01)"),
    (base(events=[{"at": 70, "crash": {"count": 1}}]),
     "events[0].at: must be before the end of the run (60.0), got 70"),
    (base(events=[{"at": 5, "crash": {"nodes": ["n9"]}}]),
     "events[0].crash.nodes[0]: unknown node 'n9'"),
    (base(events=[{"at": 5, "crash": {"count": 1}, "leave": {"count": 1}}]),
     "events[0]: give exactly one action of"),
    (base(events=[{"at": 5, "explode": {}}]), "events[0].explode: unknown field"),
    (base(events=[{"at": 5, "heal": "nothing"}]),
     "events[0].heal: no earlier partition named 'nothing'"),
    (base(events=[{"at": 5, "partition": {"a": ["mars"], "b": ["n1"]}}]),
     "events[0].partition.a[0]: not a group or node: 'mars'"),
    (base(events=[{"at": 5, "crash": {"fraction": 1.5}}]),
     "events[0].crash.fraction: must be a fraction in (0, 1], got 1.5"),
    (base(protocol={"protocol_period": 0.1}),
     "protocol: SwimConfig.probe_timeout must be shorter than protocol_period"),
    (base(protocol={"periodd": 1}), "protocol.periodd: unknown field"),
    (base(protocol={"profile": "space"}), "protocol.profile: must be wan or lan"),
    ([1, 2], "(top level): must be a mapping"),
    (base(nodes={"count": 5, "address_pool": "10.0.0.0/30"}),
     "nodes.address_pool: 10.0.0.0/30 has room for 2 hosts, the scenario starts 5"),
    (base(nodes={"count": 5, "address_pool": "banana"}),
     "nodes.address_pool: must be an IPv4 network like 100.64.0.0/10, got 'banana'"),
])
def test_errors_name_the_field(data: object, message: str) -> None:
    assert error_of(data).startswith(f"scenario: {message}")


def test_command_line_reports_a_bad_scenario_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(base(nodes={"count": -3})))
    done = subprocess.run([sys.executable, "-m", "sim", str(path), "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == f"{path}: nodes.count: must be a positive integer, got -3\n"
    assert done.stdout == ""


def test_command_line_reports_unreadable_and_malformed_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("nodes: [1, 2\n")
    for path, problem in ((tmp_path / "missing.yaml", "cannot read"),
                          (broken, "invalid YAML")):
        done = subprocess.run([sys.executable, "-m", "sim", str(path), "--quiet"], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stderr.startswith(f"{path}: ") and problem in done.stderr
        assert len(done.stderr.splitlines()) == 1
