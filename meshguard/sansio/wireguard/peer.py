"""Per-peer state: session keys, the handshake in flight, and WireGuard's timers.

The timers follow wireguard-go's device/timers.go. Each is an absolute deadline (or ``None``
when stopped); the ``on_*`` methods are the timer transitions the whitepaper attaches to
protocol events, and the device acts when a deadline expires. Transport batches call these
once per batch, not once per packet: every transition is idempotent within one ``now``.
"""

from __future__ import annotations

from collections import deque

from meshguard.sansio.types import Address, RandomSource

from .constants import (
    KEEPALIVE_TIMEOUT,
    NEW_HANDSHAKE_AFTER,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX_MS,
    ZERO_KEY_MATERIAL_AFTER,
)
from .cookie import CookieGenerator
from .keypair import Keypair
from .noise import InitiationState

_INF = float("inf")


def rekey_jitter(rng: RandomSource) -> float:
    """A whole number of milliseconds below REKEY_TIMEOUT_JITTER_MAX_MS, as wireguard-go."""
    return int(rng.random() * REKEY_TIMEOUT_JITTER_MAX_MS) / 1000.0


class Peer:
    """Everything the device knows about one peer, keyed by its static public key."""

    __slots__ = (
        "cookies",
        "current",
        "endpoint",
        "handshake_attempts",
        "initiation",
        "keepalive_at",
        "last_handshake_wall",
        "last_initiation_consumed",
        "last_sent_handshake",
        "last_timestamp",
        "need_another_keepalive",
        "new_handshake_at",
        "next",
        "persistent_at",
        "persistent_keepalive",
        "preshared_key",
        "previous",
        "public_key",
        "removed",
        "retransmit_at",
        "rx_bytes",
        "scheduled_at",
        "sent_last_minute_handshake",
        "staged",
        "static_static",
        "tx_bytes",
        "zero_keys_at",
    )

    def __init__(
        self,
        public_key: bytes,
        static_static: bytes,
        preshared_key: bytes | None,
        endpoint: Address | None,
        persistent_keepalive: float | None,
        staged_limit: int,
    ) -> None:
        self.public_key = public_key
        self.static_static = static_static
        self.preshared_key = preshared_key
        self.endpoint = endpoint
        self.persistent_keepalive = persistent_keepalive
        self.cookies = CookieGenerator(public_key)
        self.current: Keypair | None = None
        self.previous: Keypair | None = None
        self.next: Keypair | None = None
        """A responder's newest session, promoted to ``current`` by the first packet on it."""
        self.initiation: InitiationState | None = None
        self.last_timestamp = bytes(12)
        self.last_initiation_consumed = -_INF
        self.last_sent_handshake = -_INF
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake_wall: float | None = None
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.staged: deque[bytes] = deque(maxlen=staged_limit)
        """IP packets waiting for a session (oldest dropped first when full)."""
        self.removed = False
        self.retransmit_at: float | None = None
        self.keepalive_at: float | None = None
        self.need_another_keepalive = False
        self.new_handshake_at: float | None = None
        self.zero_keys_at: float | None = None
        self.persistent_at: float | None = None
        self.scheduled_at = _INF
        """The earliest wake-up the device's timer heap holds for this peer."""

    def keypairs(self) -> list[Keypair]:
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def deadline(self) -> float | None:
        """The earliest running timer, or ``None`` when all are stopped."""
        earliest = _INF
        for at in (
            self.retransmit_at,
            self.keepalive_at,
            self.new_handshake_at,
            self.zero_keys_at,
            self.persistent_at,
        ):
            if at is not None and at < earliest:
                earliest = at
        return None if earliest == _INF else earliest

    def on_data_sent(self, now: float, rng: RandomSource) -> None:
        """Data went out: if nothing authenticated comes back, the session is dead."""
        if self.new_handshake_at is None:
            self.new_handshake_at = now + NEW_HANDSHAKE_AFTER + rekey_jitter(rng)

    def on_data_received(self, now: float) -> None:
        """Data came in: answer with a keepalive unless we send something first."""
        if self.keepalive_at is None:
            self.keepalive_at = now + KEEPALIVE_TIMEOUT
        else:
            self.need_another_keepalive = True

    def on_authenticated_sent(self) -> None:
        self.keepalive_at = None

    def on_authenticated_received(self) -> None:
        self.new_handshake_at = None

    def on_authenticated_traversal(self, now: float) -> None:
        if self.persistent_keepalive:
            self.persistent_at = now + self.persistent_keepalive

    def on_handshake_initiated(self, now: float, rng: RandomSource) -> None:
        self.retransmit_at = now + REKEY_TIMEOUT + rekey_jitter(rng)

    def on_handshake_complete(self, wall: float) -> None:
        self.retransmit_at = None
        self.handshake_attempts = 0
        self.sent_last_minute_handshake = False
        self.last_handshake_wall = wall

    def on_session_derived(self, now: float) -> None:
        self.zero_keys_at = now + ZERO_KEY_MATERIAL_AFTER
