"""Parameters of the membership protocol and the formulas that scale them with cluster size.

Every default and formula here is explained in ``docs/swim.md``. The formulas follow
hashicorp/memberlist (SWIM with the Lifeguard extensions), so the two behave alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshguard.sansio.errors import LocalProtocolError

PUSH_PULL_SCALE_THRESHOLD = 32
"""Clusters larger than this stretch the push-pull interval (see ``push_pull_period``)."""


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Membership parameters; the defaults are the WAN profile (``SwimConfig.wan()``).

    Times are seconds. ``docs/swim.md`` describes each one and the LAN profile.
    """

    protocol_period: float = 1.0
    """Time between two probes of a healthy node (stretched by local health)."""
    probe_timeout: float = 0.5
    """How long a direct probe waits for its ack before asking helpers."""
    indirect_probes: int = 3
    """k: helpers asked to probe a target that missed its direct ack."""
    suspicion_min_multiplier: float = 4.0
    """Shortest suspicion: this × max(1, log10 N) × protocol_period."""
    suspicion_max_multiplier: float = 6.0
    """Longest suspicion (no confirmations yet): this × the shortest suspicion."""
    suspicion_confirmations: int = 2
    """Independent confirmations that shrink a suspicion to its shortest timeout."""
    retransmit_multiplier: int = 4
    """λ: each piggybacked update is sent λ × ceil(log10(N + 1)) times."""
    gossip_interval: float = 0.5
    """Extra gossip round while updates are queued (0 disables: piggyback on probes only)."""
    gossip_nodes: int = 3
    """Members sent queued updates per gossip round."""
    push_pull_interval: float = 30.0
    """Full state exchange with one random member, stretched for clusters above 32."""
    reconnect_interval: float = 30.0
    """How often a node may try to reach one dead member at its last known address."""
    dead_reap_after: float = 3600.0
    """How long a dead or left member is remembered before it is forgotten."""
    awareness_max: int = 8
    """Local health multiplies probe period and timeout by at most this."""
    sync_reply_min_interval: float = 1.0
    """A member asking for our full state more often than this gets no second reply."""

    def __post_init__(self) -> None:
        positive = (
            "protocol_period",
            "probe_timeout",
            "push_pull_interval",
            "reconnect_interval",
            "dead_reap_after",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
                raise LocalProtocolError(f"SwimConfig.{name} must be a positive number of seconds")
        if self.probe_timeout >= self.protocol_period:
            raise LocalProtocolError(
                "SwimConfig.probe_timeout must be shorter than protocol_period"
            )
        if self.gossip_interval < 0 or not math.isfinite(self.gossip_interval):
            raise LocalProtocolError("SwimConfig.gossip_interval must be 0 (off) or positive")
        if self.sync_reply_min_interval < 0:
            raise LocalProtocolError("SwimConfig.sync_reply_min_interval must not be negative")
        counts = {
            "indirect_probes": 0,
            "suspicion_confirmations": 0,
            "gossip_nodes": 0,
            "retransmit_multiplier": 1,
            "awareness_max": 1,
        }
        for name, least in counts.items():
            value = getattr(self, name)
            if type(value) is not int or value < least:
                raise LocalProtocolError(f"SwimConfig.{name} must be an integer ≥ {least}")
        if not self.suspicion_min_multiplier > 0 or self.suspicion_max_multiplier < 1:
            raise LocalProtocolError(
                "SwimConfig.suspicion_min_multiplier must be > 0 and suspicion_max_multiplier ≥ 1"
            )

    @classmethod
    def wan(cls) -> SwimConfig:
        """Defaults for members spread over the Internet (RTTs up to ~300 ms)."""
        return cls()

    @classmethod
    def lan(cls) -> SwimConfig:
        """Faster detection for members on one low-latency network."""
        return cls(
            protocol_period=0.5,
            probe_timeout=0.2,
            gossip_interval=0.2,
            push_pull_interval=15.0,
            reconnect_interval=15.0,
            dead_reap_after=900.0,
        )

    def retransmit_limit(self, members: int) -> int:
        """Times each update is piggybacked: λ × ceil(log10(N + 1)), memberlist's step function
        (the smooth ceil(λ × log10(N + 1)) was measured to cost reliability: docs/swim.md)."""
        return self.retransmit_multiplier * max(1, math.ceil(math.log10(members + 1)))

    def suspicion_timeouts(self, members: int) -> tuple[float, float]:
        """(shortest, longest) suspicion for a cluster of ``members`` (self included)."""
        node_scale = max(1.0, math.log10(max(1, members)))
        shortest = self.suspicion_min_multiplier * node_scale * self.protocol_period
        return shortest, self.suspicion_max_multiplier * shortest

    def confirmations_wanted(self, members: int) -> int:
        """Confirmations to expect: none when the cluster is too small to provide them."""
        if members - 2 < self.suspicion_confirmations:
            return 0
        return self.suspicion_confirmations

    def push_pull_period(self, members: int) -> float:
        """push_pull_interval × (ceil(log2 N − log2 32) + 1) once N exceeds 32."""
        if members <= PUSH_PULL_SCALE_THRESHOLD:
            return self.push_pull_interval
        multiplier = math.ceil(math.log2(members) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1
        return self.push_pull_interval * multiplier
