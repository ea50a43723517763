"""Lifeguard's two local mechanisms: health awareness and shrinking suspicion timeouts.

Lifeguard (Dadgar et al., 2018; hashicorp/memberlist ``awareness.go``, ``suspicion.go``)
makes SWIM robust to slow or overloaded members:

- a node that keeps missing acks and nacks is more likely to be the sick one itself, so it
  stretches its own probe period and timeouts instead of accusing healthy peers;
- a suspicion starts long and shrinks as independent members confirm it, so a real failure is
  declared quickly while a lone mistaken accuser gives its target plenty of time to refute.
"""

from __future__ import annotations

import math


class Awareness:
    """Local health score in 0..maximum-1; timeouts are multiplied by score + 1."""

    __slots__ = ("maximum", "score")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.score = 0

    def apply(self, delta: int) -> None:
        """Raise (bad news about ourselves) or lower (a probe went well) the score, clamped."""
        self.score = min(self.maximum - 1, max(0, self.score + delta))

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)


def suspicion_timeout(confirmations: int, wanted: int, shortest: float, longest: float) -> float:
    """Total suspicion time after ``confirmations`` of ``wanted`` independent confirmations.

    longest − (longest − shortest) · log(c + 1) / log(k + 1), never below ``shortest``;
    ``shortest`` straight away when no confirmations are expected (k = 0).
    """
    if wanted < 1:
        return shortest
    fraction = math.log(confirmations + 1) / math.log(wanted + 1)
    return max(shortest, longest - fraction * (longest - shortest))


class Suspicion:
    """The timer of one suspected member and who has independently accused it.

    ``last_chance_probe`` is the seq of the probe sent when the timer ran out (0: none in
    flight): while it runs the member is not declared dead, and its outcome decides.
    """

    __slots__ = (
        "accusers",
        "confirmations",
        "last_chance_probe",
        "longest",
        "shortest",
        "start",
        "wanted",
    )

    def __init__(
        self, accuser: bytes, start: float, shortest: float, longest: float, wanted: int
    ) -> None:
        self.start = start
        self.shortest = shortest
        self.longest = longest
        self.wanted = wanted
        self.confirmations = 0
        self.accusers: dict[bytes, None] = {accuser: None}
        self.last_chance_probe = 0

    @property
    def deadline(self) -> float:
        """When the member is declared dead unless it refutes first."""
        timeout = suspicion_timeout(self.confirmations, self.wanted, self.shortest, self.longest)
        return self.start + timeout

    def restart(self, now: float) -> None:
        """Start the timer again from ``now`` (the member answered the last-chance probe)."""
        self.start = now
        self.last_chance_probe = 0

    def confirm(self, accuser: bytes) -> bool:
        """Count an accusation by ``accuser``; True if it is new information worth gossiping.

        The first accuser and repeat accusers do not count, and once ``wanted`` confirmations
        are in the timer is at its shortest, so further ones change nothing.
        """
        if self.confirmations >= self.wanted or accuser in self.accusers:
            return False
        self.accusers[accuser] = None
        self.confirmations += 1
        return True
