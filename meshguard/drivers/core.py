"""The shape of a sans-IO core that the Linux data plane can drive.

A WireGuard device alone (static peers) or a whole mesh node (SWIM + WireGuard + NAT) both
have it; the event loop knows nothing else about what it drives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from meshguard.sansio.types import Address


class Core(Protocol):
    def receive_datagrams(self, datagrams: Sequence[bytes], addr: Address, now: float) -> None:
        """A batch of datagrams that arrived from one address."""

    def send_packets(self, packets: Sequence[bytes], now: float) -> None:
        """MTU-sized IP packets read from the TUN device."""

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        """Drain the datagrams to send, in order."""

    def tun_packets(self) -> list[bytes]:
        """Drain the IP packets to write to the TUN device, in order."""

    def events(self) -> Sequence[object]:
        """Drain what happened (handshakes, peers up/down, ...), for logging."""

    def next_deadline(self) -> float | None:
        """When ``on_timer`` must next be called (monotonic seconds), or None."""

    def on_timer(self, now: float) -> None:
        """Run whatever is due at ``now``."""


@runtime_checkable
class SplitCore(Core, Protocol):
    """A core that also hands out datagrams to send with a small IP TTL (opening probes)."""

    def split_datagrams_to_send(
        self,
    ) -> tuple[list[tuple[bytes, Address]], list[tuple[bytes, Address, int]]]:
        """Drain (ordinary datagrams, TTL-limited ones with their TTL); the TTL-limited ones
        are sent first."""
