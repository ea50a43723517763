"""WireGuard, byte-compatible with the kernel and wireguard-go, as a pure sans-IO engine.

``WireGuardDevice`` is the whole public surface: peers by static key, Noise_IKpsk2
handshakes, cookies under load, transport sessions with anti-replay, cryptokey routing,
roaming and the whitepaper's timers.
"""

from .device import DeviceConfig, PeerStats, WireGuardDevice
from .events import (
    EndpointChanged,
    HandshakeCompleted,
    PeerUnreachable,
    SessionExpired,
    WireGuardEvent,
)

__all__ = [
    "DeviceConfig",
    "EndpointChanged",
    "HandshakeCompleted",
    "PeerStats",
    "PeerUnreachable",
    "SessionExpired",
    "WireGuardDevice",
    "WireGuardEvent",
]
