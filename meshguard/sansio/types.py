"""Small types shared by every machine in the core."""

from collections.abc import Callable

Address = tuple[str, int]
"""A UDP endpoint as (IP address string, port), the form sockets and the simulator use."""

Entropy = Callable[[int], bytes]
"""Returns n unpredictable bytes: ``os.urandom`` in production, a seeded stream in the simulator."""

WallClock = Callable[[], float]
"""Seconds since the Unix epoch; only the TAI64N handshake timestamp uses it (DESIGN.md §3)."""
