"""Datagrams sent each from a new ephemeral UDP port: fresh NAT observations.

Behind a NAT that maps per destination, the mesh port's mappings were all made long ago, so
a STUN answer on it says nothing about where the NAT's port counter is now. Port prediction
needs that, and only a brand-new mapping shows it: the Node asks STUN from a new local port
(``Node.side_datagrams_to_send``). This module opens one socket per such datagram, hands
what comes back to ``Node.receive_side_datagram`` for a few seconds, then closes it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol, runtime_checkable

from meshguard.sansio.types import Address

__all__ = ["SIDE_PORT_LIFETIME", "SideCore", "SidePorts"]

SIDE_PORT_LIFETIME = 3.0
"""Seconds a side port stays open for its answer (STUN from a member is one round trip)."""
_RECEIVE_BYTES = 2048


@runtime_checkable
class SideCore(Protocol):
    def side_datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Drain the datagrams to send each from a new ephemeral port."""

    def receive_side_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """A datagram that came back to one of those ports."""


class ReaderHost(Protocol):
    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...


class SidePorts:
    """The open side ports of one event loop."""

    def __init__(self, core: SideCore, loop: ReaderHost, clock: Callable[[], float]) -> None:
        self.core = core
        self.loop = loop
        self.clock = clock
        self.send_errors = 0
        self._open: dict[int, tuple[socket.socket, float]] = {}

    def flush(self) -> None:
        """Send what the core queued, each from a new port, and close expired ports."""
        now = self.clock()
        self.expire(now)
        self.send(self.core.side_datagrams_to_send(), now)

    def send(self, datagrams: Sequence[tuple[bytes, Address]], now: float) -> None:
        for data, addr in datagrams:
            family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            try:
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                sock.sendto(data, addr)
            except OSError:
                sock.close()
                self.send_errors += 1
                continue
            fd = sock.fileno()
            self._open[fd] = (sock, now + SIDE_PORT_LIFETIME)
            self.loop.add_reader(fd, partial(self._readable, fd))

    def _readable(self, fd: int) -> None:
        entry = self._open.get(fd)
        if entry is None:
            return
        sock = entry[0]
        while True:
            try:
                data, source = sock.recvfrom(_RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.core.receive_side_datagram(data, (source[0], source[1]), self.clock())

    def expire(self, now: float) -> None:
        for fd, (sock, until) in list(self._open.items()):
            if now >= until:
                self._close(fd, sock)

    def close(self) -> None:
        for fd, (sock, _) in list(self._open.items()):
            self._close(fd, sock)

    def _close(self, fd: int, sock: socket.socket) -> None:
        self.loop.remove_reader(fd)
        sock.close()
        del self._open[fd]

    def __len__(self) -> int:
        return len(self._open)
