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
