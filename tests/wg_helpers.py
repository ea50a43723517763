"""Two in-memory WireGuard devices joined by a hand-driven link, for the test_wg_* tests."""

from __future__ import annotations

import ipaddress
import random
import struct
from collections.abc import Callable

from meshguard.sansio.types import Address
from meshguard.sansio.wireguard import DeviceConfig, WireGuardDevice

A_ADDR: Address = ("192.0.2.1", 51820)
B_ADDR: Address = ("192.0.2.2", 51820)
A_IP = "10.0.0.1"
B_IP = "10.0.0.2"


def seeded_entropy(seed: int) -> Callable[[int], bytes]:
    stream = random.Random(seed)
    return lambda n: stream.randbytes(n)


class FakeWallClock:
    """A wall clock for TAI64N timestamps: a second later at every reading, so successive
    handshakes carry newer timestamps; tests move ``now`` by hand to go back in time."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make_device(
    seed: int, wall: FakeWallClock, config: DeviceConfig | None = None
) -> WireGuardDevice:
    entropy = seeded_entropy(seed)
    return WireGuardDevice(
        entropy(32),
        entropy=entropy,
        rng=random.Random(seed),
        wallclock=wall,
        config=config or DeviceConfig(),
    )


def ipv4_packet(src: str, dst: str, payload: bytes = b"", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"", next_header: int = 17) -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        next_header,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


class Pair:
    """Devices A and B, each a peer of the other, and a link the test pumps explicitly."""

    def __init__(
        self,
        seed: int = 1,
        psk_a: bytes | None = None,
        psk_b: bytes | None = None,
        config_a: DeviceConfig | None = None,
        config_b: DeviceConfig | None = None,
        keepalive_a: float | None = None,
        now: float = 0.0,
    ) -> None:
        self.wall = FakeWallClock()
        self.a = make_device(seed * 2, self.wall, config_a)
        self.b = make_device(seed * 2 + 1, self.wall, config_b)
        self.a.add_peer(
            self.b.public_key,
            allowed_ips=[ipaddress.ip_network(f"{B_IP}/32"), ipaddress.ip_network("fd00::2/128")],
            endpoint=B_ADDR,
            preshared_key=psk_a,
            persistent_keepalive=keepalive_a,
            now=now,
        )
        self.b.add_peer(
            self.a.public_key,
            allowed_ips=[ipaddress.ip_network(f"{A_IP}/32"), ipaddress.ip_network("fd00::1/128")],
            endpoint=A_ADDR,
            preshared_key=psk_b,
            now=now,
        )

        self.sent: list[tuple[float, str, int, int]] = []
        """Every datagram either side emitted: (time, "a" or "b", message type, size)."""
        self.a_to_b_up = True
        self.b_to_a_up = True

    def _drain(self, now: float) -> tuple[list[bytes], list[bytes]]:
        from_a = [data for data, _ in self.a.datagrams_to_send()]
        from_b = [data for data, _ in self.b.datagrams_to_send()]
        self.sent += [(now, "a", data[0], len(data)) for data in from_a]
        self.sent += [(now, "b", data[0], len(data)) for data in from_b]
        return (from_a if self.a_to_b_up else []), (from_b if self.b_to_a_up else [])

    def deliver(self, now: float, *, a_from: Address = B_ADDR, b_from: Address = A_ADDR) -> int:
        """Move every queued datagram across (unless that direction is down) until quiet."""
        moved = 0
        while True:
            from_a, from_b = self._drain(now)
            if not from_a and not from_b:
                return moved
            for data in from_a:
                self.b.receive_datagram(data, b_from, now)
            for data in from_b:
                self.a.receive_datagram(data, a_from, now)
            moved += len(from_a) + len(from_b)

    def advance(self, until: float) -> None:
        """Fire both devices' timers in time order up to ``until``, delivering as we go."""
        while True:
            due = [
                d for d in (self.a.next_deadline(), self.b.next_deadline())
                if d is not None and d <= until
            ]
            if not due:
                return
            at = min(due)
            self.a.on_timer(at)
            self.b.on_timer(at)
            self.deliver(at)

    def sends(self, side: str, message_type: int) -> list[float]:
        """Times at which ``side`` emitted datagrams of ``message_type``."""
        return [t for t, s, kind, _ in self.sent if s == side and kind == message_type]

    def handshake(self, now: float) -> None:
        self.a.initiate_handshake(self.b.public_key, now)
        self.deliver(now)
