"""PNG charts of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from sim.runner import Result


def write_plots(result: Result, out_dir: Path) -> list[Path]:
    """convergence.png and detection.png; returns the paths written."""
    return [_convergence(result, out_dir / "convergence.png"),
            _detection(result, out_dir / "detection.png")]


def _convergence(result: Result, path: Path) -> Path:
    rows = result.series.messages
    times = [row["time"] for row in rows]
    by_time: dict[float, list[int]] = {}
    for moment, _node, known in result.series.views:
        by_time.setdefault(moment, []).append(known)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(times, [row["converged_fraction"] for row in rows], label="nodes knowing all")
    top.set_ylabel("fraction of live nodes")
    top.set_ylim(-0.02, 1.05)
    converged_at = result.summary["converged_at"]
    if converged_at is not None:
        top.axvline(converged_at, color="green", linestyle="--",
                    label=f"converged at {converged_at:.1f}s")
    top.legend(loc="lower right")
    top.set_title(f"{result.summary['scenario']}: convergence (seed {result.summary['seed']})")
    bottom.plot(times, [row["live_nodes"] - 1 for row in rows], color="black",
                label="live members (others)")
    view_times = sorted(by_time)
    bottom.plot(view_times, [sum(by_time[t]) / len(by_time[t]) for t in view_times],
                label="mean view size")
    bottom.plot(view_times, [min(by_time[t]) for t in view_times], alpha=0.6,
                label="smallest view")
    bottom.set_xlabel("simulated time (s)")
    bottom.set_ylabel("members")
    bottom.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _detection(result: Result, path: Path) -> Path:
    crashes = result.crashes
    period = result.summary["protocol_period"]
    figure, axis = plt.subplots(figsize=(9, 5))
    indexes = list(range(len(crashes)))
    for key, label in (("first_suspicion", "first suspicion"),
                       ("first_death", "first declared dead"),
                       ("full_dissemination", "every live node knows it is dead")):
        points = [(index, crash[key]) for index, crash in zip(indexes, crashes, strict=True)
                  if crash[key] is not None]
        axis.scatter([p[0] for p in points], [p[1] for p in points], label=label, s=18)
    axis.axhline(result.summary["expected_first_detection_periods"] * period, color="red",
                 linestyle="--", label="SWIM e/(e-1) periods (first probe of the crashed node)")
    axis.set_xlabel("crash (in order)")
    axis.set_ylabel("seconds after the crash")
    if not crashes:
        axis.text(0.5, 0.5, "no crashes in this scenario", transform=axis.transAxes,
                  ha="center")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small")
    axis.set_title(f"{result.summary['scenario']}: failure detection")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
