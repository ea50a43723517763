"""Plaintext body encoding of every meshguard message (docs/wire-protocol.md has the tables).

All integers are big-endian (network order). Every variable-length part carries an explicit
count or length, every flag byte allows only its defined bits, and the decoder rejects
trailing bytes, so one message has exactly one encoding: ``encode_body(decode_body(b)) == b``
for every body that decodes. Encoding an invalid message is caller misuse
(``LocalProtocolError``); decoding invalid bytes raises ``DecodeError`` and nothing else.

``codec`` wraps these bodies in the authenticated datagram; this module knows nothing of keys.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Sequence
from enum import IntEnum
from functools import lru_cache

from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.messages import (
    Ack,
    Alive,
    Dead,
    Endpoint,
    EndpointUpdate,
    IndirectAck,
    MemberRecord,
    Message,
    Nack,
    NatFiltering,
    NatInfo,
    NatMapping,
    Ping,
    PingReq,
    PunchProbe,
    PunchRequest,
    PunchResponse,
    RecordStatus,
    RelayEnvelope,
    StateDigest,
    StateEntry,
    StateSync,
    Suspect,
    Update,
)


class MessageType(IntEnum):
    """The message type byte of the datagram header."""

    PING = 1
    ACK = 2
    PING_REQ = 3
    INDIRECT_ACK = 4
    NACK = 5
    STATE_SYNC = 6
    PUNCH_REQUEST = 7
    PUNCH_RESPONSE = 8
    PUNCH_PROBE = 9
    RELAY_ENVELOPE = 10
    ENDPOINT_UPDATE = 11
    STATE_DIGEST = 12


class UpdateTag(IntEnum):
    """The first byte of a piggybacked update (and of a state entry's accusation)."""

    ALIVE = 1
    SUSPECT = 2
    DEAD = 3


_ALIVE_TAG = int(UpdateTag.ALIVE)
_ALIVE_TAG_BYTE = bytes((_ALIVE_TAG,))

KEY_SIZE = 32
SIGNATURE_SIZE = 64
U64_MAX = 2**64 - 1
U16_MAX = 2**16 - 1

MAX_UPDATES = 64
"""Piggybacked updates per message; a 1280-byte datagram holds at most 16."""
MAX_RECORD_ENDPOINTS = 16
MAX_CANDIDATES = 16
MAX_STATE_ENTRIES = 255
MAX_RELAY_PAYLOAD = U16_MAX

RECORD_DOMAIN = b"meshguard member record v1\x00"
"""Prefix of the bytes a member signs, so a record signature means nothing anywhere else."""

FAMILY_IPV4 = 4
FAMILY_IPV6 = 6
ENDPOINT_V4_SIZE = 1 + 4 + 2
ENDPOINT_V6_SIZE = 1 + 16 + 2
NAT_INFO_SIZE = 3
RECORD_FIXED_SIZE = KEY_SIZE + 8 + 1 + 1 + NAT_INFO_SIZE + SIGNATURE_SIZE
ACCUSATION_SIZE = 1 + KEY_SIZE + 8 + KEY_SIZE
ENTRY_ACCUSATION_SIZE = 1 + 8 + KEY_SIZE
STATE_SYNC_FIXED_SIZE = 8 + 2 + 2 + 1 + 1
MAX_DIGEST_BUCKETS = 256
"""A state digest of 256 buckets is a sealed datagram of 1079 bytes."""
STATE_DIGEST_FIXED_SIZE = 8 + 1 + 2
U32_MAX = 2**32 - 1

_NAT_HAIRPINNING = 0x01
_NAT_ALLOWS_RELAY = 0x02
_FLAG_SET = 0x01

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_ACCUSATION_BODY = struct.Struct(f">{KEY_SIZE}sQ{KEY_SIZE}s")

_MAPPINGS = {int(m): m for m in NatMapping}
_FILTERINGS = {int(f): f for f in NatFiltering}
_STATUSES = {int(s): s for s in RecordStatus}


# ---------------------------------------------------------------------------------------------
# Encoding (raises LocalProtocolError for an invalid message: the caller built it)


def _key(value: bytes, what: str) -> bytes:
    if type(value) is not bytes or len(value) != KEY_SIZE:
        raise LocalProtocolError(f"{what} must be {KEY_SIZE} bytes")
    return value


def _u64(value: int, what: str) -> bytes:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise LocalProtocolError(f"{what} must be an integer in 0..2**64-1, got {value!r}")
    return _U64.pack(value)


def _count(items: Sequence[object], limit: int, what: str) -> bytes:
    if len(items) > limit:
        raise LocalProtocolError(f"too many {what}: {len(items)} > {limit}")
    return _U8.pack(len(items))


@lru_cache(maxsize=4096)
def _endpoint_bytes(endpoint: Endpoint) -> bytes:
    if type(endpoint.host) is not str:
        raise LocalProtocolError(f"endpoint host must be a string: {endpoint.host!r}")
    try:
        address = ipaddress.ip_address(endpoint.host)
    except ValueError:
        raise LocalProtocolError(f"endpoint host is not an IP literal: {endpoint.host!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise LocalProtocolError(f"endpoint host has a scope id: {endpoint.host!r}")
    if type(endpoint.port) is not int or not 1 <= endpoint.port <= U16_MAX:
        raise LocalProtocolError(f"endpoint port must be in 1..65535, got {endpoint.port!r}")
    family = FAMILY_IPV4 if address.version == 4 else FAMILY_IPV6
    return _U8.pack(family) + address.packed + _U16.pack(endpoint.port)


def encode_endpoint(endpoint: Endpoint) -> bytes:
    """family u8 (4 or 6) | address (4 or 16 bytes) | port u16."""
    try:
        return _endpoint_bytes(endpoint)
    except TypeError:
        raise LocalProtocolError(f"not an endpoint: {endpoint!r}") from None


def _endpoints(endpoints: Sequence[Endpoint], limit: int, what: str) -> bytes:
    return _count(endpoints, limit, what) + b"".join(encode_endpoint(e) for e in endpoints)


def _nat_bytes(nat: NatInfo) -> bytes:
    if nat.mapping not in _MAPPINGS or nat.filtering not in _FILTERINGS:
        raise LocalProtocolError(f"unknown NAT behaviour in {nat!r}")
    flags = (_NAT_HAIRPINNING if nat.hairpinning else 0) | (
        _NAT_ALLOWS_RELAY if nat.allows_relay else 0
    )
    return bytes((int(nat.mapping), int(nat.filtering), flags))


def record_unsigned_bytes(record: MemberRecord) -> bytes:
    """Every field of ``record`` except the signature, in wire order."""
    _key(record.public_key, "record public key")
    if record.status not in _STATUSES:
        raise LocalProtocolError(f"unknown record status {record.status!r}")
    return b"".join(
        (
            record.public_key,
            _u64(record.incarnation, "incarnation"),
            _U8.pack(int(record.status)),
            _endpoints(record.endpoints, MAX_RECORD_ENDPOINTS, "record endpoints"),
            _nat_bytes(record.nat),
        )
    )


_ENCODED_RECORDS_SIZE = 1 << 17
_encoded_records: dict[int, tuple[MemberRecord, bytes]] = {}
"""Encodings of recent records by object identity; each entry holds its record, so the id
cannot be reused while the entry exists. Gossip re-sends the same (interned) record objects
many times, and looking one up by identity costs far less than hashing its fields."""


def encode_record(record: MemberRecord) -> bytes:
    """The unsigned fields followed by the 64-byte signature (memoized: records are re-sent)."""
    cached = _encoded_records.get(id(record))
    if cached is not None and cached[0] is record:
        return cached[1]
    try:
        hash(record)
    except TypeError:
        raise LocalProtocolError(f"not a hashable member record: {record!r}") from None
    if type(record.signature) is not bytes or len(record.signature) != SIGNATURE_SIZE:
        raise LocalProtocolError(f"record signature must be {SIGNATURE_SIZE} bytes")
    encoded = record_unsigned_bytes(record) + record.signature
    if len(_encoded_records) >= _ENCODED_RECORDS_SIZE:
        del _encoded_records[next(iter(_encoded_records))]
    _encoded_records[id(record)] = (record, encoded)
    return encoded


def _accusation(tag: UpdateTag, accusation: Suspect | Dead) -> bytes:
    return b"".join(
        (
            _U8.pack(tag),
            _key(accusation.member, "accused member"),
            _u64(accusation.incarnation, "incarnation"),
            _key(accusation.accuser, "accuser"),
        )
    )


def encode_update(update: Update) -> bytes:
    """tag u8 then the record (Alive) or member | incarnation | accuser (Suspect, Dead)."""
    if isinstance(update, Alive):
        return _ALIVE_TAG_BYTE + encode_record(update.record)
    if isinstance(update, Suspect):
        return _accusation(UpdateTag.SUSPECT, update)
    if isinstance(update, Dead):
        return _accusation(UpdateTag.DEAD, update)
    raise LocalProtocolError(f"not a membership update: {update!r}")


def _updates(updates: Sequence[Update]) -> bytes:
    """The count and the updates; an Alive whose record was encoded before is looked up
    inline (gossip re-sends the same record objects many times)."""
    parts = [_count(updates, MAX_UPDATES, "updates")]
    encoded = _encoded_records
    for update in updates:
        if type(update) is Alive:
            record = update.record
            cached = encoded.get(id(record))
            if cached is not None and cached[0] is record:
                parts += (_ALIVE_TAG_BYTE, cached[1])
                continue
        parts.append(encode_update(update))
    return b"".join(parts)


def _state_entry(entry: StateEntry) -> bytes:
    record = encode_record(entry.record)
    accusation = entry.suspect_or_dead
    if accusation is None:
        return record + b"\x00"
    if not isinstance(accusation, Suspect | Dead):
        raise LocalProtocolError(f"state entry accusation must be Suspect or Dead: {accusation!r}")
    if accusation.member != entry.record.public_key:
        raise LocalProtocolError("a state entry's accusation must be about the entry's member")
    tag = UpdateTag.SUSPECT if isinstance(accusation, Suspect) else UpdateTag.DEAD
    return b"".join(
        (
            record,
            _U8.pack(tag),
            _u64(accusation.incarnation, "incarnation"),
            _key(accusation.accuser, "accuser"),
        )
    )


def _flag(value: bool) -> bytes:
    return b"\x01" if value else b"\x00"


def _encode_state_sync(message: StateSync) -> bytes:
    if type(message.parts) is not int or not 1 <= message.parts <= U16_MAX:
        raise LocalProtocolError(f"parts must be in 1..65535, got {message.parts!r}")
    if type(message.part) is not int or not 0 <= message.part < message.parts:
        raise LocalProtocolError(f"part must be in 0..parts-1, got {message.part!r}")
    return b"".join(
        (
            _u64(message.exchange, "exchange"),
            _U16.pack(message.part),
            _U16.pack(message.parts),
            _flag(message.want_reply),
            _count(message.entries, MAX_STATE_ENTRIES, "state entries"),
            *(_state_entry(e) for e in message.entries),
        )
    )


def _is_bucket_count(count: int) -> bool:
    """Whether ``count`` buckets is valid: a power of two from 1 to MAX_DIGEST_BUCKETS."""
    return 1 <= count <= MAX_DIGEST_BUCKETS and count & (count - 1) == 0


def _encode_state_digest(message: StateDigest) -> bytes:
    """exchange u64 | want_reply u8 | bucket count u16 | one u32 per bucket."""
    buckets = message.buckets
    if not _is_bucket_count(len(buckets)):
        raise LocalProtocolError(f"a digest has 1..256 buckets, a power of two: {len(buckets)}")
    if any(type(b) is not int or not 0 <= b <= U32_MAX for b in buckets):
        raise LocalProtocolError("digest buckets must be integers in 0..2**32-1")
    header = _u64(message.exchange, "exchange") + _flag(message.want_reply)
    return header + struct.pack(f">H{len(buckets)}I", len(buckets), *buckets)


def _encode_punch(message: PunchRequest | PunchResponse) -> bytes:
    return b"".join(
        (
            _u64(message.session, "session"),
            _key(message.initiator, "initiator"),
            _key(message.target, "target"),
            _endpoints(message.candidates, MAX_CANDIDATES, "candidates"),
        )
    )


def _encode_relay(message: RelayEnvelope) -> bytes:
    payload = message.payload
    if type(payload) is not bytes or not 1 <= len(payload) <= MAX_RELAY_PAYLOAD:
        raise LocalProtocolError(f"relay payload must be 1..{MAX_RELAY_PAYLOAD} bytes")
    return _key(message.peer, "relay peer") + _U16.pack(len(payload)) + payload


def encode_body(message: Message) -> tuple[MessageType, bytes]:
    """The header type byte and the plaintext body of ``message``."""
    if isinstance(message, Ping):
        body = _u64(message.seq, "seq") + _key(message.target, "target") + _updates(message.updates)
        return MessageType.PING, body
    if isinstance(message, Ack):
        return MessageType.ACK, _u64(message.seq, "seq") + _updates(message.updates)
    if isinstance(message, PingReq):
        body = b"".join(
            (
                _u64(message.seq, "seq"),
                _key(message.target, "target"),
                encode_endpoint(message.target_endpoint),
                _updates(message.updates),
            )
        )
        return MessageType.PING_REQ, body
    if isinstance(message, IndirectAck):
        body = _u64(message.seq, "seq") + _key(message.target, "target") + _updates(message.updates)
        return MessageType.INDIRECT_ACK, body
    if isinstance(message, Nack):
        return MessageType.NACK, _u64(message.seq, "seq") + _key(message.target, "target")
    if isinstance(message, StateSync):
        return MessageType.STATE_SYNC, _encode_state_sync(message)
    if isinstance(message, StateDigest):
        return MessageType.STATE_DIGEST, _encode_state_digest(message)
    if isinstance(message, PunchRequest):
        return MessageType.PUNCH_REQUEST, _encode_punch(message)
    if isinstance(message, PunchResponse):
        return MessageType.PUNCH_RESPONSE, _encode_punch(message)
    if isinstance(message, PunchProbe):
        body = _u64(message.session, "session") + _u64(message.seq, "seq") + _flag(message.reply)
        return MessageType.PUNCH_PROBE, body
    if isinstance(message, RelayEnvelope):
        return MessageType.RELAY_ENVELOPE, _encode_relay(message)
    if isinstance(message, EndpointUpdate):
        return MessageType.ENDPOINT_UPDATE, encode_record(message.record)
    raise LocalProtocolError(f"not a meshguard message: {message!r}")


# ---------------------------------------------------------------------------------------------
# Sizes (exact for every message that encodes; computed without encoding)


def endpoint_size(endpoint: Endpoint) -> int:
    """Encoded size of an endpoint: an IPv6 literal always contains ':', IPv4 never does."""
    return ENDPOINT_V6_SIZE if ":" in endpoint.host else ENDPOINT_V4_SIZE


def record_size(record: MemberRecord) -> int:
    cached = _encoded_records.get(id(record))
    if cached is not None and cached[0] is record:
        return len(cached[1])
    return RECORD_FIXED_SIZE + sum(endpoint_size(e) for e in record.endpoints)


def update_size(update: Update) -> int:
    """Encoded bytes of one piggybacked update, tag included."""
    if isinstance(update, Alive):
        return 1 + record_size(update.record)
    return ACCUSATION_SIZE


def state_entry_size(entry: StateEntry) -> int:
    accusation = 1 if entry.suspect_or_dead is None else ENTRY_ACCUSATION_SIZE
    return record_size(entry.record) + accusation


def _updates_size(updates: Sequence[Update]) -> int:
    return 1 + sum(update_size(u) for u in updates)


def body_size(message: Message) -> int:
    """Length of ``encode_body(message)[1]``."""
    if isinstance(message, Ping | IndirectAck):
        return 8 + KEY_SIZE + _updates_size(message.updates)
    if isinstance(message, Ack):
        return 8 + _updates_size(message.updates)
    if isinstance(message, PingReq):
        return 8 + KEY_SIZE + endpoint_size(message.target_endpoint) + _updates_size(
            message.updates
        )
    if isinstance(message, Nack):
        return 8 + KEY_SIZE
    if isinstance(message, StateSync):
        return STATE_SYNC_FIXED_SIZE + sum(state_entry_size(e) for e in message.entries)
    if isinstance(message, StateDigest):
        return STATE_DIGEST_FIXED_SIZE + 4 * len(message.buckets)
    if isinstance(message, PunchRequest | PunchResponse):
        return 8 + 2 * KEY_SIZE + 1 + sum(endpoint_size(e) for e in message.candidates)
    if isinstance(message, PunchProbe):
        return 8 + 8 + 1
    if isinstance(message, RelayEnvelope):
        return KEY_SIZE + 2 + len(message.payload)
    if isinstance(message, EndpointUpdate):
        return record_size(message.record)
    raise LocalProtocolError(f"not a meshguard message: {message!r}")


# ---------------------------------------------------------------------------------------------
# Decoding (raises DecodeError and nothing else)


class _Reader:
    """A cursor over a body that raises ``DecodeError`` instead of reading past the end."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end > len(self.data):
            raise DecodeError("body is truncated")
        self.pos = end
        return self.data[pos:end]

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise DecodeError("body is truncated")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def accusation(self) -> tuple[bytes, int, bytes]:
        """member | incarnation | accuser, in one unpack."""
        pos = self.pos
        if pos + _ACCUSATION_BODY.size > len(self.data):
            raise DecodeError("body is truncated")
        self.pos = pos + _ACCUSATION_BODY.size
        fields: tuple[bytes, int, bytes] = _ACCUSATION_BODY.unpack_from(self.data, pos)
        return fields

    def flag(self, what: str) -> bool:
        value = self.u8()
        if value > 1:
            raise DecodeError(f"{what} flag byte must be 0 or 1, got {value}")
        return value == 1

    def count(self, limit: int, what: str) -> int:
        value = self.u8()
        if value > limit:
            raise DecodeError(f"too many {what}: {value} > {limit}")
        return value

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise DecodeError(f"{len(self.data) - self.pos} trailing bytes after the body")


def _read_endpoint(reader: _Reader) -> Endpoint:
    family = reader.u8()
    host: str
    if family == FAMILY_IPV4:
        host = str(ipaddress.IPv4Address(reader.take(4)))
    elif family == FAMILY_IPV6:
        host = str(ipaddress.IPv6Address(reader.take(16)))
    else:
        raise DecodeError(f"unknown address family {family}")
    port = reader.u16()
    if port == 0:
        raise DecodeError("endpoint port is 0")
    return Endpoint(host, port)


def _read_endpoints(reader: _Reader, limit: int, what: str) -> tuple[Endpoint, ...]:
    return tuple(_read_endpoint(reader) for _ in range(reader.count(limit, what)))


def _read_nat(reader: _Reader) -> NatInfo:
    mapping, filtering, flags = (reader.u8(), reader.u8(), reader.u8())
    if mapping not in _MAPPINGS or filtering not in _FILTERINGS:
        raise DecodeError(f"unknown NAT behaviour {mapping}/{filtering}")
    if flags & ~(_NAT_HAIRPINNING | _NAT_ALLOWS_RELAY):
        raise DecodeError(f"unknown NAT flags {flags:#04x}")
    return NatInfo(
        _MAPPINGS[mapping],
        _FILTERINGS[filtering],
        hairpinning=bool(flags & _NAT_HAIRPINNING),
        allows_relay=bool(flags & _NAT_ALLOWS_RELAY),
    )


_RECORD_ENDPOINT_COUNT_AT = KEY_SIZE + 8 + 1
_ENDPOINT_SIZES = {FAMILY_IPV4: ENDPOINT_V4_SIZE, FAMILY_IPV6: ENDPOINT_V6_SIZE}
_ONE_IPV4 = bytes((1, FAMILY_IPV4))
_ONE_IPV4_TAIL = 1 + ENDPOINT_V4_SIZE + NAT_INFO_SIZE + SIGNATURE_SIZE
"""The common record (one IPv4 endpoint) is measured without walking its endpoints."""
_ONE_IPV4_RECORD_SIZE = _RECORD_ENDPOINT_COUNT_AT + _ONE_IPV4_TAIL
_DECODED_RECORDS_SIZE = 1 << 14
_decoded_records: dict[bytes, Alive] = {}
_decoded_entries: dict[bytes, StateEntry] = {}


def _record_end(data: bytes, start: int) -> int | None:
    """Where the record at ``start`` ends, from its count and family bytes alone, or None
    when those bytes are invalid (the full parse then says why)."""
    pos = start + _RECORD_ENDPOINT_COUNT_AT
    if data[pos : pos + 2] == _ONE_IPV4:
        return pos + _ONE_IPV4_TAIL
    if pos >= len(data) or data[pos] > MAX_RECORD_ENDPOINTS:
        return None
    count = data[pos]
    pos += 1
    for _ in range(count):
        if pos >= len(data) or data[pos] not in _ENDPOINT_SIZES:
            return None
        pos += _ENDPOINT_SIZES[data[pos]]
    return pos + NAT_INFO_SIZE + SIGNATURE_SIZE


def _read_alive(reader: _Reader) -> Alive:
    """A record as an ``Alive`` update, from a cache of recently decoded ones: gossip repeats
    the same records, and parsing endpoints into text dominates decoding. The cached object
    is shared: messages and records are immutable."""
    data = reader.data
    start = reader.pos
    end = _record_end(data, start)
    if end is not None and end <= len(data):
        raw = data[start:end]
        cached = _decoded_records.get(raw)
        if cached is not None:
            reader.pos = end
            return cached
        alive = Alive(_parse_record(reader))
        if len(_decoded_records) >= _DECODED_RECORDS_SIZE:
            del _decoded_records[next(iter(_decoded_records))]
        _decoded_records[raw] = alive
        return alive
    return Alive(_parse_record(reader))


def _read_record(reader: _Reader) -> MemberRecord:
    return _read_alive(reader).record


def _parse_record(reader: _Reader) -> MemberRecord:
    public_key = reader.take(KEY_SIZE)
    incarnation = reader.u64()
    status = reader.u8()
    if status not in _STATUSES:
        raise DecodeError(f"unknown record status {status}")
    endpoints = _read_endpoints(reader, MAX_RECORD_ENDPOINTS, "record endpoints")
    nat = _read_nat(reader)
    signature = reader.take(SIGNATURE_SIZE)
    return MemberRecord(public_key, incarnation, _STATUSES[status], endpoints, nat, signature)


def _read_update(reader: _Reader) -> Update:
    tag = reader.u8()
    if tag == _ALIVE_TAG:
        return _read_alive(reader)
    if tag == UpdateTag.SUSPECT:
        return Suspect(*reader.accusation())
    if tag == UpdateTag.DEAD:
        return Dead(*reader.accusation())
    raise DecodeError(f"unknown update tag {tag}")


def _read_updates(reader: _Reader) -> tuple[Update, ...]:
    """The update list. An Alive whose record (one IPv4 endpoint, the common shape) was
    decoded before is taken from the cache inline; anything else goes through
    ``_read_update``. A truncated slice cannot hit the cache: every cached record with these
    count and family bytes is exactly ``_ONE_IPV4_RECORD_SIZE`` long."""
    count = reader.count(MAX_UPDATES, "updates")
    data = reader.data
    size = len(data)
    get = _decoded_records.get
    shape_at = 1 + _RECORD_ENDPOINT_COUNT_AT
    span = 1 + _ONE_IPV4_RECORD_SIZE
    updates: list[Update] = []
    pos = reader.pos
    for _ in range(count):
        if pos < size and data[pos] == _ALIVE_TAG and data.startswith(_ONE_IPV4, pos + shape_at):
            cached = get(data[pos + 1 : pos + span])
            if cached is not None:
                pos += span
                updates.append(cached)
                continue
        reader.pos = pos
        updates.append(_read_update(reader))
        pos = reader.pos
    reader.pos = pos
    return tuple(updates)


def _read_state_entry(reader: _Reader) -> StateEntry:
    """A state entry; one without an accusation whose bytes were decoded before comes from a
    cache (push-pull repeats the same table), like ``_read_alive``."""
    data = reader.data
    start = reader.pos
    end = _record_end(data, start)
    raw = None
    if end is not None and end < len(data) and data[end] == 0:
        raw = data[start : end + 1]
        cached = _decoded_entries.get(raw)
        if cached is not None:
            reader.pos = end + 1
            return cached
    record = _read_record(reader)
    tag = reader.u8()
    if tag == 0:
        entry = StateEntry(record)
        if raw is not None:
            if len(_decoded_entries) >= _DECODED_RECORDS_SIZE:
                del _decoded_entries[next(iter(_decoded_entries))]
            _decoded_entries[raw] = entry
        return entry
    if tag == UpdateTag.SUSPECT:
        return StateEntry(record, Suspect(record.public_key, reader.u64(), reader.take(KEY_SIZE)))
    if tag == UpdateTag.DEAD:
        return StateEntry(record, Dead(record.public_key, reader.u64(), reader.take(KEY_SIZE)))
    raise DecodeError(f"unknown state entry accusation tag {tag}")


def _decode_ping(reader: _Reader) -> Message:
    return Ping(reader.u64(), reader.take(KEY_SIZE), _read_updates(reader))


def _decode_ack(reader: _Reader) -> Message:
    return Ack(reader.u64(), _read_updates(reader))


def _decode_ping_req(reader: _Reader) -> Message:
    return PingReq(
        reader.u64(), reader.take(KEY_SIZE), _read_endpoint(reader), _read_updates(reader)
    )


def _decode_indirect_ack(reader: _Reader) -> Message:
    return IndirectAck(reader.u64(), reader.take(KEY_SIZE), _read_updates(reader))


def _decode_nack(reader: _Reader) -> Message:
    return Nack(reader.u64(), reader.take(KEY_SIZE))


def _decode_state_sync(reader: _Reader) -> Message:
    exchange = reader.u64()
    part = reader.u16()
    parts = reader.u16()
    if parts == 0 or part >= parts:
        raise DecodeError(f"state sync part {part} of {parts} is impossible")
    want_reply = reader.flag("want_reply")
    count = reader.count(MAX_STATE_ENTRIES, "state entries")
    entries = tuple(_read_state_entry(reader) for _ in range(count))
    return StateSync(exchange, part, parts, want_reply, entries)


def _decode_state_digest(reader: _Reader) -> Message:
    exchange = reader.u64()
    want_reply = reader.flag("want_reply")
    count = reader.u16()
    if not _is_bucket_count(count):
        raise DecodeError(f"a state digest of {count} buckets is impossible")
    return StateDigest(exchange, want_reply, struct.unpack(f">{count}I", reader.take(4 * count)))


def _decode_punch_request(reader: _Reader) -> Message:
    return PunchRequest(
        reader.u64(),
        reader.take(KEY_SIZE),
        reader.take(KEY_SIZE),
        _read_endpoints(reader, MAX_CANDIDATES, "candidates"),
    )


def _decode_punch_response(reader: _Reader) -> Message:
    return PunchResponse(
        reader.u64(),
        reader.take(KEY_SIZE),
        reader.take(KEY_SIZE),
        _read_endpoints(reader, MAX_CANDIDATES, "candidates"),
    )


def _decode_punch_probe(reader: _Reader) -> Message:
    return PunchProbe(reader.u64(), reader.u64(), reader.flag("reply"))


def _decode_relay(reader: _Reader) -> Message:
    peer = reader.take(KEY_SIZE)
    length = reader.u16()
    if length == 0:
        raise DecodeError("relay payload is empty")
    return RelayEnvelope(peer, reader.take(length))


def _decode_endpoint_update(reader: _Reader) -> Message:
    return EndpointUpdate(_read_record(reader))


_DECODERS: dict[MessageType, Callable[[_Reader], Message]] = {
    MessageType.PING: _decode_ping,
    MessageType.ACK: _decode_ack,
    MessageType.PING_REQ: _decode_ping_req,
    MessageType.INDIRECT_ACK: _decode_indirect_ack,
    MessageType.NACK: _decode_nack,
    MessageType.STATE_SYNC: _decode_state_sync,
    MessageType.PUNCH_REQUEST: _decode_punch_request,
    MessageType.PUNCH_RESPONSE: _decode_punch_response,
    MessageType.PUNCH_PROBE: _decode_punch_probe,
    MessageType.RELAY_ENVELOPE: _decode_relay,
    MessageType.ENDPOINT_UPDATE: _decode_endpoint_update,
    MessageType.STATE_DIGEST: _decode_state_digest,
}


def decode_body(message_type: MessageType, body: bytes) -> Message:
    """The message of type ``message_type`` whose plaintext body is exactly ``body``."""
    reader = _Reader(body)
    message = _DECODERS[message_type](reader)
    reader.finish()
    return message
