"""``python -m sim SCENARIO.yaml [--out DIR] [--seed N] [--workers N] [--compiled] [--plot]
[--quiet]``.

Exit status: 0 when every invariant held, 1 when one broke (the command that reproduces it
is printed), 2 for an invalid scenario or command line, 3 when ``--compiled`` could not build
or load the compiled tree (each one line, no traceback).

``--compiled`` builds (once per source change) a mypyc-compiled copy of the code and
re-executes this command in it (``sim.compiled``): the same trace, in less CPU time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from sim import compiled
from sim.parallel import parallel_problem
from sim.runner import run
from sim.scenario import ScenarioError, load_scenario


def _integer_at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            shown = repr(text) if value is None else value
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {shown}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sim", description="Run a meshguard simulation scenario.")
    parser.add_argument("scenario", type=Path, help="scenario YAML file")
    parser.add_argument("--out", type=Path, help="results directory "
                        "(default: results/<scenario name>/)")
    parser.add_argument("--seed", type=_integer_at_least(0),
                        help="master seed (overrides the scenario's)")
    parser.add_argument("--workers", type=_integer_at_least(1), default=1,
                        help="processes to split the hosts across (same trace hash; pays off "
                             "from a few hundred nodes; default 1)")
    parser.add_argument("--compiled", action="store_true",
                        help="run mypyc-compiled code (built once per source change into "
                             ".build/mypyc/; same trace hash)")
    parser.add_argument("--plot", action="store_true", help="also write PNG charts")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        scenario = load_scenario(args.scenario)
        if args.workers > 1:
            problem = parallel_problem(scenario)
            if problem is not None:
                raise ScenarioError("--workers", problem, str(args.scenario))
    except ScenarioError as error:
        print(error, file=sys.stderr)
        return 2
    out_dir = args.out if args.out is not None else Path("results") / scenario.name
    if out_dir.exists() and not out_dir.is_dir():
        print(f"--out: {out_dir} exists and is not a directory", file=sys.stderr)
        return 2
    if args.compiled:
        problem = compiled.enter_tree(["-m", "sim", *(sys.argv[1:] if argv is None else argv)])
        if problem is not None:
            print(problem, file=sys.stderr)
            return 3
    result = run(scenario, seed=args.seed, out_dir=out_dir, progress=not args.quiet,
                 plot=args.plot, workers=args.workers)
    summary = result.summary
    print(f"scenario {summary['scenario']}: {summary['nodes']} nodes, "
          f"{summary['sim_seconds']:g} sim s in {summary['wall_seconds']:g} wall s "
          f"({summary['speed_factor']}x)")
    print(f"converged_at {summary['converged_at']}  final_convergence_at "
          f"{summary['final_convergence_at']}  false positives: "
          f"{summary['false_positive_suspicions']} suspicions, "
          f"{summary['false_positive_deaths']} deaths")
    detection = summary["detection_latency_summary"]
    for key in ("first_suspicion", "full_dissemination"):
        if detection[key] is not None:
            print(f"detection {key}: median {detection[key]['median']:g} s, "
                  f"max {detection[key]['max']:g} s over {detection[key]['count']} crashes")
    print(f"results in {out_dir}/")
    print(f"code {compiled.mode()}")
    print(f"seed {summary['seed']}  trace {summary['trace_hash']}")
    if result.violations:
        for violation in result.violations:
            print(f"INVARIANT VIOLATED: {violation}", file=sys.stderr)
        print(f"reproduce with: {result.reproduce_command()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
