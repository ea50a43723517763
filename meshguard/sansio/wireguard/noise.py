"""Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s exactly as WireGuard runs it (whitepaper §5.4).

Pure functions over explicit state: the device owns indices, peers and timers and calls these
to build and check the 148-byte initiation and the 92-byte response. Messages are built
without their trailing mac1/mac2 (``cookie`` adds those); checks return ``None`` on any
failure, because bytes from the network never raise.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .constants import MESSAGE_INITIATION, MESSAGE_RESPONSE
from .crypto import (
    aead_decrypt,
    aead_encrypt,
    dh,
    hash_,
    kdf1,
    kdf2,
    kdf3,
    private_key_from_bytes,
    public_key_of,
)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
INITIAL_CHAIN_KEY = hash_(CONSTRUCTION)
INITIAL_HASH = hash_(INITIAL_CHAIN_KEY, IDENTIFIER)
ZERO_PSK = bytes(32)

_INITIATION_HEAD = struct.Struct("<II")
_RESPONSE_HEAD = struct.Struct("<III")


class StaticIdentity:
    """This device's static X25519 key and the values derived from it once."""

    __slots__ = ("private", "public", "responder_hash")

    def __init__(self, private_key: bytes) -> None:
        self.private = private_key_from_bytes(private_key)
        self.public = public_key_of(self.private)
        self.responder_hash = hash_(INITIAL_HASH, self.public)
        """The transcript hash after mixing in our own static key, where every initiation to
        us starts."""


@dataclass(slots=True)
class InitiationState:
    """An initiation we sent and are waiting for the response to."""

    local_index: int
    ephemeral: X25519PrivateKey
    chain_key: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class ConsumedInitiation:
    """A verified initiation: who sent it and the transcript to answer it from."""

    initiator_static: bytes
    sender_index: int
    ephemeral: bytes
    timestamp: bytes
    chain_key: bytes
    hash: bytes


@dataclass(frozen=True, slots=True)
class SessionKeys:
    send_key: bytes
    receive_key: bytes
    remote_index: int


def create_initiation(
    identity: StaticIdentity,
    responder_static: bytes,
    static_static: bytes,
    ephemeral_secret: bytes,
    sender_index: int,
    timestamp: bytes,
) -> tuple[bytes, InitiationState] | None:
    """The first 116 bytes of an initiation (up to mac1) and the state to finish it with.

    ``static_static`` is the precomputed DH(our static, responder static). ``None`` when the
    responder's key is a low-order point.
    """
    ephemeral = private_key_from_bytes(ephemeral_secret)
    ephemeral_public = public_key_of(ephemeral)
    h = hash_(INITIAL_HASH, responder_static)
    h = hash_(h, ephemeral_public)
    ck = kdf1(INITIAL_CHAIN_KEY, ephemeral_public)
    es = dh(ephemeral, responder_static)
    if es is None:
        return None
    ck, key = kdf2(ck, es)
    encrypted_static = aead_encrypt(key, 0, identity.public, h)
    h = hash_(h, encrypted_static)
    ck, key = kdf2(ck, static_static)
    encrypted_timestamp = aead_encrypt(key, 0, timestamp, h)
    h = hash_(h, encrypted_timestamp)
    body = (
        _INITIATION_HEAD.pack(MESSAGE_INITIATION, sender_index)
        + ephemeral_public
        + encrypted_static
        + encrypted_timestamp
    )
    return body, InitiationState(sender_index, ephemeral, ck, h)


def consume_initiation(
    identity: StaticIdentity,
    message: bytes,
    static_static_for: Callable[[bytes], bytes | None],
) -> ConsumedInitiation | None:
    """Verify an initiation (whose mac1 was already checked).

    ``static_static_for(initiator_static)`` returns the precomputed DH with a known peer, or
    ``None`` for a key we do not know.
    """
    sender_index = _INITIATION_HEAD.unpack_from(message)[1]
    ephemeral_public = message[8:40]
    h = hash_(identity.responder_hash, ephemeral_public)
    ck = kdf1(INITIAL_CHAIN_KEY, ephemeral_public)
    es = dh(identity.private, ephemeral_public)
    if es is None:
        return None
    ck, key = kdf2(ck, es)
    encrypted_static = message[40:88]
    initiator_static = aead_decrypt(key, 0, encrypted_static, h)
    if initiator_static is None:
        return None
    h = hash_(h, encrypted_static)
    static_static = static_static_for(initiator_static)
    if static_static is None:
        return None
    ck, key = kdf2(ck, static_static)
    encrypted_timestamp = message[88:116]
    timestamp = aead_decrypt(key, 0, encrypted_timestamp, h)
    if timestamp is None:
        return None
    h = hash_(h, encrypted_timestamp)
    return ConsumedInitiation(initiator_static, sender_index, ephemeral_public, timestamp, ck, h)


def create_response(
    initiation: ConsumedInitiation,
    ephemeral_secret: bytes,
    sender_index: int,
    preshared_key: bytes | None,
) -> tuple[bytes, SessionKeys] | None:
    """The first 60 bytes of a response (up to mac1) and the responder's session keys."""
    ephemeral = private_key_from_bytes(ephemeral_secret)
    ephemeral_public = public_key_of(ephemeral)
    h = hash_(initiation.hash, ephemeral_public)
    ck = kdf1(initiation.chain_key, ephemeral_public)
    ee = dh(ephemeral, initiation.ephemeral)
    se = dh(ephemeral, initiation.initiator_static)
    if ee is None or se is None:
        return None
    ck = kdf1(ck, ee)
    ck = kdf1(ck, se)
    ck, tau, key = kdf3(ck, preshared_key or ZERO_PSK)
    h = hash_(h, tau)
    encrypted_empty = aead_encrypt(key, 0, b"", h)
    body = (
        _RESPONSE_HEAD.pack(MESSAGE_RESPONSE, sender_index, initiation.sender_index)
        + ephemeral_public
        + encrypted_empty
    )
    receive_key, send_key = kdf2(ck, b"")
    return body, SessionKeys(send_key, receive_key, initiation.sender_index)


def consume_response(
    identity: StaticIdentity,
    state: InitiationState,
    message: bytes,
    preshared_key: bytes | None,
) -> SessionKeys | None:
    """Verify a response to ``state`` (mac1 already checked) and derive the initiator's keys."""
    sender_index = _RESPONSE_HEAD.unpack_from(message)[1]
    ephemeral_public = message[12:44]
    h = hash_(state.hash, ephemeral_public)
    ck = kdf1(state.chain_key, ephemeral_public)
    ee = dh(state.ephemeral, ephemeral_public)
    se = dh(identity.private, ephemeral_public)
    if ee is None or se is None:
        return None
    ck = kdf1(ck, ee)
    ck = kdf1(ck, se)
    ck, tau, key = kdf3(ck, preshared_key or ZERO_PSK)
    h = hash_(h, tau)
    if aead_decrypt(key, 0, message[44:60], h) is None:
        return None
    send_key, receive_key = kdf2(ck, b"")
    return SessionKeys(send_key, receive_key, sender_index)
