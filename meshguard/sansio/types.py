"""Small types shared by every machine in the core."""

from collections.abc import Callable, MutableSequence, Sequence
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")

Address = tuple[str, int]
"""A UDP endpoint as (IP address string, port), the form sockets and the simulator use."""

Entropy = Callable[[int], bytes]
"""Returns n unpredictable bytes: ``os.urandom`` in production, a seeded stream in the simulator."""

WallClock = Callable[[], float]
"""Seconds since the Unix epoch; only the TAI64N handshake timestamp uses it (DESIGN.md §3)."""


class RandomSource(Protocol):
    """What the core uses of a ``random.Random`` (the core may not import ``random``)."""

    def random(self) -> float: ...

    def uniform(self, a: float, b: float) -> float: ...

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int: ...

    def randint(self, a: int, b: int) -> int: ...

    def getrandbits(self, k: int, /) -> int: ...

    def shuffle(self, x: MutableSequence[Any]) -> None: ...

    def choice(self, seq: Sequence[_T]) -> _T: ...
