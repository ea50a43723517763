"""meshguard's wire: classifying datagrams, sealing and opening meshguard messages, records.

One UDP port carries WireGuard, STUN and meshguard's own protocol; ``classify`` tells them
apart from the first 8 bytes (DESIGN.md §4). A meshguard datagram is a 28-byte header
followed by the message body encrypted with ChaCha20-Poly1305 under the key of the sender and
receiver pair (``pair_key``), with the header as associated data; ``docs/wire-protocol.md``
has the byte tables. Member records inside messages are additionally signed by the member
they describe, so a record stays unforgeable however many hops it travels.

``open_datagram`` raises ``DecodeError`` and nothing else for any bytes from the network.
Building an invalid message (a 31-byte key, a negative seq, a bad endpoint) is a caller bug
and raises ``LocalProtocolError``.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

import blake3
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshguard.sansio.codec_wire import (
    KEY_SIZE,
    MAX_DIGEST_BUCKETS,
    MAX_STATE_ENTRIES,
    RECORD_DOMAIN,
    SIGNATURE_SIZE,
    STATE_SYNC_FIXED_SIZE,
    MessageType,
    body_size,
    decode_body,
    encode_body,
    record_unsigned_bytes,
    state_entry_size,
    update_size,
)
from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.messages import (
    Dead,
    Endpoint,
    MemberRecord,
    Message,
    NatInfo,
    RecordStatus,
    StateEntry,
    Suspect,
)

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_DATAGRAM",
    "NONCE_SIZE",
    "OVERHEAD",
    "PAIR_KEY_CONTEXT",
    "STUN_MAGIC_COOKIE",
    "TAG_SIZE",
    "VERSION",
    "DatagramKind",
    "MessageType",
    "canonical_endpoint",
    "chunk_state_entries",
    "classify",
    "digest_bucket",
    "digest_bucket_count",
    "encoded_size",
    "entry_digest",
    "is_small_order",
    "key_id",
    "make_record",
    "open_datagram",
    "pair_key",
    "peek_sender",
    "record_signing_bytes",
    "seal",
    "state_digest",
    "update_size",
    "verify_record",
]

MAX_DATAGRAM = 1280
"""UDP payload budget of meshguard's own datagrams: with IP and UDP headers a packet of at
most 1328 bytes, below the MTU of common paths (1500 Ethernet, 1492 PPPoE, 1420 tunnels), so
gossip is not fragmented. ``seal`` does not enforce it: a relay envelope carrying a full
WireGuard packet is larger, and its sender sizes it."""

MAGIC = b"mg"
VERSION = 1
KEY_ID_SIZE = 8
NONCE_SIZE = 12
TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + 1 + 1 + 1 + 3 + KEY_ID_SIZE + NONCE_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE
"""Bytes every sealed datagram adds to its body: the 28-byte header and the 16-byte tag."""

STUN_MAGIC_COOKIE = b"\x21\x12\xa4\x42"
WIREGUARD_MESSAGE_TYPES = range(1, 5)
PAIR_KEY_CONTEXT = "meshguard 2026-11 pair key v1"

_PREFIXES: dict[bytes, MessageType] = {
    MAGIC + bytes((VERSION, t, 0, 0, 0, 0)): t for t in MessageType
}
"""The first 8 header bytes (magic, version, type, flags, reserved) of every valid datagram."""
_PREFIX_OF = {t: p for p, t in _PREFIXES.items()}

_CIPHER_CACHE_SIZE = 4096

_VERIFIED_CACHE_SIZE = 1 << 16
_verified: dict[MemberRecord, None] = {}
_verified_by_id: dict[int, MemberRecord] = {}
"""The same verified records by object identity (gossip hands the same decoded objects
around): a lookup without hashing the record's fields. Every entry is also in ``_verified``,
which keeps the object alive, so its id cannot be reused while the entry exists."""


class DatagramKind(enum.Enum):
    """What the single UDP port received (DESIGN.md §4)."""

    WIREGUARD = "wireguard"
    STUN = "stun"
    MESHGUARD = "meshguard"


def classify(datagram: bytes) -> DatagramKind:
    """First 4 bytes as a little-endian u32 in 1..4 → WireGuard; the STUN magic cookie at
    bytes 4..7 → STUN; anything else (too short included) → meshguard."""
    if len(datagram) >= 4 and int.from_bytes(datagram[:4], "little") in WIREGUARD_MESSAGE_TYPES:
        return DatagramKind.WIREGUARD
    if datagram[4:8] == STUN_MAGIC_COOKIE:
        return DatagramKind.STUN
    return DatagramKind.MESHGUARD


@lru_cache(maxsize=65536)
def _key_id(public_key: bytes) -> bytes:
    return blake3.blake3(public_key).digest()[:KEY_ID_SIZE]


def key_id(public_key: bytes) -> bytes:
    """The 8-byte id of an Ed25519 key in the header: the first 8 bytes of BLAKE3(key).

    It only picks the pair key to try; authenticity comes from the AEAD tag, so an id
    collision can cost a failed decryption but never lets one member speak for another.
    """
    if type(public_key) is not bytes or len(public_key) != KEY_SIZE:
        raise LocalProtocolError(f"an Ed25519 public key is {KEY_SIZE} bytes")
    return _key_id(public_key)


@lru_cache(maxsize=4096)
def _x25519_private_key(private: bytes) -> X25519PrivateKey:
    """The key object of a private key: loading one (~100 µs, it derives the public key)
    costs more than the exchange itself, and a member derives a key with every peer."""
    return X25519PrivateKey.from_private_bytes(private)


def pair_key(
    own_x25519_private: bytes,
    peer_x25519_public: bytes,
    own_public_key: bytes,
    peer_public_key: bytes,
) -> bytes:
    """The 32-byte ChaCha20-Poly1305 key shared by two members, the same on both sides.

    BLAKE3 derive_key(PAIR_KEY_CONTEXT, X25519 shared secret || lower Ed25519 key || higher
    Ed25519 key). Raises ``DecodeError`` (a ``ValueError``) when the peer's X25519 key is
    invalid or of low order (an all-zero shared secret): no key with that peer exists.
    """
    for value, what in (
        (own_x25519_private, "own X25519 private key"),
        (peer_x25519_public, "peer X25519 public key"),
        (own_public_key, "own Ed25519 public key"),
        (peer_public_key, "peer Ed25519 public key"),
    ):
        if type(value) is not bytes or len(value) != KEY_SIZE:
            raise LocalProtocolError(f"{what} must be {KEY_SIZE} bytes")
    try:
        shared = _x25519_private_key(own_x25519_private).exchange(
            X25519PublicKey.from_public_bytes(peer_x25519_public)
        )
    except ValueError:
        raise DecodeError("peer X25519 key gives no shared secret (low-order point)") from None
    if shared == bytes(KEY_SIZE):
        raise DecodeError("peer X25519 key gives an all-zero shared secret")
    low, high = sorted((own_public_key, peer_public_key))
    return blake3.blake3(shared + low + high, derive_key_context=PAIR_KEY_CONTEXT).digest()


@lru_cache(maxsize=_CIPHER_CACHE_SIZE)
def _cached_cipher(key: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(key)


def _cipher(key: bytes) -> ChaCha20Poly1305:
    """The AEAD object of a pair key, from a small LRU: a datagram is sealed and opened
    under the same key moments apart. It stays small because each object holds ~2 KiB of
    OpenSSL state while building one costs under a microsecond."""
    if type(key) is not bytes or len(key) != KEY_SIZE:
        raise LocalProtocolError(f"a pair key is {KEY_SIZE} bytes")
    return _cached_cipher(key)


def seal(message: Message, sender_key_id: bytes, key: bytes, nonce: bytes) -> bytes:
    """The datagram carrying ``message`` from the member ``sender_key_id`` under ``key``.

    ``nonce`` is 12 bytes from the injected entropy; with random nonces a pair can send
    2**32 datagrams before the chance of any repeat reaches 2**-33.
    """
    if type(sender_key_id) is not bytes or len(sender_key_id) != KEY_ID_SIZE:
        raise LocalProtocolError(f"sender key id must be {KEY_ID_SIZE} bytes")
    if type(nonce) is not bytes or len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"nonce must be {NONCE_SIZE} bytes")
    message_type, body = encode_body(message)
    header = _PREFIX_OF[message_type] + sender_key_id + nonce
    return header + _cipher(key).encrypt(nonce, body, header)


def _header_problem(datagram: bytes) -> str:
    """Why the first 8 bytes of ``datagram`` are not a valid meshguard header prefix."""
    if len(datagram) < OVERHEAD:
        return f"datagram of {len(datagram)} bytes is shorter than {OVERHEAD}"
    if datagram[:2] != MAGIC:
        return "no meshguard magic"
    if datagram[2] != VERSION:
        return f"unsupported version {datagram[2]}"
    if datagram[3] not in _PREFIX_OF:
        return f"unknown message type {datagram[3]}"
    if datagram[4] != 0:
        return f"unknown flags {datagram[4]:#04x}"
    return "reserved header bytes are not zero"


def _message_type(datagram: bytes) -> MessageType:
    message_type = _PREFIXES.get(datagram[:8]) if len(datagram) >= OVERHEAD else None
    if message_type is None:
        raise DecodeError(_header_problem(datagram))
    return message_type


def peek_sender(datagram: bytes) -> bytes:
    """The sender key id of a datagram whose header is well formed (not yet authenticated)."""
    _message_type(datagram)
    return bytes(datagram[8:16])


def open_datagram(datagram: bytes, key: bytes) -> Message:
    """Authenticate and decode a datagram sealed under ``key``; ``DecodeError`` otherwise.

    ``key`` must be a 32-byte pair key (anything else is caller misuse, ``LocalProtocolError``).
    A datagram whose sender key id is the receiver's own must be dropped before this call:
    the pair key is symmetric, so only the sender id in the authenticated header stops a
    datagram from being reflected back to its author.
    """
    datagram = bytes(datagram)
    message_type = _message_type(datagram)
    try:
        body = _cipher(key).decrypt(
            datagram[16:HEADER_SIZE], datagram[HEADER_SIZE:], datagram[:HEADER_SIZE]
        )
    except InvalidTag:
        raise DecodeError("authentication failed (wrong key or altered datagram)") from None
    return decode_body(message_type, body)


def encoded_size(message: Message) -> int:
    """``len(seal(message, ...))``, computed without encoding or encrypting.

    Piggybacked updates add exactly ``update_size`` each, so a sender fills a datagram by
    adding updates while ``encoded_size(bare) + sum(update sizes) <= MAX_DATAGRAM``.
    """
    return OVERHEAD + body_size(message)


def chunk_state_entries(
    entries: Sequence[StateEntry], budget: int = MAX_DATAGRAM
) -> list[tuple[StateEntry, ...]]:
    """Split ``entries`` in order into chunks whose ``StateSync`` datagrams fit ``budget``.

    Always returns at least one chunk (an empty one for no entries), so a state exchange of
    an empty membership still sends one message.
    """
    capacity = budget - OVERHEAD - STATE_SYNC_FIXED_SIZE
    chunks: list[tuple[StateEntry, ...]] = []
    current: list[StateEntry] = []
    used = 0
    for entry in entries:
        size = state_entry_size(entry)
        if size > capacity:
            raise LocalProtocolError(f"a state entry of {size} bytes cannot fit in {budget}")
        if used + size > capacity or len(current) == MAX_STATE_ENTRIES:
            chunks.append(tuple(current))
            current, used = [], 0
        current.append(entry)
        used += size
    chunks.append(tuple(current))
    return chunks


def digest_bucket_count(members: int) -> int:
    """Buckets of a state digest for ``members`` members: about four members per bucket
    (a bucket that differs costs its members' entries), at most ``MAX_DIGEST_BUCKETS``."""
    count = 1
    while count < MAX_DIGEST_BUCKETS and 4 * count < members:
        count *= 2
    return count


def digest_bucket(public_key: bytes, buckets: int) -> int:
    """The bucket of a member: the first bits of its public key."""
    return public_key[0] * buckets >> 8


def entry_digest(record: MemberRecord, accusation: Suspect | Dead | None) -> int:
    """32 bits of a hash of one member as a state exchange shows it: its record, named by
    the signature (unique to the record's content), and the accusation, if any."""
    if accusation is None:
        shown = record.signature
    else:
        tag = b"S" if isinstance(accusation, Suspect) else b"D"
        shown = record.signature + tag + accusation.incarnation.to_bytes(8, "big")
    return int.from_bytes(blake3.blake3(shown).digest(4), "big")


def state_digest(hashes: Iterable[tuple[bytes, int]], buckets: int) -> tuple[int, ...]:
    """The ``StateDigest`` buckets of (public key, ``entry_digest``) pairs: per bucket, the
    XOR of its members' hashes (so their order does not matter)."""
    digest = [0] * buckets
    for public_key, entry_hash in hashes:
        digest[digest_bucket(public_key, buckets)] ^= entry_hash
    return tuple(digest)


def record_signing_bytes(record: MemberRecord) -> bytes:
    """What a member signs: the record domain prefix and every field but the signature."""
    return RECORD_DOMAIN + record_unsigned_bytes(record)


def canonical_endpoint(endpoint: Endpoint) -> Endpoint:
    """``endpoint`` with its host in the canonical text form the decoder produces."""
    if type(endpoint.host) is not str:
        raise LocalProtocolError(f"endpoint host must be a string: {endpoint.host!r}")
    try:
        host = str(ipaddress.ip_address(endpoint.host))
    except ValueError:
        raise LocalProtocolError(f"endpoint host is not an IP literal: {endpoint.host!r}") from None
    return Endpoint(host, endpoint.port)


def make_record(
    public_key: bytes,
    incarnation: int,
    status: RecordStatus,
    endpoints: Sequence[Endpoint],
    nat: NatInfo,
    sign: Callable[[bytes], bytes],
) -> MemberRecord:
    """A member's record signed with ``sign`` (e.g. ``Identity.sign``); hosts canonicalized
    so the record compares equal to its decoded copy."""
    unsigned = MemberRecord(
        public_key,
        incarnation,
        status,
        tuple(canonical_endpoint(e) for e in endpoints),
        nat,
        b"",
    )
    signature = sign(record_signing_bytes(unsigned))
    if type(signature) is not bytes or len(signature) != SIGNATURE_SIZE:
        raise LocalProtocolError(f"an Ed25519 signature is {SIGNATURE_SIZE} bytes")
    return dataclasses.replace(unsigned, signature=signature)


_FIELD_PRIME = 2**255 - 19
_LOW_ORDER_PROBE = X25519PrivateKey.from_private_bytes(bytes(range(32)))


@lru_cache(maxsize=65536)
def is_small_order(public_key: bytes) -> bool:
    """Whether an Ed25519 public key is a point of order 1, 2, 4 or 8.

    Such a key "verifies" signatures nobody made (OpenSSL's check is cofactorless, e.g. an
    all-zero key and an all-zero signature pass for every message), so a record by it proves
    nothing. X25519 multiplies by a multiple of 8, so its result is zero exactly for the
    Montgomery forms u = (1 + y) / (1 - y) of these points (y = 1 is the identity).
    A 32-byte string that is no curve point at all may also answer True; it fails
    verification anyway. Memoized: the same few member keys are checked again and again.
    """
    y = (int.from_bytes(public_key, "little") & ((1 << 255) - 1)) % _FIELD_PRIME
    if y == 1:
        return True
    u = (1 + y) * pow(1 - y, -1, _FIELD_PRIME) % _FIELD_PRIME
    try:
        _LOW_ORDER_PROBE.exchange(X25519PublicKey.from_public_bytes(u.to_bytes(32, "little")))
    except ValueError:
        return True
    return False


def _signature_valid(record: MemberRecord) -> bool:
    try:
        if is_small_order(record.public_key):
            return False
        message = record_signing_bytes(record)
        Ed25519PublicKey.from_public_bytes(record.public_key).verify(record.signature, message)
    except (InvalidSignature, LocalProtocolError, ValueError, TypeError):
        return False
    return True


def verify_record(record: MemberRecord) -> bool:
    """Whether ``record`` carries a valid Ed25519 signature by its own public key (and that
    key is not of small order, see ``is_small_order``).

    Never raises. Verification costs ~60 µs and the same record arrives many times by
    gossip, so records that verified are remembered (a bounded set; only successes are
    cached, so an equal-comparing but differently typed record can never poison it).
    """
    if _verified_by_id.get(id(record)) is record:
        return True
    try:
        if record in _verified:
            return True
    except TypeError:
        return _signature_valid(record)
    if not _signature_valid(record):
        return False
    if len(_verified) >= _VERIFIED_CACHE_SIZE:
        evicted = next(iter(_verified))
        del _verified[evicted]
        _verified_by_id.pop(id(evicted), None)
    _verified[record] = None
    _verified_by_id[id(record)] = record
    return True
