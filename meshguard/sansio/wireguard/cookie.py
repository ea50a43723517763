"""WireGuard's DoS defence (whitepaper §5.4.7): mac1, mac2, cookie replies, load detection.

``CookieChecker`` is the receiving side (one per device): it verifies mac1 on every handshake
message and, under load, demands a mac2 made with a cookie bound to the sender's address,
handing out cookies in 64-byte type-3 replies. ``CookieGenerator`` is the sending side (one
per peer): it signs our handshake messages and keeps the cookie a peer gave us.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct

from meshguard.sansio.types import Address, Entropy

from .constants import COOKIE_REFRESH_TIME, MESSAGE_COOKIE_REPLY, UNDER_LOAD_AFTER_TIME
from .crypto import hash_, mac, xaead_decrypt, xaead_encrypt

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
_ZERO_MAC = bytes(16)
_COOKIE_REPLY_HEAD = struct.Struct("<II")


def address_bytes(addr: Address) -> bytes:
    """The sender's address as the cookie binds it: IP bytes then the port (little-endian)."""
    host, port = addr
    try:
        packed = ipaddress.ip_address(host).packed
    except ValueError:
        packed = host.encode()
    return packed + (port & 0xFFFF).to_bytes(2, "little")


class CookieChecker:
    """Verifies mac1/mac2 of handshake messages sent to us and issues cookie replies."""

    __slots__ = ("_cookie_key", "_entropy", "_mac1_key", "_secret", "_secret_born")

    def __init__(self, public_key: bytes, entropy: Entropy) -> None:
        self._mac1_key = hash_(LABEL_MAC1, public_key)
        self._cookie_key = hash_(LABEL_COOKIE, public_key)
        self._entropy = entropy
        self._secret = b""
        self._secret_born: float | None = None

    def check_mac1(self, message: bytes) -> bool:
        expected = mac(self._mac1_key, message[:-32])
        return hmac.compare_digest(expected, message[-32:-16])

    def check_mac2(self, message: bytes, source: Address, now: float) -> bool:
        """Whether mac2 carries the cookie we would hand ``source`` now."""
        born = self._secret_born
        if born is None or now - born > COOKIE_REFRESH_TIME:
            return False
        cookie = mac(self._secret, address_bytes(source))
        return hmac.compare_digest(mac(cookie, message[:-16]), message[-16:])

    def create_reply(
        self, message: bytes, receiver_index: int, source: Address, now: float
    ) -> bytes:
        """A cookie reply to ``message``; the secret is renewed every COOKIE_REFRESH_TIME."""
        born = self._secret_born
        if born is None or now - born > COOKIE_REFRESH_TIME:
            self._secret = self._entropy(32)
            self._secret_born = now
        cookie = mac(self._secret, address_bytes(source))
        nonce = self._entropy(24)
        sealed = xaead_encrypt(self._cookie_key, nonce, cookie, message[-32:-16])
        return _COOKIE_REPLY_HEAD.pack(MESSAGE_COOKIE_REPLY, receiver_index) + nonce + sealed


class CookieGenerator:
    """Adds mac1/mac2 to handshake messages for one peer and stores that peer's cookie."""

    __slots__ = ("_cookie", "_cookie_key", "_cookie_set", "_last_mac1", "_mac1_key")

    def __init__(self, peer_public_key: bytes) -> None:
        self._mac1_key = hash_(LABEL_MAC1, peer_public_key)
        self._cookie_key = hash_(LABEL_COOKIE, peer_public_key)
        self._cookie = b""
        self._cookie_set: float | None = None
        self._last_mac1: bytes | None = None

    def add_macs(self, body: bytes, now: float) -> bytes:
        """``body`` followed by mac1 and mac2 (zeros unless we hold a fresh cookie)."""
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        signed = body + mac1
        cookie_set = self._cookie_set
        if cookie_set is None or now - cookie_set > COOKIE_REFRESH_TIME:
            return signed + _ZERO_MAC
        return signed + mac(self._cookie, signed)

    def consume_reply(self, reply: bytes, now: float) -> bool:
        """Store the cookie in a reply to our last handshake message; ``False`` if bogus."""
        if self._last_mac1 is None:
            return False
        cookie = xaead_decrypt(self._cookie_key, reply[8:32], reply[32:64], self._last_mac1)
        if cookie is None:
            return False
        self._cookie = cookie
        self._cookie_set = now
        return True

    def has_cookie(self, now: float) -> bool:
        return self._cookie_set is not None and now - self._cookie_set <= COOKIE_REFRESH_TIME


class LoadMonitor:
    """Declares the device under load when handshake messages exceed a rate per second.

    Under load lasts UNDER_LOAD_AFTER_TIME after the rate was last exceeded, like
    wireguard-go's queue-length test but driven by an explicit, configurable rate.
    """

    __slots__ = ("_count", "_threshold", "_under_load_until", "_window_start")

    def __init__(self, handshakes_per_second: int) -> None:
        self._threshold = handshakes_per_second
        self._window_start = float("-inf")
        self._count = 0
        self._under_load_until = float("-inf")

    def note_handshake(self, now: float) -> bool:
        """Count one handshake message; whether the device is under load now."""
        if now - self._window_start >= 1.0:
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count > self._threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME
        return now < self._under_load_until


class RateLimiter:
    """Token bucket per source IP for handshake messages while under load.

    Bounded: idle buckets are forgotten when the table is full, and a new source that still
    finds no room is refused rather than letting the table grow.
    """

    __slots__ = ("_buckets", "_burst", "_max_sources", "_rate")

    def __init__(self, per_second: float, burst: int, max_sources: int) -> None:
        self._rate = per_second
        self._burst = float(burst)
        self._max_sources = max_sources
        self._buckets: dict[str, list[float]] = {}

    def allow(self, host: str, now: float) -> bool:
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self._max_sources:
                self._forget_idle(now)
                if len(self._buckets) >= self._max_sources:
                    return False
            bucket = [self._burst, now]
            self._buckets[host] = bucket
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget_idle(self, now: float) -> None:
        refill = self._burst / self._rate
        for host in [h for h, (_, last) in self._buckets.items() if now - last >= refill]:
            del self._buckets[host]
