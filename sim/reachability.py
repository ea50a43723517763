"""Which pairs of simulated hosts can in principle connect without a relay.

``classify_pair`` reads the NAT devices in front of two hosts (``sim.nat``) and says how the
pair can connect, whatever the protocol does:

- ``DIRECT``: one side can simply send to the other. Both sit behind the same innermost NAT
  (they share a LAN), or one side has no NAT, or one side's NATs add up to a full cone
  (endpoint-independent mapping and filtering: its public mapping, learned by STUN, takes
  packets from anyone).
- ``PUNCHABLE``: both sides must send at the same time (hole punching), and it works with
  what each side knows: both map endpoint-independently (each knows the other's mapping;
  any filtering opens when it sends there first), or one side maps per destination and the
  other maps endpoint-independently and filters by address only (its probes to the
  dependent side's IP let every port of that IP in, so the unknown port does not matter).
- ``PREDICTION``: one side maps per destination with ports in sequence, the other maps
  endpoint-independently but filters by address and port. The other side must send to the
  exact port the dependent side's NAT will pick toward it, guessed from a port observed
  earlier (port prediction). That works only if few mappings were made in between: a
  meshguard node has one UDP port, so the freshest observation it can get is the mapping a
  rendezvous member saw, made when the node first talked to it; every flow since (to other
  members, and other hosts' flows through a shared NAT) moves the port on.
- ``RELAY_ONLY``: both sides map per destination (neither side's port toward the other can
  be known before it sends, and each probe makes a new one), or one maps per destination
  with random ports against a side that filters by address and port, or the two share a
  NAT device that does not hairpin (they only know each other's addresses beyond it).

Several NATs in front of a host (carrier-grade NAT) add up, innermost first: the mapping is
endpoint-independent only if every device's is (address-and-port-dependent if any device's
is), filtering is the strictest of the devices', and the ports the world sees are allocated
by the outermost device (a new inner flow is a new flow there too), so prediction depends on
that device alone. Two hosts behind the same outer device (but different inner ones) reach
each other's public mappings through it when it hairpins, so the whole chain counts for
each side, as for hosts on the open Internet.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sim.nat import Filtering, Mapping, Nat, NatPlan

__all__ = ["EffectiveNat", "PairClass", "classify_pair", "effective_nat", "nat_chain",
           "punchability_summary"]


class PairClass(enum.Enum):
    DIRECT = "direct"
    PUNCHABLE = "punchable"
    PREDICTION = "prediction"
    RELAY_ONLY = "relay_only"


_MAPPING_ORDER = (Mapping.ENDPOINT_INDEPENDENT, Mapping.ADDRESS_DEPENDENT,
                  Mapping.ADDRESS_AND_PORT_DEPENDENT)
_FILTERING_ORDER = (Filtering.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_DEPENDENT,
                    Filtering.ADDRESS_AND_PORT_DEPENDENT)


@dataclass(frozen=True, slots=True)
class EffectiveNat:
    """What a chain of NAT devices looks like from beyond its outermost device."""

    mapping: Mapping
    filtering: Filtering
    predictable: bool
    """New mappings get ports in sequence (the outermost device does not randomise)."""

    @property
    def full_cone(self) -> bool:
        return (self.mapping is Mapping.ENDPOINT_INDEPENDENT
                and self.filtering is Filtering.ENDPOINT_INDEPENDENT)


def nat_chain(plan: NatPlan, host: str) -> tuple[Nat, ...]:
    """The NAT devices in front of ``host``, innermost first (empty: a public host)."""
    inner = plan.front_of.get(host)
    if inner is None:
        return ()
    outer_of = {ip: device for device in plan.devices.values() for ip in device.inside}
    chain = [inner]
    while chain[-1].public_ip in outer_of:
        chain.append(outer_of[chain[-1].public_ip])
    return tuple(chain)


def effective_nat(chain: Sequence[Nat]) -> EffectiveNat | None:
    """The devices of ``chain`` (innermost first) added up; None for no NAT at all."""
    if not chain:
        return None
    mapping = max((d.behaviour.mapping for d in chain), key=_MAPPING_ORDER.index)
    filtering = max((d.behaviour.filtering for d in chain), key=_FILTERING_ORDER.index)
    return EffectiveNat(mapping, filtering, predictable=not chain[-1].behaviour.random_ports)


def classify_pair(a: Sequence[Nat], b: Sequence[Nat]) -> PairClass:
    """How hosts behind the NAT chains ``a`` and ``b`` (innermost first) can connect."""
    if a and b and a[0] is b[0]:
        return PairClass.DIRECT
    shared = [device for device in a if any(device is other for other in b)]
    if shared and not shared[0].behaviour.hairpinning:
        return PairClass.RELAY_ONLY
    side_a, side_b = effective_nat(a), effective_nat(b)
    if side_a is None or side_b is None or side_a.full_cone or side_b.full_cone:
        return PairClass.DIRECT
    a_fixed = side_a.mapping is Mapping.ENDPOINT_INDEPENDENT
    b_fixed = side_b.mapping is Mapping.ENDPOINT_INDEPENDENT
    if a_fixed and b_fixed:
        return PairClass.PUNCHABLE
    if not a_fixed and not b_fixed:
        return PairClass.RELAY_ONLY
    fixed, dependent = (side_a, side_b) if a_fixed else (side_b, side_a)
    if fixed.filtering is not Filtering.ADDRESS_AND_PORT_DEPENDENT:
        return PairClass.PUNCHABLE
    return PairClass.PREDICTION if dependent.predictable else PairClass.RELAY_ONLY


WITHOUT_RELAY = ("direct", "punched")
"""Path kinds (``PathKind`` values) that reach a member without a relay."""


def punchability_summary(plan: NatPlan, live: Sequence[tuple[str, bytes, dict[bytes, str]]],
                         examples: int = 10) -> dict[str, Any]:
    """Ordered live pairs by class, and those of each class that could avoid a relay but
    whose path is anything else (relayed, unreachable, still connecting, none).

    ``live`` holds (host name, public key, path kind by member key) per live host.
    ``pairs_punchable_but_relayed`` counts DIRECT and PUNCHABLE pairs,
    ``pairs_prediction_but_relayed`` PREDICTION ones.
    """
    chains = {name: nat_chain(plan, name) for name, _, _ in live}
    by_class = dict.fromkeys((c.value for c in PairClass), 0)
    missed = dict.fromkeys((PairClass.DIRECT, PairClass.PUNCHABLE, PairClass.PREDICTION), 0)
    missed_kinds: dict[str, int] = {}
    shown: list[str] = []
    for name, _, kinds in live:
        for other, other_key, _ in live:
            if other == name:
                continue
            pair_class = classify_pair(chains[name], chains[other])
            by_class[pair_class.value] += 1
            kind = kinds.get(other_key, "none")
            if pair_class is PairClass.RELAY_ONLY or kind in WITHOUT_RELAY:
                continue
            missed[pair_class] += 1
            if pair_class is PairClass.PREDICTION:
                continue
            label = f"{plan.kind_of.get(name, 'public')}->{plan.kind_of.get(other, 'public')}"
            missed_kinds[label] = missed_kinds.get(label, 0) + 1
            if len(shown) < examples:
                shown.append(f"{name}->{other} {pair_class.value} {kind}")
    return {
        "pairs_by_class": by_class,
        "pairs_punchable_but_relayed": missed[PairClass.DIRECT] + missed[PairClass.PUNCHABLE],
        "pairs_prediction_but_relayed": missed[PairClass.PREDICTION],
        "punchable_but_relayed_by_nat": dict(sorted(missed_kinds.items())),
        "punchable_but_relayed_examples": shown,
    }
