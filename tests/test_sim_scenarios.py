"""The real SWIM core in the simulator: every small shipped scenario runs fully and holds its
invariants, and a seed reproduces the same trace in this process and in fresh processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sim

ROOT = Path(__file__).resolve().parent.parent
SMALL = sorted(path for path in (ROOT / "scenarios").glob("*.yaml")
               if sim.load_scenario(path).size == "small")


@pytest.fixture(scope="module")
def results() -> dict[str, sim.Result]:
    return {path.stem: sim.run(sim.load_scenario(path)) for path in SMALL}


@pytest.mark.parametrize("path", SMALL, ids=[path.stem for path in SMALL])
def test_small_scenario_runs_and_holds_its_invariants(path: Path,
                                                      results: dict[str, sim.Result]) -> None:
    result = results[path.stem]
    summary = result.summary
    assert result.ok, f"{result.violations} — {result.reproduce_command()}"
    assert summary["converged_at"] is not None
    assert summary["converged_at_end"] is True
    for crash in summary["detection_latency"]:
        if not crash["restarted_before_detection"] and crash["known_by"]:
            assert crash["first_suspicion"] is not None, crash
            assert crash["full_dissemination"] is not None, crash


def test_smoke_detects_its_crash_and_leave(results: dict[str, sim.Result]) -> None:
    summary = results["smoke-5"].summary
    (crash,) = summary["detection_latency"]
    assert crash["node"] == "n3" and crash["known_by"] == 4
    # First probe after ~e/(e-1) periods, then the probe timeout and indirect probes.
    assert 0 < crash["first_suspicion"] < 10
    assert crash["first_suspicion"] < crash["first_death"] <= crash["full_dissemination"] < 30
    assert summary["membership_events"].get("MemberLeft", 0) >= 3
    assert summary["live_nodes_at_end"] == 4
    assert summary["false_positive_deaths"] == 0


def test_churn_restarted_nodes_rejoin(results: dict[str, sim.Result]) -> None:
    summary = results["churn-100"].summary
    assert summary["nodes"] == 108  # 100 initial + 5 + 3 joined
    assert len(summary["detection_latency"]) >= 8
    # All churn ends by 250 s; the mesh is whole again within the settle time.
    assert summary["final_convergence_at"] is not None
    assert summary["final_convergence_at"] <= 250 + 120


def test_partition_heals_into_one_mesh(results: dict[str, sim.Result]) -> None:
    result = results["partition-heal"]
    summary = result.summary
    # During the partition each side declares the other dead ...
    assert summary["false_positive_deaths"] > 0 and summary["network"]["partitioned"] > 0
    at_300 = [known for moment, _, known in result.series.views if moment == 300]
    assert len(at_300) == 60 and max(at_300) < 59
    # ... and after the heal at 360 s push-pull merges the halves.
    assert 360 < summary["final_convergence_at"] < 360 + 120


EVERY_FEATURE = """
duration: 90
nodes: {groups: [{name: a, count: 4}, {name: b, count: 4}], seeds: 2, join_spread: 3}
network:
  access: {latency: {dist: uniform, min: 0.001, max: 0.004}, duplicate: 0.02, reorder: 0.05}
  inter: {latency: {dist: lognormal, min: 0.02, mean: 0.03}, bandwidth: 10000000, loss: 0.01}
events:
  - {at: 10, crash: {fraction: 0.25, restart_after: 20}}
  - {at: 15, join: {count: 2, group: b}}
  - {at: 20, partition: {name: p, a: [a], b: [b-1], one_way: true}}
  - {at: 25, loss: {loss: 0.05, between: [a, b]}}
  - {at: 30, leave: {count: 1, group: a}}
  - {at: 40, heal: p}
"""


def test_every_feature_is_deterministic_across_processes(tmp_path: Path) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(EVERY_FEATURE)
    first = sim.run(sim.load_scenario(path), seed=3)
    assert first.trace_hash == sim.run(sim.load_scenario(path), seed=3).trace_hash
    for run in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "sim", str(path), "--seed", "3", "--quiet",
             "--out", str(tmp_path / f"out{run}")],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": str(run + 7)})
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == f"seed 3  trace {first.trace_hash}"


def test_same_seed_same_hash_in_process_and_in_fresh_processes(tmp_path: Path) -> None:
    scenario = sim.load_scenario(ROOT / "scenarios" / "smoke-5.yaml")
    first = sim.run(scenario, seed=11)
    second = sim.run(scenario, seed=11)
    assert first.trace_hash == second.trace_hash
    assert sim.run(scenario, seed=12).trace_hash != first.trace_hash
    hashes = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        done = subprocess.run(
            [sys.executable, "-m", "sim", "scenarios/smoke-5.yaml", "--seed", "11", "--quiet",
             "--out", str(out), *(["--plot"] if run == 0 else [])],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
            env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": str(run + 100)})
        assert done.returncode == 0, done.stderr
        match = re.search(r"^seed 11  trace ([0-9a-f]{64})$", done.stdout, re.MULTILINE)
        assert match, done.stdout
        hashes.append(match.group(1))
        assert json.loads((out / "summary.json").read_text())["trace_hash"] == match.group(1)
    assert hashes == [first.trace_hash, first.trace_hash]
    assert (tmp_path / "run0" / "convergence.png").exists()
    assert (tmp_path / "run0" / "detection.png").exists()


def test_progress_bar_goes_to_stderr(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sim", "scenarios/smoke-5.yaml", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert "sim s" in done.stderr and "smoke-5" in done.stderr
    assert "sim s" not in done.stdout.splitlines()[-1]


def test_broken_invariant_exits_1_with_the_reproducing_command(tmp_path: Path) -> None:
    path = tmp_path / "split.yaml"
    path.write_text(
        "duration: 120\nsettle: 60\nnodes: {groups: [{name: a, count: 2}, {name: b, count: 2}]}\n"
        "events:\n  - {at: 10, partition: {a: [a], b: [b]}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "sim", str(path), "--seed", "5", "--quiet",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "INVARIANT VIOLATED" in done.stderr
    assert "every live node knows every live member" in done.stderr
    assert done.stderr.splitlines()[-1] == f"reproduce with: python -m sim {path} --seed 5"
