"""Scenario files: YAML in, a validated, immutable ``Scenario`` out.

Every field is checked here, before anything runs, so a mistake in a scenario costs one line
naming the field (``nodes.count: must be a positive integer, got -3``) and never a traceback
halfway through a long run. Unknown fields are rejected so a typo cannot be silently ignored.
The schema is documented in docs/simulator.md.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_PORT = 51821
DEFAULT_ADDRESS_POOL = "100.64.0.0/10"
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class ScenarioError(ValueError):
    """A scenario is invalid; ``str()`` is the one line shown to the user."""

    def __init__(self, where: str, problem: str, source: str = "scenario") -> None:
        self.where = where
        self.problem = problem
        self.source = source
        super().__init__(f"{source}: {where}: {problem}" if where else f"{source}: {problem}")

    def in_source(self, source: str) -> ScenarioError:
        """The same error, naming the file it came from."""
        return ScenarioError(self.where, self.problem, source)


@dataclass(frozen=True, slots=True)
class Latency:
    """One-way delay of a link: ``min`` plus a random part drawn per datagram.

    ``constant``: always ``min``. ``uniform``: uniform in [``min``, ``max``]. ``lognormal``:
    ``min`` plus a lognormal variable whose mean is ``mean - min`` and log-space deviation
    ``sigma``, the usual heavy-tailed shape of Internet delay.
    """

    dist: Literal["constant", "uniform", "lognormal"]
    min: float
    max: float = 0.0
    mean: float = 0.0
    sigma: float = 0.0


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """Parameters of one link (applied in each direction independently)."""

    latency: Latency = Latency("constant", 0.005)
    jitter: float = 0.0
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.05
    bandwidth: float | None = None


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A region: its hosts hang off one router by ``access`` links."""

    name: str
    count: int


@dataclass(frozen=True, slots=True)
class GroupPairSpec:
    """Overrides the inter-region link between two regions."""

    groups: tuple[str, str]
    link: LinkSpec


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    access: LinkSpec = LinkSpec(Latency("lognormal", 0.002, mean=0.005, sigma=0.5))
    inter: LinkSpec = LinkSpec(Latency("lognormal", 0.02, mean=0.04, sigma=0.5))
    between: tuple[GroupPairSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class NodesSpec:
    groups: tuple[GroupSpec, ...]
    port: int = DEFAULT_PORT
    address_pool: str = DEFAULT_ADDRESS_POOL
    seeds: int = 1
    join_at: float = 0.0
    join_spread: float = 0.0

    @property
    def count(self) -> int:
        return sum(group.count for group in self.groups)


@dataclass(frozen=True, slots=True)
class Selector:
    """Which nodes an event acts on: named nodes, or ``count``/``fraction`` picked at random
    (from the seeded event stream) among the eligible nodes, optionally of one group."""

    nodes: tuple[str, ...] = ()
    count: int | None = None
    fraction: float | None = None
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Crash:
    select: Selector
    restart_after: float | None = None


@dataclass(frozen=True, slots=True)
class Restart:
    select: Selector


@dataclass(frozen=True, slots=True)
class Leave:
    select: Selector


@dataclass(frozen=True, slots=True)
class Join:
    """New nodes (fresh identities) join the mesh; the parser assigns their names."""

    names: tuple[str, ...]
    group: str


@dataclass(frozen=True, slots=True)
class Partition:
    """Blocks traffic from side ``a`` to side ``b`` (and back unless ``one_way``).

    Sides are lists of group names or node names."""

    name: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    one_way: bool = False


@dataclass(frozen=True, slots=True)
class Heal:
    name: str  # a partition name, or "all"


@dataclass(frozen=True, slots=True)
class SetLoss:
    """Extra loss on top of the links': everywhere, or between two groups (both ways)."""

    loss: float
    between: tuple[str, str] | None = None


Action = Crash | Restart | Leave | Join | Partition | Heal | SetLoss


@dataclass(frozen=True, slots=True)
class TrafficSpec:
    """Data-plane traffic (``core: node`` only): from ``start`` on, every ``interval`` seconds
    each live node sends one ``payload``-byte UDP packet to a random other live node's mesh
    IPv4. Packets sent in the last ``grace`` seconds, within ``grace`` seconds of either
    end's (re)start, or to or from a node that went down after the send, do not count toward
    the delivery ratio (they are still counted in ``traffic_sent``)."""

    interval: float = 5.0
    start: float = 30.0
    payload: int = 64
    grace: float = 5.0


@dataclass(frozen=True, slots=True)
class NatSpec:
    """Which initial nodes sit behind NAT devices, and which kinds (``core: node`` only).

    ``fraction`` of the initial nodes (never a seed) go behind NATs, ``hosts_per_nat`` to a
    device (in the same group); each device's kind is drawn from ``mix`` (name → weight, the
    names of ``sim.nat.NAT_TYPES``). ``cgnat`` is the fraction of devices nested behind
    their group's carrier-grade NAT (of kind ``cgnat_type``)."""

    fraction: float
    mix: tuple[tuple[str, float], ...]
    hosts_per_nat: int = 1
    timeout: float = 120.0
    hairpinning: bool = True
    cgnat: float = 0.0
    cgnat_type: str = "port_restricted"


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    action: Action


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    seed: int
    duration: float
    nodes: NodesSpec
    network: NetworkSpec
    events: tuple[Event, ...] = ()
    size: Literal["small", "large"] = "small"
    sample_interval: float = 1.0
    settle: float | None = 60.0
    leave_linger: float = 10.0
    protocol: Mapping[str, Any] = field(default_factory=dict)
    source: str = "scenario"
    core: Literal["membership", "node"] = "membership"
    traffic: TrafficSpec | None = None
    nat: NatSpec | None = None

    @property
    def last_event_at(self) -> float:
        """Time of the last scheduled disturbance (joins count, since they change membership)."""
        times = [self.nodes.join_at + self.nodes.join_spread]
        for event in self.events:
            times.append(event.at)
            if isinstance(event.action, Crash) and event.action.restart_after is not None:
                times.append(event.at + event.action.restart_after)
        return max(times)

    def with_seed(self, seed: int) -> Scenario:
        return dataclasses.replace(self, seed=seed)


# -- validation helpers ------------------------------------------------------------------------


class _Fields:
    """Reads a mapping, remembering which keys were used so leftovers can be rejected."""

    def __init__(self, value: object, where: str) -> None:
        if not isinstance(value, Mapping):
            raise ScenarioError(where or "(top level)", f"must be a mapping, got {_show(value)}")
        for key in value:
            if not isinstance(key, str):
                raise ScenarioError(where or "(top level)",
                                    f"field names must be text, got {key!r}")
        self.data: Mapping[str, object] = value
        self.where = where
        self.used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: object = None) -> object:
        self.used.add(key)
        return self.data.get(key, default)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ScenarioError(self.path(unknown[0]), "unknown field")


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object, where: str, *, low: float, high: float = math.inf,
            low_open: bool = False, what: str = "a number") -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        number = float(value)  # type: ignore[arg-type]
        ok = (number > low if low_open else number >= low) and number <= high
    if not ok:
        raise ScenarioError(where, f"must be {what}, got {_show(value)}")
    return number


def _integer(value: object, where: str, *, low: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ScenarioError(where, f"must be {what}, got {_show(value)}")
    return value


def _probability(value: object, where: str, *, below_one: bool = False) -> float:
    what = "a probability in [0, 1)" if below_one else "a probability in [0, 1]"
    number = _number(value, where, low=0.0, high=1.0, what=what)
    if below_one and number >= 1.0:
        raise ScenarioError(where, f"must be {what}, got {_show(value)}")
    return number


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ScenarioError(
            where, f"must be a name (a letter, then letters, digits, '_', '.', '-'), got "
            f"{_show(value)}")
    return value


def _names(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ScenarioError(where, f"must be a non-empty list of names, got {_show(value)}")
    return tuple(_name(item, f"{where}[{index}]") for index, item in enumerate(value))


# -- sections ----------------------------------------------------------------------------------


def _latency(value: object, where: str) -> Latency:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return Latency("constant", _number(value, where, low=0.0, what="a delay in seconds >= 0"))
    fields = _Fields(value, where)
    dist = fields.get("dist", "constant")
    if dist not in ("constant", "uniform", "lognormal"):
        raise ScenarioError(fields.path("dist"),
                            f"must be one of constant, uniform, lognormal, got {_show(dist)}")
    low = _number(fields.get("min", 0.0), fields.path("min"), low=0.0,
                  what="a delay in seconds >= 0")
    if dist == "constant":
        fields.done()
        return Latency("constant", low)
    if dist == "uniform":
        high = _number(fields.get("max"), fields.path("max"), low=low,
                       what=f"a delay in seconds >= min ({low})")
        fields.done()
        return Latency("uniform", low, max=high)
    mean = _number(fields.get("mean"), fields.path("mean"), low=low, low_open=True,
                   what=f"a delay in seconds > min ({low})")
    sigma = _number(fields.get("sigma", 0.5), fields.path("sigma"), low=0.0, low_open=True,
                    high=5.0, what="a log-space deviation in (0, 5]")
    fields.done()
    return Latency("lognormal", low, mean=mean, sigma=sigma)


def _link(value: object, where: str, base: LinkSpec) -> LinkSpec:
    fields = _Fields(value, where)
    link = _link_fields(fields, base)
    fields.done()
    return link


def _link_fields(fields: _Fields, base: LinkSpec) -> LinkSpec:
    latency = (_latency(fields.get("latency"), fields.path("latency"))
               if fields.has("latency") else base.latency)

    def seconds(key: str, default: float) -> float:
        if not fields.has(key):
            return default
        return _number(fields.get(key), fields.path(key), low=0.0,
                       what="a duration in seconds >= 0")

    def probability(key: str, default: float, below_one: bool = False) -> float:
        if not fields.has(key):
            return default
        return _probability(fields.get(key), fields.path(key), below_one=below_one)

    bandwidth = base.bandwidth
    if fields.has("bandwidth"):
        raw = fields.get("bandwidth")
        bandwidth = None if raw is None else _number(
            raw, fields.path("bandwidth"), low=0.0, low_open=True,
            what="a rate in bits per second > 0 (or null)")
    return LinkSpec(
        latency=latency,
        jitter=seconds("jitter", base.jitter),
        loss=probability("loss", base.loss, below_one=True),
        duplicate=probability("duplicate", base.duplicate),
        reorder=probability("reorder", base.reorder),
        reorder_delay=seconds("reorder_delay", base.reorder_delay),
        bandwidth=bandwidth,
    )


def _nodes(value: object) -> NodesSpec:
    fields = _Fields(value, "nodes")
    if fields.has("count") == fields.has("groups"):
        raise ScenarioError("nodes", "give exactly one of count or groups")
    if fields.has("count"):
        count = _integer(fields.get("count"), "nodes.count", low=1, what="a positive integer")
        groups: tuple[GroupSpec, ...] = (GroupSpec("n", count),)
    else:
        raw = fields.get("groups")
        if not isinstance(raw, list) or not raw:
            raise ScenarioError("nodes.groups", f"must be a non-empty list, got {_show(raw)}")
        parsed = []
        for index, item in enumerate(raw):
            group = _Fields(item, f"nodes.groups[{index}]")
            name = _name(group.get("name"), group.path("name"))
            count = _integer(group.get("count"), group.path("count"), low=1,
                             what="a positive integer")
            group.done()
            parsed.append(GroupSpec(name, count))
        names = [group.name for group in parsed]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ScenarioError(f"nodes.groups[{index}].name", f"duplicate group {name!r}")
        groups = tuple(parsed)
    total = sum(group.count for group in groups)
    port = _integer(fields.get("port", DEFAULT_PORT), "nodes.port", low=1,
                    what="a UDP port 1-65535")
    if port > 65535:
        raise ScenarioError("nodes.port", f"must be a UDP port 1-65535, got {port}")
    pool = fields.get("address_pool", DEFAULT_ADDRESS_POOL)
    try:
        network = ipaddress.IPv4Network(pool)
    except (ValueError, TypeError):
        raise ScenarioError("nodes.address_pool",
                            f"must be an IPv4 network like 100.64.0.0/10, got {_show(pool)}"
                            ) from None
    seeds = _integer(fields.get("seeds", 1), "nodes.seeds", low=1, what="a positive integer")
    if seeds > total:
        raise ScenarioError("nodes.seeds", f"must be at most the node count ({total}), got {seeds}")
    join_at = _number(fields.get("join_at", 0.0), "nodes.join_at", low=0.0,
                      what="a time in seconds >= 0")
    join_spread = _number(fields.get("join_spread", 0.0), "nodes.join_spread", low=0.0,
                          what="a duration in seconds >= 0")
    fields.done()
    return NodesSpec(groups, port, str(network), seeds, join_at, join_spread)


def _network(value: object, groups: Sequence[str]) -> NetworkSpec:
    default = NetworkSpec()
    if value is None:
        return default
    fields = _Fields(value, "network")
    access = (_link(fields.get("access"), "network.access", default.access)
              if fields.has("access") else default.access)
    inter = (_link(fields.get("inter"), "network.inter", default.inter)
             if fields.has("inter") else default.inter)
    between = []
    raw = fields.get("between", [])
    if not isinstance(raw, list):
        raise ScenarioError("network.between", f"must be a list, got {_show(raw)}")
    for index, item in enumerate(raw):
        pair = _Fields(item, f"network.between[{index}]")
        names = _names(pair.get("groups"), pair.path("groups"))
        if len(names) != 2 or names[0] == names[1]:
            raise ScenarioError(pair.path("groups"), "must name two different groups")
        for name in names:
            if name not in groups:
                raise ScenarioError(pair.path("groups"), f"unknown group {name!r}")
        link = _link_fields(pair, inter)
        pair.done()
        between.append(GroupPairSpec((names[0], names[1]), link))
    fields.done()
    return NetworkSpec(access, inter, tuple(between))


def _selector(value: object, where: str, groups: Sequence[str], nodes: Sequence[str]) -> Selector:
    if isinstance(value, str | list):
        names = _names(value, where)
        for index, name in enumerate(names):
            if name not in nodes:
                raise ScenarioError(f"{where}[{index}]", f"unknown node {name!r}")
        return Selector(nodes=names)
    fields = _Fields(value, where)
    chosen = [key for key in ("nodes", "count", "fraction") if fields.has(key)]
    if len(chosen) != 1:
        raise ScenarioError(where, "give exactly one of nodes, count or fraction")
    group = None
    if fields.has("group"):
        group = _name(fields.get("group"), fields.path("group"))
        if group not in groups:
            raise ScenarioError(fields.path("group"), f"unknown group {group!r}")
    selector: Selector
    if chosen[0] == "nodes":
        names = _names(fields.get("nodes"), fields.path("nodes"))
        for index, name in enumerate(names):
            if name not in nodes:
                raise ScenarioError(f"{fields.path('nodes')}[{index}]", f"unknown node {name!r}")
        if group is not None:
            raise ScenarioError(fields.path("group"), "cannot be combined with nodes")
        selector = Selector(nodes=names)
    elif chosen[0] == "count":
        selector = Selector(count=_integer(fields.get("count"), fields.path("count"), low=1,
                                           what="a positive integer"), group=group)
    else:
        selector = Selector(fraction=_number(fields.get("fraction"), fields.path("fraction"),
                                             low=0.0, low_open=True, high=1.0,
                                             what="a fraction in (0, 1]"), group=group)
    fields.done()
    return selector


def _event(value: object, where: str, groups: Sequence[str], nodes: list[str],
           group_sizes: dict[str, int], partitions: set[str]) -> Event:
    fields = _Fields(value, where)
    at = _number(fields.get("at"), fields.path("at"), low=0.0, what="a time in seconds >= 0")
    kinds = [key for key in ACTIONS if fields.has(key)]
    if len(kinds) != 1:
        unknown = sorted(set(fields.data) - {"at", *ACTIONS})
        if unknown:
            raise ScenarioError(fields.path(unknown[0]), "unknown field")
        raise ScenarioError(where, f"give exactly one action of {', '.join(ACTIONS)}")
    kind = kinds[0]
    body = fields.get(kind)
    here = fields.path(kind)
    action: Action
    if kind in ("crash", "restart", "leave"):
        restart_after = None
        if kind == "crash" and isinstance(body, Mapping) and "restart_after" in body:
            body = dict(body)
            restart_after = _number(body.pop("restart_after"), f"{here}.restart_after",
                                    low=0.0, low_open=True, what="a duration in seconds > 0")
        selector = _selector(body, here, groups, nodes)
        if kind == "crash":
            action = Crash(selector, restart_after)
        elif kind == "restart":
            action = Restart(selector)
        else:
            action = Leave(selector)
    elif kind == "join":
        join = _Fields(body, here)
        count = _integer(join.get("count"), join.path("count"), low=1, what="a positive integer")
        group = _name(join.get("group", groups[0]), join.path("group"))
        if group not in groups:
            raise ScenarioError(join.path("group"), f"unknown group {group!r}")
        join.done()
        first = group_sizes[group]
        group_sizes[group] += count
        grouped = list(groups) != ["n"]
        action = Join(tuple(node_name(group, first + i, grouped) for i in range(count)), group)
    elif kind == "partition":
        part = _Fields(body, here)
        name = _name(part.get("name", f"p{len(partitions)}"), part.path("name"))
        if name in partitions or name == "all":
            raise ScenarioError(part.path("name"), f"partition {name!r} already exists")
        sides = []
        for side in ("a", "b"):
            members = _names(part.get(side), part.path(side))
            for index, member in enumerate(members):
                if member not in groups and member not in nodes:
                    raise ScenarioError(f"{part.path(side)}[{index}]",
                                        f"not a group or node: {member!r}")
            sides.append(members)
        one_way = part.get("one_way", False)
        if not isinstance(one_way, bool):
            raise ScenarioError(part.path("one_way"), f"must be true or false, got "
                                f"{_show(one_way)}")
        part.done()
        partitions.add(name)
        action = Partition(name, sides[0], sides[1], one_way)
    elif kind == "heal":
        name = _name(body, here)
        if name != "all" and name not in partitions:
            raise ScenarioError(here, f"no earlier partition named {name!r}")
        action = Heal(name)
    else:
        loss_fields = _Fields(body, here)
        loss = _probability(loss_fields.get("loss"), loss_fields.path("loss"), below_one=True)
        between = None
        if loss_fields.has("between"):
            pair = _names(loss_fields.get("between"), loss_fields.path("between"))
            if len(pair) != 2:
                raise ScenarioError(loss_fields.path("between"), "must name two groups")
            for name in pair:
                if name not in groups:
                    raise ScenarioError(loss_fields.path("between"), f"unknown group {name!r}")
            between = (pair[0], pair[1])
        loss_fields.done()
        action = SetLoss(loss, between)
    fields.done()
    if isinstance(action, Join):
        nodes.extend(action.names)
    return Event(at, action)


ACTIONS = ("crash", "restart", "leave", "join", "partition", "heal", "loss")


def node_name(group: str, index: int, grouped: bool) -> str:
    """Node names: ``n0, n1, …`` without groups, ``<group>-0, …`` with them."""
    return f"{group}-{index}" if grouped else f"n{index}"


def initial_node_names(nodes: NodesSpec) -> list[str]:
    grouped = [group.name for group in nodes.groups] != ["n"]
    return [node_name(group.name, index, grouped)
            for group in nodes.groups for index in range(group.count)]


ProtocolValidator = Callable[[Mapping[str, object], str], dict[str, Any]]


def _default_protocol_validator(value: Mapping[str, object], where: str) -> dict[str, Any]:
    from sim.cores import validate_protocol

    return validate_protocol(value, where)


def parse_scenario(data: object, *, source: str = "scenario", default_name: str = "scenario",
                   protocol_validator: ProtocolValidator | None = None) -> Scenario:
    """Validates a decoded scenario document. Raises ``ScenarioError`` naming the bad field."""
    try:
        return _parse(data, default_name, protocol_validator or _default_protocol_validator,
                      source)
    except ScenarioError as error:
        raise error.in_source(source) from None


def _parse(data: object, default_name: str, protocol_validator: ProtocolValidator,
           source: str) -> Scenario:
    fields = _Fields(data, "")
    name = _name(fields.get("name", default_name), "name")
    seed = _integer(fields.get("seed", 1), "seed", low=0, what="an integer >= 0")
    duration = _number(fields.get("duration"), "duration", low=0.0, low_open=True,
                       what="a duration in seconds > 0")
    size = fields.get("size", "small")
    if size not in ("small", "large"):
        raise ScenarioError("size", f"must be small or large, got {_show(size)}")
    sample_interval = _number(fields.get("sample_interval", 1.0), "sample_interval", low=0.0,
                              low_open=True, what="a duration in seconds > 0")
    settle_raw = fields.get("settle", 60.0)
    settle = None if settle_raw is None else _number(
        settle_raw, "settle", low=0.0, what="a duration in seconds >= 0 (or null)")
    leave_linger = _number(fields.get("leave_linger", 10.0), "leave_linger", low=0.0,
                           what="a duration in seconds >= 0")
    if not fields.has("nodes"):
        raise ScenarioError("nodes", "missing (give nodes.count or nodes.groups)")
    nodes = _nodes(fields.get("nodes"))
    groups = [group.name for group in nodes.groups]
    network = _network(fields.get("network"), groups)
    protocol_raw = fields.get("protocol", {})
    protocol = protocol_validator(_Fields(protocol_raw or {}, "protocol").data, "protocol")
    core = fields.get("core", "membership")
    if core not in ("membership", "node"):
        raise ScenarioError("core", f"must be membership or node, got {_show(core)}")
    traffic = None
    if fields.get("traffic") is not None:
        if core != "node":
            raise ScenarioError("traffic", "needs core: node (the membership core has no "
                                "data plane)")
        traffic = _traffic(fields.get("traffic"))
    nat = None
    if fields.get("nat") is not None:
        if core != "node":
            raise ScenarioError("nat", "needs core: node (the membership core has no NAT "
                                "traversal)")
        nat = _nat(fields.get("nat"))
    raw_events = fields.get("events", [])
    if raw_events is None:
        raw_events = []
    if not isinstance(raw_events, list):
        raise ScenarioError("events", f"must be a list, got {_show(raw_events)}")
    names = initial_node_names(nodes)
    partitions: set[str] = set()
    group_sizes = {group.name: group.count for group in nodes.groups}
    indexed = sorted(enumerate(raw_events), key=lambda pair: _event_time(pair[1]))
    events = [(index, _event(item, f"events[{index}]", groups, names, group_sizes, partitions))
              for index, item in indexed]
    capacity = ipaddress.IPv4Network(nodes.address_pool).num_addresses - 2
    if len(names) > capacity:
        raise ScenarioError("nodes.address_pool", f"{nodes.address_pool} has room for "
                            f"{max(capacity, 0)} hosts, the scenario starts {len(names)}")
    for index, event in events:
        if event.at >= duration:
            raise ScenarioError(f"events[{index}].at",
                                f"must be before the end of the run ({duration}), got {event.at}")
    fields.done()
    return Scenario(
        name=name, seed=seed, duration=duration, nodes=nodes, network=network,
        events=tuple(event for _, event in events), size=size,
        sample_interval=sample_interval, settle=settle, leave_linger=leave_linger,
        protocol=protocol, source=source, core="node" if core == "node" else "membership",
        traffic=traffic, nat=nat)


def _nat(value: object) -> NatSpec:
    from sim.nat import NAT_TYPES

    fields = _Fields(value, "nat")
    fraction = _probability(fields.get("fraction"), "nat.fraction")
    raw_mix = fields.get("mix", {"port_restricted": 1})
    mix_fields = _Fields(raw_mix, "nat.mix")
    known = ", ".join(NAT_TYPES)
    mix = []
    for key in mix_fields.data:
        if key not in NAT_TYPES:
            raise ScenarioError(f"nat.mix.{key}", f"unknown NAT kind (known: {known})")
        mix.append((key, _number(mix_fields.get(key), f"nat.mix.{key}", low=0.0,
                                 what="a weight >= 0")))
    if not mix or sum(weight for _, weight in mix) <= 0:
        raise ScenarioError("nat.mix", "needs at least one kind with a weight > 0")
    cgnat_type = fields.get("cgnat_type", "port_restricted")
    if cgnat_type not in NAT_TYPES:
        raise ScenarioError("nat.cgnat_type", f"unknown NAT kind (known: {known}), got "
                            f"{_show(cgnat_type)}")
    hairpinning = fields.get("hairpinning", True)
    if not isinstance(hairpinning, bool):
        raise ScenarioError("nat.hairpinning", f"must be true or false, got {_show(hairpinning)}")
    spec = NatSpec(
        fraction=fraction, mix=tuple(mix),
        hosts_per_nat=_integer(fields.get("hosts_per_nat", 1), "nat.hosts_per_nat", low=1,
                               what="a positive integer"),
        timeout=_number(fields.get("timeout", 120.0), "nat.timeout", low=0.0, low_open=True,
                        what="a duration in seconds > 0"),
        hairpinning=hairpinning,
        cgnat=_probability(fields.get("cgnat", 0.0), "nat.cgnat"),
        cgnat_type=str(cgnat_type))
    fields.done()
    return spec


def _traffic(value: object) -> TrafficSpec:
    fields = _Fields(value, "traffic")
    default = TrafficSpec()
    spec = TrafficSpec(
        interval=_number(fields.get("interval", default.interval), "traffic.interval",
                         low=0.0, low_open=True, what="a duration in seconds > 0"),
        start=_number(fields.get("start", default.start), "traffic.start", low=0.0,
                      what="a time in seconds >= 0"),
        payload=_integer(fields.get("payload", default.payload), "traffic.payload", low=13,
                         what="a payload size in bytes, 13-1300"),
        grace=_number(fields.get("grace", default.grace), "traffic.grace", low=0.0,
                      what="a duration in seconds >= 0"))
    if spec.payload > 1300:
        raise ScenarioError("traffic.payload",
                            f"must be a payload size in bytes, 13-1300, got {spec.payload}")
    fields.done()
    return spec


def _event_time(item: object) -> float:
    """Sort key placing events in time order (stable); bad times are reported by _event."""
    if isinstance(item, Mapping):
        at = item.get("at")
        if isinstance(at, int | float) and not isinstance(at, bool) and math.isfinite(at):
            return float(at)
    return -math.inf


def load_scenario(source: str | Path | Mapping[str, object], *,
                  protocol_validator: ProtocolValidator | None = None) -> Scenario:
    """A ``Scenario`` from a YAML file path or an already-decoded mapping."""
    if isinstance(source, Mapping):
        return parse_scenario(source, protocol_validator=protocol_validator)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ScenarioError("", f"cannot read: {error.strerror}", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ScenarioError(where, f"invalid YAML: {problem}", str(path)) from None
    return parse_scenario(data, source=str(path), default_name=_stem_name(path),
                          protocol_validator=protocol_validator)


def _stem_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem)
    return stem if NAME_PATTERN.match(stem) else f"s-{stem}"
