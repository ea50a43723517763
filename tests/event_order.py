"""The one scheduling step shared by the hand-driven networks of Nodes in the tests."""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol


class Timed(Protocol):
    def next_deadline(self) -> float | None: ...


def next_event(
    nodes: Sequence[Timed],
    in_flight: Sequence[tuple[float, ...]],
    end: float,
    *,
    skip: Container[int] = (),
) -> tuple[float, int | None] | None:
    """The next thing to happen no later than ``end``: (when, index of the node whose timer
    is due) or (when, None) for the first datagram of the heap ``in_flight``; None if nothing
    happens by ``end``. A datagram arriving at a node's deadline goes first."""
    deadlines = [
        (deadline, index)
        for index, node in enumerate(nodes)
        if index not in skip and (deadline := node.next_deadline()) is not None
    ]
    timer = min(deadlines, default=(float("inf"), -1))
    datagram = in_flight[0][0] if in_flight else float("inf")
    moment = min(timer[0], datagram)
    if moment > end:
        return None
    return (moment, None) if datagram <= timer[0] else (moment, timer[1])
