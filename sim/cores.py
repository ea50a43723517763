"""The node cores the simulator drives, and how it builds them.

The runner only needs the sans-IO surface (``Core``); ``membership_core`` builds the real
``meshguard.sansio.swim.Membership``. A later composed ``Node`` (data plane, NAT traversal)
plugs in as another ``CoreFactory`` without touching the runner.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshguard.identity.keys import Identity
from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.types import Address, Entropy
from sim.metrics import MemberViewLike
from sim.scenario import ScenarioError


class Core(Protocol):
    """The sans-IO surface the simulator drives (DESIGN.md §3)."""

    def join(self, seeds: Sequence[Address], now: float, *,
             seed_keys: Sequence[bytes] = ()) -> None: ...
    def leave(self, now: float) -> None: ...
    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None: ...
    def datagrams_to_send(self) -> list[tuple[bytes, Address]]: ...
    def events(self) -> Sequence[object]: ...
    def next_deadline(self) -> float | None: ...
    def on_timer(self, now: float) -> None: ...
    def member(self, public_key: bytes) -> MemberViewLike | None: ...
    def members(self) -> Sequence[MemberViewLike]: ...


@dataclass(frozen=True, slots=True)
class HostContext:
    """Everything a core factory may use to build one node's core for one life."""

    name: str
    identity: Identity
    address: Address
    trusted_keys: tuple[bytes, ...]
    rng: random.Random
    entropy: Entropy
    now: float
    protocol: Mapping[str, Any]
    behind_nat: bool = False
    """A NAT device sits in front of ``address`` (scenario ``nat:``)."""


CoreFactory = Callable[[HostContext], Core]


def validate_protocol(value: Mapping[str, object], where: str) -> dict[str, Any]:
    """Checks a scenario's ``protocol`` section against ``SwimConfig``'s fields.

    ``profile`` (wan or lan) picks the base profile; any other key overrides one field.
    """
    from meshguard.sansio.swim_config import SwimConfig

    names = {item.name for item in dataclasses.fields(SwimConfig)}
    for key in value:
        if key != "profile" and key not in names:
            raise ScenarioError(f"{where}.{key}", f"unknown field (SwimConfig has: "
                                f"profile, {', '.join(sorted(names))})")
    profile = value.get("profile", "wan")
    if profile not in ("wan", "lan"):
        raise ScenarioError(f"{where}.profile", f"must be wan or lan, got {profile!r}")
    try:
        swim_config(value)
    except (LocalProtocolError, TypeError) as error:
        raise ScenarioError(where, str(error)) from None
    return dict(value)


def swim_config(protocol: Mapping[str, Any]) -> Any:
    """The ``SwimConfig`` a scenario's ``protocol`` section describes."""
    from meshguard.sansio.swim_config import SwimConfig

    base = SwimConfig.lan() if protocol.get("profile") == "lan" else SwimConfig.wan()
    overrides = {key: value for key, value in protocol.items() if key != "profile"}
    return dataclasses.replace(base, **overrides)


def membership_core(host: HostContext) -> Core:
    """A real SWIM ``Membership`` advertising the host's one address."""
    from meshguard.sansio.messages import Endpoint
    from meshguard.sansio.swim import Membership

    core: Core = Membership(
        host.identity,
        config=swim_config(host.protocol),
        trusted_keys=host.trusted_keys,
        advertised_endpoints=[Endpoint(host.address[0], host.address[1])],
        rng=host.rng,
        entropy=host.entropy,
        now=host.now,
    )
    return core


WALLCLOCK_EPOCH = 1_800_000_000.0
"""Simulated wall clock = epoch + simulated time, so a restarted node's WireGuard handshake
timestamps still move forward (its peers reject replayed or older ones)."""


class NodeCore:
    """The composed ``meshguard.sansio.node.Node`` (SWIM, WireGuard, NAT traversal) behind
    the simulator's ``Core`` surface, plus the data plane (``send_packets``, ``tun_packets``)
    and the path table (``paths``).

    ``events()`` hands the membership tracker only SWIM's events; tunnel and path events
    are counted in ``event_counts`` so the summary still shows them.
    """

    def __init__(self, host: HostContext, *, nat: Any = None, allow_relay: bool = True) -> None:
        from meshguard.sansio.messages import Endpoint
        from meshguard.sansio.node import Node, NodeConfig

        self._now = host.now
        self.event_counts: dict[str, int] = {}
        self.node = Node(
            host.identity,
            config=NodeConfig(swim=swim_config(host.protocol), nat=nat,
                              allow_relay=allow_relay, side_port_stun=True),
            trusted_keys=host.trusted_keys,
            advertised_endpoints=[Endpoint(host.address[0], host.address[1])],
            rng=host.rng,
            entropy=host.entropy,
            wallclock=self._wallclock,
            now=host.now,
        )
        self.counters = self.node.counters

    def _wallclock(self) -> float:
        return WALLCLOCK_EPOCH + self._now

    def join(self, seeds: Sequence[Address], now: float, *,
             seed_keys: Sequence[bytes] = ()) -> None:
        self._now = now
        self.node.join(seeds, now)

    def leave(self, now: float) -> None:
        self._now = now
        self.node.leave(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        self._now = now
        self.node.receive_datagram(data, addr, now)

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        return self.node.datagrams_to_send()

    def side_datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """STUN requests the runner sends each from a new port of the host (fresh NAT
        observations for port prediction)."""
        return self.node.side_datagrams_to_send()

    def receive_side_datagram(self, data: bytes, addr: Address, now: float) -> None:
        self._now = now
        self.node.receive_side_datagram(data, addr, now)

    def events(self) -> Sequence[object]:
        from meshguard.sansio.swim import MembershipEvent

        membership: list[object] = []
        for event in self.node.events():
            if isinstance(event, MembershipEvent):
                membership.append(event)
            else:
                kind = type(event).__name__
                self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        return membership

    def next_deadline(self) -> float | None:
        return self.node.next_deadline()

    def on_timer(self, now: float) -> None:
        self._now = now
        self.node.on_timer(now)

    def member(self, public_key: bytes) -> MemberViewLike | None:
        view: MemberViewLike | None = self.node.membership.member(public_key)
        return view

    def members(self) -> Sequence[MemberViewLike]:
        views: Sequence[MemberViewLike] = self.node.membership.members()
        return views

    def send_packets(self, packets: Sequence[bytes], now: float) -> None:
        self._now = now
        self.node.send_packets(packets, now)

    def tun_packets(self) -> list[bytes]:
        return self.node.tun_packets()

    def path_kinds(self) -> dict[bytes, str]:
        """The kind of path (direct, punched, relayed, unreachable, connecting) per member."""
        return {key: info.kind.value for key, info in self.node.paths().items()}


def node_core(host: HostContext) -> Core:
    """The composed ``Node``. On a public address it says so and relays for others; behind a
    NAT it learns its mapping and NAT type from public members by STUN, as a real one would.
    """
    from meshguard.sansio.messages import NatFiltering, NatInfo, NatMapping

    if host.behind_nat:
        return NodeCore(host, nat=None, allow_relay=False)
    return NodeCore(host, nat=NatInfo(NatMapping.NONE, NatFiltering.ENDPOINT_INDEPENDENT))
