"""Real hosts on one machine: Linux network namespaces joined by veth pairs (needs root).

Used by ``meshguard demo`` and by the tests (``tests/netns.py`` re-exports it). A ``Lab`` owns
everything it creates (namespaces, processes) and removes it on exit, even when a test or the
demo fails, so nothing leaks onto the machine. Names carry a random suffix so parallel or
leftover runs never collide. Processes are killed by PID.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

__all__ = [
    "Lab",
    "Namespace",
    "add_bridge",
    "plug_into_bridge",
    "run",
    "wait_until",
]


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command on the host, capturing text output; failures raise with stderr shown."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Namespace:
    """One network namespace: a host of the test network."""

    name: str
    lab: Lab

    def exec_argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return run(self.exec_argv(cmd), check=check, timeout=timeout)

    def popen(
        self, cmd: Sequence[str], *, env: dict[str, str] | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in this namespace; the lab kills it on exit."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.exec_argv(cmd),
            env={**os.environ, **(env or {})},
            start_new_session=True,
            **kwargs,
        )
        self.lab.processes.append(proc)
        return proc

    def sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"])


@dataclass
class Lab:
    """A set of namespaces and processes that is torn down as a whole."""

    prefix: str = "mgt"
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[Namespace] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)
    _links: int = 0

    def namespace(self, role: str) -> Namespace:
        """Create a namespace with loopback up; ``role`` names it in listings."""
        ns = Namespace(f"{self.prefix}-{role}-{self.suffix}", self)
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def link(
        self,
        a: Namespace,
        b: Namespace,
        addr_a: str | None = None,
        addr_b: str | None = None,
        *,
        mtu: int | None = None,
    ) -> tuple[str, str]:
        """Join two namespaces by a veth pair, optionally addressed (CIDR strings).

        Returns the interface names (in a, in b).
        """
        self._links += 1
        if_a, if_b = f"v{self._links}a{self.suffix}", f"v{self._links}b{self.suffix}"
        run(
            [
                "ip",
                "link",
                "add",
                if_a,
                "netns",
                a.name,
                "type",
                "veth",
                "peer",
                "name",
                if_b,
                "netns",
                b.name,
            ]
        )
        for ns, ifname, addr in ((a, if_a, addr_a), (b, if_b, addr_b)):
            if mtu is not None:
                ns.run(["ip", "link", "set", ifname, "mtu", str(mtu)])
            if addr is not None:
                ns.run(
                    ["ip", "addr", "add", addr, "dev", ifname, *(["nodad"] if ":" in addr else [])]
                )
            ns.run(["ip", "link", "set", ifname, "up"])
        return if_a, if_b

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10
    ) -> int:
        """Signal one process by PID and wait for it; escalate to SIGKILL if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.processes):
            self.stop(proc, timeout=5)
        for cleanup in reversed(self.cleanups):
            cleanup()
        for ns in reversed(self.namespaces):
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> None:
    """Poll ``predicate`` until it holds; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def add_bridge(ns: Namespace, name: str) -> str:
    """Create a Linux bridge in ``ns`` (a switch for a simulated LAN), up, multicast flooded.

    Multicast snooping is off so mDNS reaches every port without an IGMP querier.
    """
    ns.run(["ip", "link", "add", name, "type", "bridge", "mcast_snooping", "0"])
    ns.run(["ip", "link", "set", name, "up"])
    return name


def plug_into_bridge(
    lab: Lab, host: Namespace, switch: Namespace, bridge: str, address: str | None
) -> str:
    """Connect ``host`` to ``bridge`` (in ``switch``) by a veth pair, ``address`` on the host
    side; returns the host's interface name."""
    host_if, switch_if = lab.link(host, switch, address, None)
    switch.run(["ip", "link", "set", switch_if, "master", bridge])
    return host_if
