"""What the WireGuard device tells its driver and the mesh node (pulled via ``events()``)."""

from __future__ import annotations

from dataclasses import dataclass

from meshguard.sansio.types import Address


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """A new session with the peer is confirmed and carries traffic."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """The peer's endpoint moved to where its latest authenticated packet came from."""

    public_key: bytes
    endpoint: Address


@dataclass(frozen=True, slots=True)
class PeerUnreachable:
    """Handshake retransmissions gave up (REKEY_ATTEMPT_TIME); queued packets were dropped."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class SessionExpired:
    """All session keys with the peer were erased (REJECT_AFTER_TIME × 3 without a new one)."""

    public_key: bytes


WireGuardEvent = HandshakeCompleted | EndpointChanged | PeerUnreachable | SessionExpired
