"""Parallel runs: one simulation's hosts split across processes, one per core.

A conservative synchronous-window scheme. No datagram between two hosts arrives sooner than
the *lookahead*: twice the access links' minimum latency, since every path crosses the
sender's access link and the receiver's. So the processes simulate a window that ends one
lookahead after the earliest pending event anywhere, independently; at its end they swap the
datagrams sent to each other's hosts (all of which arrive in a later window), send worker 0
what their hosts observed, which it merges by time into the one ``MembershipTracker``, and
learn from it where the next window ends. Every process replays
the whole schedule (starts, crashes, partitions), so the choice of which nodes an event
hits, made from the shared event stream, is the same everywhere.

Each host's random draws (its core's streams, and the network's draws for what it sends)
come from its own stream, and the trace hash is made of per-host chains, so a run gives the
same trace hash for any number of workers. The one exception: two records that reach one
host at exactly the same simulated instant from different processes are applied in worker
order; with continuous latency distributions that does not happen in practice.

Worker 0 is the calling process; the others are forked children talking over pipes.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import resource
import time
import traceback
from collections.abc import Iterator
from heapq import heappop
from multiprocessing import get_context
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from operator import itemgetter
from types import TracebackType
from typing import TYPE_CHECKING, Any

import simpy

from sim.cores import CoreFactory
from sim.scenario import Scenario

if TYPE_CHECKING:
    from sim.runner import Tracked

PROGRESS_STEP = 1.0
"""Simulated seconds between two progress reports (and at most 1/100 of the run)."""


def lookahead(scenario: Scenario) -> float:
    """The shortest time any datagram takes between two hosts."""
    return 2 * scenario.network.access.latency.min


def parallel_problem(scenario: Scenario) -> str | None:
    """Why ``scenario`` cannot be split across processes, or None if it can."""
    if scenario.core != "membership":
        return "runs on several workers drive membership cores only (core: membership)"
    if scenario.nat is not None:
        return "a scenario with NAT devices runs on one worker (a device's table is shared " \
               "by the hosts behind it)"
    if scenario.traffic is not None:
        return "a scenario with data-plane traffic runs on one worker"
    if lookahead(scenario) <= 0:
        return "runs on several workers need network.access.latency.min above 0 " \
               "(the lookahead between processes)"
    return None


def next_event_time(env: simpy.Environment) -> float:
    """When ``env``'s next event with any effect is due (inf: none). ``run(until=...)``
    leaves its spent stop event at the head of the queue; it is dropped here."""
    queue = env._queue
    while queue and not queue[0][3].callbacks and queue[0][3]._ok:
        heappop(queue)
    return float(queue[0][0]) if queue else math.inf


def _send(conn: Connection, message: tuple[Any, ...]) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn: Connection, worker: int) -> tuple[Any, ...]:
    try:
        message: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
    except EOFError:
        raise RuntimeError(f"simulation worker {worker} exited without a word") from None
    if message[0] == "error":
        raise RuntimeError(f"simulation worker {worker} failed:\n{message[1]}")
    return message


def _child(scenario: Scenario, core_factory: CoreFactory | None, worker: int, workers: int,
           conn: Connection) -> None:
    """A forked worker: its windows, then its report; an exception goes to worker 0."""
    from sim.runner import Simulation

    started = time.process_time()
    try:
        simulation = Simulation(scenario, core_factory=core_factory, worker=worker,
                                workers=workers)
        env = simulation.env
        network = simulation.network
        _, inbound, end = _receive(conn, 0)
        while end is not None:
            env.run(until=end)
            _send(conn, ("window", network.take_outbox(), simulation.take_log(),
                         next_event_time(env)))
            _, inbound, end = _receive(conn, 0)
            network.hand_in(inbound)
        simulation.close()
        report = simulation.report()
        report.cpu_seconds = time.process_time() - started
        report.max_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _send(conn, ("report", report))
    except BaseException:  # everything reaches worker 0, which raises it
        with contextlib.suppress(OSError):  # unless worker 0 is gone already
            _send(conn, ("error", traceback.format_exc()))
    finally:
        conn.close()


class Team:
    """Worker 0's side of a parallel run: its own ``Simulation`` and the children."""

    def __init__(self, scenario: Scenario, workers: int,
                 core_factory: CoreFactory | None = None) -> None:
        from sim.runner import Simulation

        self.scenario = scenario
        self.workers = workers
        context = get_context("fork")
        self._conns: list[Connection] = []
        self._children: list[BaseProcess] = []
        for worker in range(1, workers):
            ours, theirs = context.Pipe()
            child = context.Process(target=_child, name=f"sim-worker-{worker}", daemon=True,
                                    args=(scenario, core_factory, worker, workers, theirs))
            child.start()
            theirs.close()
            self._conns.append(ours)
            self._children.append(child)
        self.simulation = Simulation(scenario, core_factory=core_factory, worker=0,
                                     workers=workers)

    def __enter__(self) -> Team:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for conn in self._conns:
            conn.close()
        for child in self._children:
            child.join(timeout=5 if kind is None else 0)
            if child.is_alive():
                child.terminate()
                child.join()

    def steps(self) -> Iterator[float]:
        """Runs the windows, yielding the simulated time at each progress step (every
        ``PROGRESS_STEP``, at most 1/100 of the run)."""
        simulation = self.simulation
        env = simulation.env
        network = simulation.network
        window = lookahead(self.scenario)
        duration = self.scenario.duration
        step = min(PROGRESS_STEP, duration / 100)
        boundary = min(duration, step)
        end: float | None = min(window, boundary)
        by_time = itemgetter(0)
        # The last window's records, applied while the children run the next one: nothing
        # in a run reads the tracker, so it may lag a window (and the parent's idle time
        # at the barrier is often the children's).
        untracked: list[Tracked] = []
        for conn in self._conns:
            _send(conn, ("window", [], end))
        while end is not None:
            env.run(until=end)
            for entry in untracked:
                simulation.apply_tracked(entry)
            outboxes = [network.take_outbox()]
            logs = [simulation.take_log()]
            earliest = next_event_time(env)
            for worker, conn in enumerate(self._conns, 1):
                _, outbox, log, pending = _receive(conn, worker)
                outboxes.append(outbox)
                logs.append(log)
                earliest = min(earliest, pending)
            for box in outboxes:
                for handed in box:
                    if handed:
                        earliest = min(earliest, min(handed, key=by_time)[0])
            reached = end
            progress = reached >= boundary
            if progress:
                boundary = min(duration, boundary + step)
            end = None if reached >= duration else min(max(reached, earliest) + window,
                                                        boundary)
            for worker, conn in enumerate(self._conns, 1):
                _send(conn, ("window", [item for box in outboxes for item in box[worker]], end))
            network.hand_in(item for box in outboxes for item in box[0])
            untracked = sorted((entry for log in logs for entry in log), key=by_time)
            if progress:
                yield reached
        for entry in untracked:
            simulation.apply_tracked(entry)

    def reports(self) -> list[Any]:
        """The children's end-of-run reports (after ``steps`` is exhausted)."""
        return [_receive(conn, worker)[1] for worker, conn in enumerate(self._conns, 1)]
