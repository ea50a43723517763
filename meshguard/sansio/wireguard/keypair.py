"""One transport session: the two ChaCha20-Poly1305 keys a handshake derived, and counters."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .constants import MESSAGE_TRANSPORT, REJECT_AFTER_TIME, REKEY_AFTER_TIME
from .noise import SessionKeys
from .replay import ReplayWindow

if TYPE_CHECKING:
    from .peer import Peer


class Keypair:
    """A session with one peer, built once per handshake and used for every packet.

    ``header`` is the first 8 bytes of every transport message we send on it. ``rekey_at``
    is when sending on it should start a new handshake (only the initiator rekeys on age);
    ``reject_at`` is when it may no longer be used at all.
    """

    __slots__ = (
        "created",
        "header",
        "is_initiator",
        "local_index",
        "peer",
        "receiver",
        "reject_at",
        "rekey_at",
        "remote_index",
        "replay",
        "send_counter",
        "sender",
    )

    def __init__(
        self, peer: Peer, keys: SessionKeys, local_index: int, is_initiator: bool, now: float
    ) -> None:
        self.peer = peer
        self.sender = ChaCha20Poly1305(keys.send_key)
        self.receiver = ChaCha20Poly1305(keys.receive_key)
        self.send_counter = 0
        self.local_index = local_index
        self.remote_index = keys.remote_index
        self.is_initiator = is_initiator
        self.created = now
        self.reject_at = now + REJECT_AFTER_TIME
        self.rekey_at = now + REKEY_AFTER_TIME if is_initiator else self.reject_at
        self.header = struct.pack("<II", MESSAGE_TRANSPORT, keys.remote_index)
        self.replay = ReplayWindow()
