"""Simulator benchmark: speed, memory and protocol quality of a 1000-node mesh.

    python bench/bench_sim.py                      # scenarios/bench-1000.yaml as shipped
    python bench/bench_sim.py --nodes 200 --duration 60 --workers 1 --profile

Runs 1000 nodes for 300 simulated seconds (1 s protocol period, 1% loss: a mass join, then
1% of the nodes crash at t=200 s) and prints the wall time, the speed factor (simulated
seconds per wall second; target ≥ 5) with the hosts split over one worker process per CPU
(``--workers``; the trace hash is the same for any count), the peak RSS of all workers
together (target < 2 GiB), when the mesh first
converged after the mass join, and the detection latency of the crashes next to the SWIM
paper's expectation of e/(e−1) protocol periods until a crashed member is first probed.
Next to the speed it prints a baseline timed in the same process before and after the run:
a fixed pure-Python and crypto workload (``calibration_workload``), and the speed factor
scaled by how much slower that workload ran than on the idle machine (the faster of the two
samples, so a burst of other load during one sample does not inflate it), so a number taken
on a busy machine can still be compared. ``--profile`` adds the top of a cProfile by internal
time (of worker 0 only). The code runs mypyc-compiled (``sim.compiled``; built once per
source change, the same trace hash) unless ``--interpreted``. A benchmark, not a test: it
reports misses but always exits 0 once it has run (3 if the compiled build failed).
"""

from __future__ import annotations

import argparse
import cProfile
import heapq
import io
import os
import pstats
import struct
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

ROOT = Path(__file__).resolve().parent.parent
# In a re-executed compiled run the compiled tree comes first (sim.compiled.TREE_ENV).
sys.path.insert(0, os.environ.get("MESHGUARD_COMPILED_TREE", str(ROOT)))

import sim  # noqa: E402
from sim import compiled  # noqa: E402

SPEED_TARGET = 5.0
RSS_TARGET_GIB = 2.0
CALIBRATION_REFERENCE_SECONDS = 0.27
"""The calibration workload's time on this 2-core machine with a core to itself (the lowest
measured, 2026-11-25; docs/simulator.md); a run's speed factor is scaled by calibration /
reference."""


def scenario_data(path: Path, nodes: int | None, duration: float | None) -> dict[str, Any]:
    """The benchmark scenario, optionally shrunk; the crash keeps its place (2/3 of the run)."""
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    if nodes is not None:
        data["nodes"]["count"] = nodes
        data["name"] = f"{data['name']}-n{nodes}"
    if duration is not None:
        for event in data.get("events", []):
            event["at"] = event["at"] * duration / data["duration"]
        data["duration"] = duration
    return data


def calibration_workload() -> None:
    """A fixed piece of work shaped like the simulator's: dict, tuple, struct and heap
    operations in pure Python, ChaCha20-Poly1305 over 1 KiB and X25519 exchanges. It uses no
    project code, so optimising the simulator does not change it."""
    table: dict[bytes, tuple[int, float]] = {}
    queue: list[tuple[float, int, bytes]] = []
    pack = struct.Struct("<cdI").pack
    for index in range(200_000):
        key = pack(b"D", index * 0.5, index % 977)
        table[key] = (index, index * 0.25)
        heapq.heappush(queue, (index * 0.37 % 101.0, index, key))
        if len(queue) > 1000:
            _, _, popped = heapq.heappop(queue)
            table.pop(popped, None)
    cipher = ChaCha20Poly1305(bytes(range(32)))
    payload = bytes(1024)
    for _ in range(10_000):
        cipher.decrypt(bytes(12), cipher.encrypt(bytes(12), payload, None), None)
    private = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    public = X25519PrivateKey.from_private_bytes(bytes(range(1, 33))).public_key()
    for _ in range(3000):
        private.exchange(public)


def calibration_seconds() -> float:
    """Wall seconds of ``calibration_workload``: the best of three, so one preemption does
    not count, while a machine that is busy throughout still shows."""
    times = []
    for _ in range(3):
        started = time.perf_counter()
        calibration_workload()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "bench-1000.yaml")
    parser.add_argument("--nodes", type=int, help="override the node count")
    parser.add_argument("--duration", type=float, help="override the simulated seconds")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="worker processes (default: one per usable CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top of a cProfile of worker 0 (compiled functions "
                             "do not show in it: add --interpreted)")
    parser.add_argument("--out", type=Path, help="also write the run's results here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compiled", dest="compiled", action="store_true", default=True,
                      help="run mypyc-compiled code, built once per source change into "
                           ".build/mypyc/ (the default; same trace hash as interpreted)")
    mode.add_argument("--interpreted", dest="compiled", action="store_false",
                      help="run the sources as they are")
    args = parser.parse_args()
    if args.compiled:
        problem = compiled.enter_tree([str(Path(__file__).resolve()), *sys.argv[1:]])
        if problem is not None:
            print(problem, file=sys.stderr)
            return 3

    scenario = sim.load_scenario(scenario_data(args.scenario, args.nodes, args.duration))
    calibration_before = calibration_seconds()
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    result = sim.run(scenario, seed=args.seed, out_dir=args.out, progress=True,
                     workers=args.workers)
    if profiler is not None:
        profiler.disable()
    calibration_after = calibration_seconds()
    summary = result.summary
    rss = sum(summary["peak_rss_mib_per_worker"]) / 1024
    speed = summary["speed_factor"]
    period = summary["protocol_period"]
    expected = sim.EXPECTED_FIRST_DETECTION_PERIODS

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(f"scenario            {summary['scenario']}: {summary['nodes']} nodes, "
          f"{summary['sim_seconds']:g} simulated s, seed {summary['seed']}, "
          f"{summary['workers']} worker(s)")
    print(f"code                {compiled.mode()}")
    print(f"wall seconds        {summary['wall_seconds']:.1f}")
    print(f"speed factor        {speed:.2f}x real time (target >= {SPEED_TARGET:g}x: "
          f"{verdict(speed >= SPEED_TARGET)})")
    calibration = min(calibration_before, calibration_after)  # a burst hits one, not both
    slowdown = calibration / CALIBRATION_REFERENCE_SECONDS
    print(f"baseline            calibration workload {calibration_before:.3f} s before, "
          f"{calibration_after:.3f} s after the run ({slowdown:.2f}x its "
          f"{CALIBRATION_REFERENCE_SECONDS:.3f} s on the idle machine)")
    print(f"speed vs baseline   the run took {summary['wall_seconds'] / calibration:.1f} "
          f"calibration workloads; speed factor scaled to the idle machine "
          f"{speed * slowdown:.2f}x")
    cpu = summary["cpu_seconds"]
    per_worker = ", ".join(f"{seconds:.1f}" for seconds in summary["cpu_seconds_per_worker"])
    print(f"CPU seconds         {cpu:.1f} in all ({per_worker} per worker; "
          f"{summary['sim_seconds'] / cpu:.2f}x real time per CPU second)")
    per_worker = ", ".join(f"{mib / 1024:.2f}" for mib in summary["peak_rss_mib_per_worker"])
    print(f"peak RSS            {rss:.2f} GiB in all ({per_worker} per worker; target < "
          f"{RSS_TARGET_GIB:g} GiB: {verdict(rss < RSS_TARGET_GIB)})")
    join_end = scenario.nodes.join_at + scenario.nodes.join_spread
    converged = summary["converged_at"]
    if converged is None:
        print("converged_at        never (the mesh did not converge after the mass join)")
    else:
        print(f"converged_at        {converged:.2f} s ({converged - join_end:.2f} s after the "
              f"last node started at {join_end:g} s)")
    print(f"messages            {summary['messages_per_node_per_s']:.2f} per node per s, "
          f"{summary['bytes_per_node_per_s']:.0f} bytes per node per s")
    detection = summary["detection_latency_summary"]
    for key, label in (("first_suspicion", "first suspicion"),
                       ("first_death", "first declared dead"),
                       ("full_dissemination", "every node knows")):
        stats = detection[key]
        if stats is None:
            print(f"{label:<20}none measured")
            continue
        print(f"{label:<20}mean {stats['mean']:.2f} s = {stats['mean'] / period:.2f} periods, "
              f"median {stats['median']:.2f} s, max {stats['max']:.2f} s "
              f"({stats['count']} crashes)")
    print(f"SWIM expectation    first probe of a crashed member after e/(e-1) = {expected:.2f} "
          f"periods = {expected * period:.2f} s (suspicion follows after the probe timeout "
          "and the indirect probes)")
    print(f"false positives     {summary['false_positive_suspicions']} suspicions, "
          f"{summary['false_positive_deaths']} deaths")
    print(f"trace               {summary['trace_hash']}")
    for violation in result.violations:
        print(f"INVARIANT VIOLATED: {violation}")
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
