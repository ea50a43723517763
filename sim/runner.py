"""Runs a scenario: builds the underlay and the hosts, drives their cores from SimPy, applies
the scheduled faults, and collects the metrics.

Each host has at most one pending wake-up, at its core's ``next_deadline()``. A wake-up is
re-armed only when the deadline moves earlier; a later deadline is picked up when the early
wake-up fires (calling early is harmless, DESIGN.md §3). A generation counter makes wake-ups
of a replaced or crashed core fire as no-ops.

Every random draw comes from a stream named after its purpose and derived from the one
master seed, so a run is a pure function of (scenario, seed).

A ``Simulation`` may simulate only some of the hosts (``worker`` of ``workers``, see
``sim.parallel``): every process replays the whole schedule (who starts, crashes, leaves
when), drives the cores of its own hosts, and sends what its hosts observed to worker 0,
which alone keeps the ground truth (``MembershipTracker``). With one worker that record is
applied as it happens.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import ipaddress
import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import simpy
from tqdm import tqdm

from meshguard.drivers.side_ports import SIDE_PORT_LIFETIME
from meshguard.identity.keys import Identity
from meshguard.identity.meshaddr import mesh_ipv4
from meshguard.sansio.types import Address
from sim.cores import (
    Core,
    CoreFactory,
    HostContext,
    NodeCore,
    membership_core,
    node_core,
    swim_config,
)
from sim.metrics import (
    MembershipTracker,
    Series,
    Trace,
    Violation,
    combined_digest,
    host_chain,
    known_members,
    observed,
    summarise,
)
from sim.nat import NatPlan, place_nats
from sim.network import Call, Network, build_underlay, call_later
from sim.parallel import Team, parallel_problem
from sim.reachability import punchability_summary
from sim.scenario import (
    Crash,
    Heal,
    Join,
    Leave,
    Partition,
    Restart,
    Scenario,
    ScenarioError,
    Selector,
    SetLoss,
    initial_node_names,
)
from sim.traffic import SentPacket, TrafficLedger

EXPECTED_FIRST_DETECTION_PERIODS = math.e / (math.e - 1)
"""SWIM paper: expected protocol periods until some member first probes a crashed one."""

DEADLINE_EPSILON = 1e-9

RUN_GC_THRESHOLDS = (100_000, 50, 20)
"""Cyclic-GC thresholds while a run is in progress (the default is 700, 10, 10). A large
mesh holds millions of long-lived objects (tables, records, queued datagrams) and creates few
cycles, so the default's frequent collections, each full one walking the whole heap, cost 13%
of the CPU at 1000 nodes; with these, 1%. Collection timing cannot change a run's outcome."""


SIDE_PORT_BASE = 40000
"""Side ports (fresh NAT observations) count up from here; hosts use one mesh port below."""


def stream(seed: int, purpose: str, name: str = "") -> random.Random:
    """An independent random stream for one purpose, derived from the master seed.

    ``random.Random`` seeds from a string through SHA-512, so this is stable across
    processes and unaffected by hash randomisation.
    """
    return random.Random(f"{seed}:{purpose}:{name}")


@dataclass(slots=True)
class Host:
    """One simulated machine: its address and identity outlive any one core."""

    name: str
    group: str
    address: Address
    identity: Identity
    state: str = "pending"  # pending → live → crashed | leaving → stopped; restart → live
    core: Core | None = None
    life: int = 0
    wake_at: float | None = None
    wake_generation: int = 0
    last_down: float = -math.inf
    last_up: float = -math.inf


Tracked = tuple[float, str, Any, Any]
"""What the tracker learns, in time order: (time, kind, subject, detail) with kind
``events`` (observer, ``Observed`` list), ``up`` (name), ``down`` (name, crashed),
``sample`` or ``settled``."""


@dataclass(slots=True)
class WorkerReport:
    """What one process knows at the end of a run that the summary needs."""

    chains: dict[str, tuple[str, int]]
    counters: dict[str, int]
    counter_samples: list[dict[str, int]]
    core_counters: dict[str, int]
    node_events: dict[str, int]
    views: dict[str, set[bytes]]
    """The member keys each of its live hosts' cores holds in its view (``known_members``)."""
    cpu_seconds: float = 0.0
    max_rss_kib: int = 0


@dataclass(slots=True)
class Result:
    """A finished run: the summary (as written to summary.json), series and violations."""

    scenario: Scenario
    summary: dict[str, Any]
    series: Series
    violations: list[Violation]
    out_dir: Path | None = None
    crashes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def trace_hash(self) -> str:
        return str(self.summary["trace_hash"])

    @property
    def ok(self) -> bool:
        return not self.violations

    def reproduce_command(self) -> str:
        return f"python -m sim {self.scenario.source} --seed {self.summary['seed']}"


class Simulation:
    """One run of one scenario with one seed."""

    def __init__(self, scenario: Scenario, *, core_factory: CoreFactory | None = None,
                 worker: int = 0, workers: int = 1) -> None:
        self.scenario = scenario
        self.worker = worker
        self.workers = workers
        self.seed = scenario.seed
        self.core_factory = core_factory or CORE_FACTORIES[scenario.core]
        self.env = simpy.Environment()
        self._wake_callbacks = (self._wake,)
        self.trace = Trace()
        self._side_port = SIDE_PORT_BASE
        self.hosts = self._make_hosts()
        self.graph = build_underlay(scenario, [(h.name, h.group) for h in self.hosts.values()])
        initial = initial_node_names(scenario.nodes)
        self.nats = NatPlan()
        if scenario.nat is not None:
            self.nats = place_nats(
                self.graph, scenario.nat,
                [(host.name, host.group, host.address[0]) for host in self.hosts.values()],
                initial[scenario.nodes.seeds:], scenario.network.access,
                stream(self.seed, "nat"))
        self.network = Network(self.env, self.graph, stream(self.seed, "network"),
                               on_delivery=self.trace.delivery)
        worker_of = {name: (workers - 1 - index) % workers
                     for index, name in enumerate(self.hosts)}
        """Round robin from the last worker: worker 0 also keeps the tracker, so it gets the
        fewest seeds (which answer every join)."""
        self.owned = frozenset(name for name, owner in worker_of.items() if owner == worker)
        """The hosts whose cores this process drives."""
        if workers > 1:
            self.network.split(worker_of, worker, workers)
        self.log: list[Tracked] | None = [] if workers > 1 else None
        """What the tracker has yet to learn (parallel runs); None: it learns at once."""
        self.counter_samples: list[dict[str, int]] = []
        for host in self.hosts.values():
            self.network.assign_ip(host.address[0], host.name)
        for name, device in self.nats.devices.items():
            self.network.assign_ip(device.public_ip, name)
        keys = {host.name: host.identity.public_key for host in self.hosts.values()}
        self.trusted_keys = tuple(keys.values())
        self.tracker = MembershipTracker(keys, self.trace)
        self.series = Series()
        self.seed_names = initial[:scenario.nodes.seeds]
        self.seed_addresses = [self.hosts[name].address for name in self.seed_names]
        self.seed_keys = [self.hosts[name].identity.public_key for name in self.seed_names]
        self.event_rng = stream(self.seed, "events")
        self.tracker.awaiting_initial = set(initial)
        self._schedule_initial_joins(initial)
        for event in scenario.events:
            self._at(event.at, partial(self._apply, event.action))
        self._next_sample = scenario.sample_interval
        self._at(self._next_sample, self._sample)
        self.full_connectivity_at: float | None = None
        self.traffic: TrafficLedger | None = None
        if scenario.traffic is not None:
            self.traffic = TrafficLedger(scenario.traffic.payload)
            self.traffic_rng = stream(self.seed, "traffic")
            self._at(scenario.traffic.start, self._send_traffic)
        settle = scenario.settle
        if settle is not None and scenario.last_event_at + settle <= scenario.duration:
            self._at(scenario.last_event_at + settle, self._settled_due)

    # -- setup ------------------------------------------------------------------------------

    def _make_hosts(self) -> dict[str, Host]:
        nodes = self.scenario.nodes
        owners = [group.name for group in nodes.groups for _ in range(group.count)]
        groups = list(zip(initial_node_names(nodes), owners, strict=True))
        for event in self.scenario.events:
            if isinstance(event.action, Join):
                groups.extend((name, event.action.group) for name in event.action.names)
        pool = ipaddress.IPv4Network(nodes.address_pool)
        hosts = {}
        for index, (name, group) in enumerate(groups):
            ip = str(pool.network_address + 1 + index)
            seed = hashlib.sha256(f"{self.seed}:identity:{name}".encode()).digest()
            hosts[name] = Host(name, group, (ip, nodes.port), Identity.from_seed(seed))
        return hosts

    def _schedule_initial_joins(self, names: list[str]) -> None:
        nodes = self.scenario.nodes
        rng = stream(self.seed, "join")
        for name in names:
            delay = 0.0 if name in self.seed_names else nodes.join_spread * rng.random()
            self._at(nodes.join_at + delay, partial(self._start, self.hosts[name]))

    def _at(self, moment: float, action: Callable[[], None]) -> None:
        delay = max(0.0, moment - self.env.now)
        self.env.timeout(delay).callbacks.append(lambda _event: action())

    # -- driving cores ----------------------------------------------------------------------

    def _start(self, host: Host) -> None:
        now = self.env.now
        host.life += 1
        host.state = "live"
        host.last_up = now
        if self.worker == 0:
            self._track((now, "up", host.name, None))
        if host.name not in self.owned:
            return
        label = f"{host.name}:{host.life}"
        context = HostContext(
            name=host.name, identity=host.identity, address=host.address,
            trusted_keys=self.trusted_keys, rng=stream(self.seed, "rng", label),
            entropy=stream(self.seed, "entropy", label).randbytes, now=now,
            protocol=self.scenario.protocol, behind_nat=host.name in self.nats.front_of)
        core = self.core_factory(context)
        host.core = core
        host.wake_at = None
        host.wake_generation += 1
        self.network.bind(host.address, partial(self._receive, host))
        self.trace.event(now, f"start {label}", host_chain(host.name))
        others = [index for index, address in enumerate(self.seed_addresses)
                  if address != host.address]
        if others:
            core.join([self.seed_addresses[index] for index in others], now,
                      seed_keys=[self.seed_keys[index] for index in others])
        self._after(host)

    def _receive(self, host: Host, data: bytes, source: Address) -> None:
        core = host.core
        if core is None:
            return
        core.receive_datagram(data, source, self.env.now)
        self._after(host)

    def _after(self, host: Host) -> None:
        """Drains a core's output, then re-arms its wake-up if the deadline moved earlier."""
        core = host.core
        if core is None:
            return
        send = self.network.send
        address = host.address
        for data, destination in core.datagrams_to_send():
            send(address, destination, data)
        if isinstance(core, NodeCore):
            self._send_from_side_ports(host, core)
        if self.traffic is not None:
            packets = core.tun_packets()  # type: ignore[attr-defined]
            if packets:
                self.traffic.received(host.name, packets, self.env.now)
        events = core.events()
        if events:
            self._track((self.env.now, "events", host.name, observed(events)))
        deadline = core.next_deadline()
        if deadline is None or (host.wake_at is not None and host.wake_at <= deadline):
            return
        host.wake_at = deadline
        host.wake_generation += 1
        delay = max(0.0, deadline - self.env.now)
        call_later(self.env, delay, self._wake_callbacks, (host, host.wake_generation))

    def _send_from_side_ports(self, host: Host, core: NodeCore) -> None:
        """As the Linux driver does: each datagram from a new port of the host, answers to
        that port back to the node for ``SIDE_PORT_LIFETIME`` seconds."""
        for data, destination in core.side_datagrams_to_send():
            self._side_port += 1
            local = (host.address[0], self._side_port)
            self.network.bind(local, partial(self._side_receive, host, core))
            self.network.send(local, destination, data)
            self._at(self.env.now + SIDE_PORT_LIFETIME, partial(self.network.unbind, local))

    def _side_receive(self, host: Host, core: NodeCore, data: bytes, source: Address) -> None:
        if host.core is core:
            core.receive_side_datagram(data, source, self.env.now)
            self._after(host)

    def _wake(self, call: Call) -> None:
        wake: tuple[Host, int] = call.value  # type: ignore[assignment]
        host, generation = wake
        if generation != host.wake_generation or host.core is None:
            return
        host.wake_at = None
        now = self.env.now
        deadline = host.core.next_deadline()
        if deadline is not None and deadline <= now + DEADLINE_EPSILON:
            host.core.on_timer(now)
        self._after(host)

    def _stop(self, host: Host) -> None:
        host.last_down = self.env.now
        host.core = None
        host.wake_at = None
        host.wake_generation += 1
        self.network.unbind(host.address)

    # -- the tracker's record -----------------------------------------------------------------

    def _track(self, entry: Tracked) -> None:
        if self.log is None:
            self.apply_tracked(entry)
        else:
            self.log.append(entry)

    def take_log(self) -> list[Tracked]:
        """What this process recorded for the tracker since the last call."""
        taken = self.log or []
        self.log = []
        return taken

    def apply_tracked(self, entry: Tracked) -> None:
        """Feeds one record to the tracker (worker 0, in time order)."""
        moment, kind, subject, detail = entry
        if kind == "events":
            self.tracker.on_events(subject, detail, moment)
        elif kind == "up":
            self.tracker.node_up(subject, moment)
        elif kind == "down":
            self.tracker.node_down(subject, moment, crashed=detail)
        elif kind == "sample":
            self.tracker.sample(moment, self.series)
        else:
            self._check_settled(moment)

    # -- scheduled events -------------------------------------------------------------------

    def _apply(self, action: object) -> None:
        now = self.env.now
        if isinstance(action, Crash):
            for name in self._select(action.select, "live"):
                host = self.hosts[name]
                if name in self.owned:
                    self.trace.event(now, f"crash {name}", host_chain(name))
                self._stop(host)
                host.state = "crashed"
                if self.worker == 0:
                    self._track((now, "down", name, True))
                if action.restart_after is not None:
                    self._at(now + action.restart_after, partial(self._restart, host))
        elif isinstance(action, Restart):
            for name in self._select(action.select, "crashed", "stopped"):
                self._restart(self.hosts[name])
        elif isinstance(action, Leave):
            for name in self._select(action.select, "live"):
                self._leave(self.hosts[name])
        elif isinstance(action, Join):
            for name in action.names:
                self._start(self.hosts[name])
        elif isinstance(action, Partition):
            self._global_event(f"partition {action.name}")
            self.network.partition(action.name, action.a, action.b, one_way=action.one_way)
        elif isinstance(action, Heal):
            self._global_event(f"heal {action.name}")
            self.network.heal(action.name)
        elif isinstance(action, SetLoss):
            self._global_event(f"loss {action.loss} {action.between}")
            self.network.set_loss(action.loss, action.between)

    def _global_event(self, text: str) -> None:
        """A run-wide event, traced once (every process applies it)."""
        if self.worker == 0:
            self.trace.event(self.env.now, text)

    def _restart(self, host: Host) -> None:
        if host.state in ("crashed", "stopped"):
            if host.name in self.owned:
                self.trace.event(self.env.now, f"restart {host.name}", host_chain(host.name))
            self._start(host)

    def _leave(self, host: Host) -> None:
        now = self.env.now
        if host.state != "live":
            return
        host.state = "leaving"
        if self.worker == 0:
            self._track((now, "down", host.name, False))
        host.last_down = now
        core = host.core
        if core is not None:
            self.trace.event(now, f"leave {host.name}", host_chain(host.name))
            core.leave(now)
            self._after(host)
        self._at(now + self.scenario.leave_linger, partial(self._finish_leave, host, host.life))

    def _finish_leave(self, host: Host, life: int) -> None:
        if host.state == "leaving" and host.life == life:
            self._stop(host)
            host.state = "stopped"

    def _select(self, selector: Selector, *states: str) -> list[str]:
        """The nodes an event acts on, among hosts in ``states``.

        Named nodes are taken as given (skipped if not eligible). Random picks never choose
        a seed node, so the mesh always keeps its entry points; name a seed to crash it.
        """
        eligible = [name for name, host in self.hosts.items() if host.state in states]
        if selector.nodes:
            return [name for name in selector.nodes if name in eligible]
        pool = [name for name in eligible if name not in self.seed_names
                and (selector.group is None or self.hosts[name].group == selector.group)]
        if selector.count is not None:
            wanted = selector.count
        else:
            wanted = max(1, round((selector.fraction or 0.0) * len(pool)))
        chosen = set(self.event_rng.sample(pool, min(wanted, len(pool))))
        return [name for name in pool if name in chosen]

    # -- data plane -------------------------------------------------------------------------

    def _send_traffic(self) -> None:
        """Each live node sends one packet to a random other live node's mesh IPv4."""
        spec = self.scenario.traffic
        ledger = self.traffic
        if spec is None or ledger is None:
            return
        now = self.env.now
        live = [host for host in self.hosts.values() if host.state == "live"]
        rng = self.traffic_rng
        for host in live:
            if len(live) < 2 or host.core is None:
                continue
            target = live[rng.randrange(len(live) - 1)]
            if target is host:
                target = live[-1]
            packet = ledger.packet(host.name, target.name, mesh_ipv4(host.identity.public_key),
                                   mesh_ipv4(target.identity.public_key), now)
            host.core.send_packets([packet], now)  # type: ignore[attr-defined]
            self._after(host)
        if now + spec.interval < self.scenario.duration - DEADLINE_EPSILON:
            self._at(now + spec.interval, self._send_traffic)

    def _path_counts(self) -> dict[str, int] | None:
        """Ordered pairs of live nodes by the kind of path the first has to the second
        (``none``: the first has no path entry for the second). None for cores without
        paths."""
        live = [host for host in self.hosts.values() if host.state == "live"]
        counts = dict.fromkeys(PATH_KINDS, 0)
        for host in live:
            path_kinds = getattr(host.core, "path_kinds", None)
            if path_kinds is None:
                return None
            kinds = path_kinds()
            for other in live:
                if other is not host:
                    kind = kinds.get(other.identity.public_key, "none")
                    counts[kind] = counts.get(kind, 0) + 1
        return counts

    def _check_connectivity(self) -> None:
        """Notes the first sample, once every initial node has started, at which every
        ordered live pair has a working path."""
        nodes = self.scenario.nodes
        if (self.full_connectivity_at is not None
                or self.env.now < nodes.join_at + nodes.join_spread):
            return
        counts = self._path_counts()
        if counts is not None and sum(counts[kind] for kind in CONNECTED_PATHS) == sum(
                counts.values()):
            self.full_connectivity_at = self.env.now

    def _path_summary(self) -> dict[str, Any]:
        counts = self._path_counts()
        if counts is None:
            return {}
        summary: dict[str, Any] = {f"pairs_{kind}": count for kind, count in counts.items()}
        summary["pairs_total"] = sum(counts.values())
        summary["time_to_full_connectivity"] = self.full_connectivity_at
        if self.nats.devices:
            kinds: dict[str, int] = {}
            for label in self.nats.kind_of.values():
                kinds[label] = kinds.get(label, 0) + 1
            summary["nat_hosts"] = dict(sorted(kinds.items()))
            summary["nat_devices"] = len(self.nats.devices)
            summary["nat_counters"] = self.nats.counters()
            live = []
            for host in self.hosts.values():
                path_kinds = getattr(host.core, "path_kinds", None)
                if host.state == "live" and path_kinds is not None:
                    live.append((host.name, host.identity.public_key, path_kinds()))
            summary.update(punchability_summary(self.nats, live))
        return summary

    def _traffic_summary(self) -> dict[str, Any]:
        spec = self.scenario.traffic
        ledger = self.traffic
        if spec is None or ledger is None:
            return {}
        cutoff = self.scenario.duration - spec.grace

        def steady(record: SentPacket) -> bool:
            src, dst = self.hosts[record.src], self.hosts[record.dst]
            return (record.at <= cutoff and src.state == "live" and dst.state == "live"
                    and src.last_down < record.at and dst.last_down < record.at
                    and max(src.last_up, dst.last_up) + spec.grace <= record.at)

        return ledger.summary([record for record in ledger.sent if steady(record)])

    # -- measurement ------------------------------------------------------------------------

    def _sample(self) -> None:
        now = self.env.now
        self.counter_samples.append(dict(self.network.counters))
        if self.worker == 0:
            self._track((now, "sample", None, None))
        if self.scenario.core == "node":
            self._check_connectivity()
        self._next_sample = now + self.scenario.sample_interval
        if self._next_sample < self.scenario.duration - DEADLINE_EPSILON:
            self._at(self._next_sample, self._sample)

    def _settled_due(self) -> None:
        if self.worker == 0:
            self._track((self.env.now, "settled", None, None))

    def _check_settled(self, now: float) -> None:
        last = self.scenario.last_event_at
        reached = self.tracker.converged or any(
            converged and moment >= last for moment, converged in self.tracker.transitions)
        if not reached:
            waiting = [name for name in self.tracker.live
                       if self.tracker.hits[name] != len(self.tracker.live) - 1]
            self.tracker.violations.append(Violation(
                now, "every live node knows every live member after the last event "
                f"+ settle ({last:g}s + {self.scenario.settle:g}s)",
                f"{len(waiting)} of {len(self.tracker.live)} live nodes still miss members, "
                f"e.g. {waiting[:5]}"))

    # -- running ----------------------------------------------------------------------------

    def steps(self) -> Iterator[float]:
        """Advances the simulation in chunks, yielding the simulated time reached."""
        duration = self.scenario.duration
        chunk = min(1.0, duration / 100)
        reached = 0.0
        while reached < duration:
            reached = min(duration, reached + chunk)
            self.env.run(until=reached)
            yield reached

    def close(self) -> None:
        """Takes the sample due at exactly the end (SimPy stops just before events at
        ``duration``)."""
        if abs(self._next_sample - self.scenario.duration) <= DEADLINE_EPSILON:
            self._sample()

    def report(self) -> WorkerReport:
        """This process's share of the end-of-run numbers (after ``close``)."""
        live = [host for name, host in self.hosts.items()
                if name in self.owned and host.state == "live" and host.core is not None]
        core_counters: dict[str, int] = {}
        node_events: dict[str, int] = {}
        views: dict[str, set[bytes]] = {}
        for host in live:
            core = host.core
            assert core is not None
            views[host.name] = known_members(core, host.identity.public_key)
            for key, value in sorted(getattr(core, "counters", {}).items()):
                core_counters[key] = core_counters.get(key, 0) + int(value)
            for kind, count in getattr(core, "event_counts", {}).items():
                node_events[kind] = node_events.get(kind, 0) + count
        return WorkerReport(self.trace.chain_digests(), dict(self.network.counters),
                            self.counter_samples, core_counters, node_events, views)

    def finish(self, wall_seconds: float, cpu_seconds: float,
               others: Sequence[WorkerReport] = ()) -> Result:
        """The result, from this process's report and (parallel runs) the other workers'.
        ``cpu_seconds`` is this process's; the others' are added."""
        duration = self.scenario.duration
        tracker = self.tracker
        self.close()
        for entry in self.take_log():
            self.apply_tracked(entry)
        reports = [self.report(), *others]
        tracker.finish(duration)
        views: dict[str, set[bytes]] = {}
        core_counters: dict[str, int] = {}
        node_events: dict[str, int] = {}
        chains: dict[str, tuple[str, int]] = {}
        counters = dict.fromkeys(self.network.counters, 0)
        for report in reports:
            views.update(report.views)
            chains.update(report.chains)
            for totals, part in ((core_counters, report.core_counters),
                                 (node_events, report.node_events),
                                 (counters, report.counters)):
                for key, value in part.items():
                    totals[key] = totals.get(key, 0) + value
        add_network_columns(self.series, [report.counter_samples for report in reports])
        worker_cpu = [cpu_seconds, *(report.cpu_seconds for report in others)]
        worker_rss = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      *(report.max_rss_kib for report in others)]
        tracker.check_views(duration, views)
        node_seconds = max(tracker.node_seconds, 1e-9)
        crashes = [record.as_dict() for record in tracker.crashes]
        period = float(swim_config(self.scenario.protocol).protocol_period)
        summary: dict[str, Any] = {
            "scenario": self.scenario.name,
            "seed": self.seed,
            "trace_hash": combined_digest(chains),
            "workers": self.workers,
            "nodes": len(self.hosts),
            "live_nodes_at_end": len(tracker.live),
            "sim_seconds": duration,
            "wall_seconds": round(wall_seconds, 3),
            "speed_factor": round(duration / wall_seconds, 2) if wall_seconds > 0 else None,
            "cpu_seconds": round(sum(worker_cpu), 3),
            "cpu_seconds_per_worker": [round(seconds, 3) for seconds in worker_cpu],
            "peak_rss_mib_per_worker": [round(kib / 1024, 1) for kib in worker_rss],
            "converged_at": tracker.converged_at,
            "final_convergence_at": tracker.final_convergence(),
            "converged_at_end": tracker.converged,
            "protocol_period": period,
            "expected_first_detection_periods": round(EXPECTED_FIRST_DETECTION_PERIODS, 4),
            "detection_latency": crashes,
            "detection_latency_summary": {
                key: summarise([crash[key] for crash in crashes if crash[key] is not None])
                for key in ("first_suspicion", "first_death", "full_dissemination")},
            "false_positive_suspicions": tracker.false_positive_suspicions,
            "false_positive_deaths": tracker.false_positive_deaths,
            "false_positive_suspicion_events": sum(tracker.false_suspicions.values()),
            "false_positive_death_events": sum(tracker.false_deaths.values()),
            "accusations_of_restarted": tracker.accusations_of_restarted,
            "messages_per_node_per_s": round(counters["sent"] / node_seconds, 4),
            "bytes_per_node_per_s": round(counters["bytes_sent"] / node_seconds, 2),
            "network": counters,
            "membership_events": dict(sorted(tracker.event_counts.items())),
            "core_counters": core_counters,
            "trace_records": sum(records for _, records in chains.values()),
            "violations": [str(violation) for violation in tracker.violations],
        }
        summary.update(self._path_summary())
        summary.update(self._traffic_summary())
        if node_events:
            summary["node_events"] = dict(sorted(node_events.items()))
        return Result(self.scenario, summary, self.series, list(tracker.violations),
                      crashes=crashes)


def run(scenario: Scenario, *, seed: int | None = None, out_dir: str | Path | None = None,
        progress: bool = False, plot: bool = False,
        core_factory: CoreFactory | None = None, workers: int = 1) -> Result:
    """Runs ``scenario`` (with ``seed`` overriding its own) and returns the ``Result``.

    With ``out_dir`` the summary, the CSV series and (with ``plot``) the PNG charts are
    written there. ``progress`` shows a tqdm bar of simulated seconds on stderr. ``workers``
    above 1 splits the hosts across that many processes (``sim.parallel``; the same trace
    hash as one), for scenarios ``parallel_problem`` accepts, else ``ScenarioError``.
    """
    if seed is not None:
        scenario = scenario.with_seed(seed)
    if workers < 1:
        raise ScenarioError("workers", f"must be at least 1, got {workers}")
    if workers > 1:
        problem = parallel_problem(scenario)
        if problem is not None:
            raise ScenarioError("workers", problem)
    started = time.perf_counter()
    cpu_started = time.process_time()
    thresholds = gc.get_threshold()
    gc.set_threshold(*RUN_GC_THRESHOLDS)
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1:
                team = stack.enter_context(Team(scenario, workers, core_factory))
                simulation, steps, reports = team.simulation, team.steps(), team.reports
            else:
                simulation = Simulation(scenario, core_factory=core_factory)
                steps, reports = simulation.steps(), list
            with tqdm(total=scenario.duration, unit="sim s", disable=not progress,
                      file=sys.stderr, desc=scenario.name, bar_format="{l_bar}{bar}| "
                      "{n:.0f}/{total:.0f} sim s [{elapsed}<{remaining}]") as bar:
                for reached in steps:
                    bar.update(reached - bar.n)
            others = reports()
    finally:
        gc.set_threshold(*thresholds)
    result = simulation.finish(time.perf_counter() - started,
                               time.process_time() - cpu_started, others)
    if out_dir is not None:
        write_outputs(result, Path(out_dir), plot=plot)
    return result


def add_network_columns(series: Series, samples: Sequence[Sequence[dict[str, int]]]) -> None:
    """Fills the network columns of the message rows: each sample's counters summed over
    the processes (each took one per sample), less the sample before."""
    previous: dict[str, int] = {}
    for row, parts in zip(series.messages, zip(*samples, strict=True), strict=True):
        for key in Series.NETWORK_COLUMNS:
            total = sum(part[key] for part in parts)
            row[key] = total - previous.get(key, 0)
            previous[key] = total


def write_outputs(result: Result, out_dir: Path, *, plot: bool) -> None:
    """summary.json, views.csv, messages.csv and, with ``plot``, the PNG charts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.out_dir = out_dir
    (out_dir / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
    with (out_dir / "views.csv").open("w", encoding="utf-8") as handle:
        handle.write(",".join(Series.VIEW_COLUMNS) + "\n")
        handle.writelines(f"{moment:g},{node},{size}\n"
                          for moment, node, size in result.series.views)
    with (out_dir / "messages.csv").open("w", encoding="utf-8") as handle:
        handle.write(",".join(Series.MESSAGE_COLUMNS) + "\n")
        for row in result.series.messages:
            handle.write(",".join(_csv_value(row[key]) for key in Series.MESSAGE_COLUMNS)
                         + "\n")
    if plot:
        from sim.plots import write_plots

        write_plots(result, out_dir)


def _csv_value(value: float) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


PATH_KINDS = ("direct", "punched", "relayed", "unreachable", "connecting", "none")
CONNECTED_PATHS = ("direct", "punched", "relayed")

CORE_FACTORIES: dict[str, CoreFactory] = {"membership": membership_core, "node": node_core}
"""The core a scenario's ``core:`` field names."""
