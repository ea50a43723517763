"""What both event loops share: one epoll set, a stop pipe, extra readers and side ports.

``DataPlane`` (our own TUN) and ``ProxyPlane`` (an external WireGuard) differ only in the
descriptors they serve; stopping, the control socket and other readers added while running,
the side ports of port prediction and the core's one timer work the same in both.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable
from typing import Protocol

from meshguard.drivers.side_ports import SideCore, SidePorts


class TimedCore(Protocol):
    def next_deadline(self) -> float | None: ...

    def on_timer(self, now: float) -> None: ...


class PollLoop:
    """The loop skeleton; a subclass serves its own descriptors in ``_ready`` and sends what
    the core produced in ``_flush``."""

    def __init__(self, core: TimedCore, clock: Callable[[], float]) -> None:
        self._timed = core
        self.clock = clock
        self._poller = select.epoll()
        self._stop_read, self._stop_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller.register(self._stop_read, select.EPOLLIN)
        self._stopping = False
        self._readers: dict[int, Callable[[], None]] = {}
        self.side = SidePorts(core, self, clock) if isinstance(core, SideCore) else None
        """Sends the core's fresh-observation datagrams from new ports (port prediction)."""

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` from the loop whenever ``fd`` is readable (e.g. a control socket).

        The callback may use the core; what it makes the core produce is sent right after.
        """
        self._readers[fd] = callback
        self._poller.register(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        del self._readers[fd]
        self._poller.unregister(fd)

    def stop(self) -> None:
        """Ask the loop to return; safe from a signal handler or another thread."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._stop_write, b"x")

    def close(self) -> None:
        if self.side is not None:
            self.side.close()
        self._poller.close()
        os.close(self._stop_read)
        os.close(self._stop_write)

    def run(self) -> None:
        core = self._timed
        while not self._stopping:
            deadline = core.next_deadline()
            timeout = -1.0 if deadline is None else max(0.0, deadline - self.clock())
            for fd, _mask in self._poller.poll(timeout):
                if fd == self._stop_read:
                    self._stopping = True
                elif fd in self._readers:
                    self._readers[fd]()
                    self._flush()
                else:
                    self._ready(fd)
            deadline = core.next_deadline()
            if deadline is not None and self.clock() >= deadline:
                core.on_timer(self.clock())
                self._flush()

    def _ready(self, fd: int) -> None:
        """One of the subclass's own descriptors is readable."""
        raise NotImplementedError

    def _flush(self) -> None:
        """Send, write and report what the core produced."""
        raise NotImplementedError
