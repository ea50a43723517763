"""Unit tests of the wire codec: classification, keys, sealing, every message, records, sizes."""

from __future__ import annotations

import dataclasses
import itertools

import blake3
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshguard.sansio import codec
from meshguard.sansio.codec import DatagramKind, MessageType
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
)

RAW = serialization.Encoding.Raw


@dataclasses.dataclass
class Member:
    """A test member with real Ed25519 and X25519 keys."""

    signing: Ed25519PrivateKey
    exchange: X25519PrivateKey

    @classmethod
    def from_byte(cls, n: int) -> Member:
        return cls(
            Ed25519PrivateKey.from_private_bytes(bytes([n]) * 32),
            X25519PrivateKey.from_private_bytes(bytes([n + 100]) * 32),
        )

    @property
    def public_key(self) -> bytes:
        return self.signing.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)

    @property
    def x25519_private(self) -> bytes:
        return self.exchange.private_bytes(
            RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def x25519_public(self) -> bytes:
        return self.exchange.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)

    def key_with(self, other: Member) -> bytes:
        return codec.pair_key(
            self.x25519_private, other.x25519_public, self.public_key, other.public_key
        )

    def record(self, incarnation: int = 1, *endpoints: Endpoint) -> MemberRecord:
        return codec.make_record(
            self.public_key,
            incarnation,
            RecordStatus.ALIVE,
            endpoints or (Endpoint("192.0.2.7", 51821), Endpoint("2001:db8::7", 51821)),
            NatInfo(NatMapping.ENDPOINT_INDEPENDENT, NatFiltering.ADDRESS_DEPENDENT, True, True),
            self.signing.sign,
        )


ALICE = Member.from_byte(1)
BOB = Member.from_byte(2)
CAROL = Member.from_byte(3)
NONCE = bytes(range(12))


def every_message() -> list[Message]:
    record = ALICE.record(7)
    updates = (
        Alive(record),
        Suspect(BOB.public_key, 3, ALICE.public_key),
        Dead(CAROL.public_key, 9, BOB.public_key),
    )
    v4 = Endpoint("198.51.100.4", 40000)
    v6 = Endpoint("2001:db8::42", 65535)
    return [
        Ping(1, BOB.public_key),
        Ping(2**64 - 1, BOB.public_key, updates),
        Ack(0, updates),
        PingReq(5, CAROL.public_key, v6, updates[:1]),
        PingReq(5, CAROL.public_key, v4),
        IndirectAck(6, CAROL.public_key, updates[1:]),
        Nack(7, CAROL.public_key),
        StateSync(
            11,
            0,
            2,
            True,
            (
                StateEntry(record),
                StateEntry(BOB.record(2), Suspect(BOB.public_key, 2, ALICE.public_key)),
                StateEntry(CAROL.record(4), Dead(CAROL.public_key, 4, BOB.public_key)),
            ),
        ),
        StateSync(12, 0, 1, False, ()),
        StateDigest(16, True, (0,)),
        StateDigest(2**64 - 1, False, tuple(range(2**32 - 256, 2**32))),
        PunchRequest(13, ALICE.public_key, BOB.public_key, (v4, v6)),
        PunchResponse(13, ALICE.public_key, BOB.public_key, (v6,)),
        PunchResponse(14, ALICE.public_key, BOB.public_key, ()),
        PunchProbe(15, 1, False),
        PunchProbe(15, 1, True),
        RelayEnvelope(CAROL.public_key, b"\x04\x00\x00\x00" + bytes(28)),
        EndpointUpdate(ALICE.record(8, v4)),
    ]


def seal_to_bob(message: Message) -> bytes:
    return codec.seal(message, codec.key_id(ALICE.public_key), ALICE.key_with(BOB), NONCE)


def seal_raw_body(message_type: int, body: bytes, key: bytes, prefix: bytes | None = None) -> bytes:
    """A datagram whose header and body bypass the encoder, authenticated with ``key``."""
    header = (prefix or b"mg\x01" + bytes([message_type, 0, 0, 0, 0])) + bytes(8) + NONCE
    return header + ChaCha20Poly1305(key).encrypt(NONCE, body, header)


# --- classification ----------------------------------------------------------------------------


@pytest.mark.parametrize("message_type", [1, 2, 3, 4])
def test_wireguard_message_types_classify_as_wireguard(message_type: int) -> None:
    sizes = {1: 148, 2: 92, 3: 64, 4: 32}
    datagram = bytes([message_type, 0, 0, 0]) + b"\xab" * (sizes[message_type] - 4)
    assert codec.classify(datagram) is DatagramKind.WIREGUARD


def test_wireguard_type_with_stun_cookie_after_it_is_still_wireguard() -> None:
    assert codec.classify(b"\x01\x00\x00\x00\x21\x12\xa4\x42" + bytes(140)) is (
        DatagramKind.WIREGUARD
    )


def test_stun_binding_request_and_response_classify_as_stun() -> None:
    transaction = bytes(range(12))
    request = b"\x00\x01\x00\x00" + codec.STUN_MAGIC_COOKIE + transaction
    response = b"\x01\x01\x00\x0c" + codec.STUN_MAGIC_COOKIE + transaction + bytes(12)
    assert codec.classify(request) is DatagramKind.STUN
    assert codec.classify(response) is DatagramKind.STUN


@pytest.mark.parametrize(
    "datagram",
    [b"", b"\x01", b"\x01\x00\x00", b"\x00\x00\x00\x00", b"\x05\x00\x00\x00", b"\x01\x01\x00\x00",
     b"\x00\x01\x00\x00\x21\x12\xa4", b"mg\x01\x01\x00\x00\x00\x00"],
)
def test_everything_else_classifies_as_meshguard(datagram: bytes) -> None:
    assert codec.classify(datagram) is DatagramKind.MESHGUARD


@pytest.mark.parametrize("message", every_message(), ids=lambda m: type(m).__name__)
def test_sealed_messages_classify_as_meshguard(message: Message) -> None:
    assert codec.classify(seal_to_bob(message)) is DatagramKind.MESHGUARD


# --- keys --------------------------------------------------------------------------------------


def test_key_id_is_first_8_bytes_of_blake3_of_the_key() -> None:
    assert codec.key_id(bytes(32)) == bytes.fromhex("2ada83c1819a5372")
    assert codec.key_id(ALICE.public_key) == blake3.blake3(ALICE.public_key).digest()[:8]


def test_key_id_rejects_a_key_of_the_wrong_length() -> None:
    with pytest.raises(LocalProtocolError):
        codec.key_id(bytes(31))


def test_pair_key_is_the_same_on_both_sides_and_differs_per_pair() -> None:
    assert ALICE.key_with(BOB) == BOB.key_with(ALICE)
    assert len(ALICE.key_with(BOB)) == 32
    assert len({ALICE.key_with(BOB), ALICE.key_with(CAROL), BOB.key_with(CAROL)}) == 3


def test_pair_key_binds_the_ed25519_keys() -> None:
    honest = ALICE.key_with(BOB)
    other = codec.pair_key(
        ALICE.x25519_private, BOB.x25519_public, ALICE.public_key, CAROL.public_key
    )
    assert honest != other


def test_pair_key_is_blake3_derive_key_over_shared_secret_and_sorted_keys() -> None:
    shared = ALICE.exchange.exchange(BOB.exchange.public_key())
    low, high = sorted((ALICE.public_key, BOB.public_key))
    expected = blake3.blake3(
        shared + low + high, derive_key_context="meshguard 2026-11 pair key v1"
    ).digest()
    assert ALICE.key_with(BOB) == expected


@pytest.mark.parametrize(
    "low_order_point",
    [bytes(32), b"\x01" + bytes(31), bytes.fromhex(
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")],
)
def test_pair_key_rejects_low_order_peer_keys(low_order_point: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.pair_key(ALICE.x25519_private, low_order_point, ALICE.public_key, BOB.public_key)


def test_pair_key_rejects_wrong_lengths_as_caller_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        codec.pair_key(ALICE.x25519_private[:31], BOB.x25519_public, ALICE.public_key,
                       BOB.public_key)


# --- sealing and opening -----------------------------------------------------------------------


@pytest.mark.parametrize("message", every_message(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_and_its_size_is_exact(message: Message) -> None:
    datagram = seal_to_bob(message)
    assert codec.open_datagram(datagram, BOB.key_with(ALICE)) == message
    assert len(datagram) == codec.encoded_size(message)


def test_header_layout() -> None:
    datagram = seal_to_bob(Nack(7, CAROL.public_key))
    assert datagram[:2] == b"mg"
    assert datagram[2] == codec.VERSION == 1
    assert datagram[3] == MessageType.NACK
    assert datagram[4:8] == bytes(4)
    assert datagram[8:16] == codec.key_id(ALICE.public_key) == codec.peek_sender(datagram)
    assert datagram[16:28] == NONCE
    assert len(datagram) == 28 + (8 + 32) + 16


def test_every_message_type_has_its_own_type_byte() -> None:
    types = {seal_to_bob(m)[3] for m in every_message()}
    assert types == {int(t) for t in MessageType}


def test_open_with_the_wrong_key_fails() -> None:
    datagram = seal_to_bob(Ping(1, BOB.public_key))
    with pytest.raises(DecodeError, match="authentication"):
        codec.open_datagram(datagram, ALICE.key_with(CAROL))


@pytest.mark.parametrize(
    ("index", "value", "reason"),
    [(0, ord("x"), "magic"), (2, 2, "version"), (3, 0, "type"), (3, 13, "type"),
     (4, 1, "flags"), (5, 1, "reserved"), (7, 0x80, "reserved")],
)
def test_bad_header_fields_are_rejected_by_name(index: int, value: int, reason: str) -> None:
    datagram = bytearray(seal_to_bob(Ping(1, BOB.public_key)))
    datagram[index] = value
    with pytest.raises(DecodeError, match=reason):
        codec.open_datagram(bytes(datagram), BOB.key_with(ALICE))
    with pytest.raises(DecodeError, match=reason):
        codec.peek_sender(bytes(datagram))


def test_an_authentic_header_with_an_unknown_version_is_still_rejected() -> None:
    key = BOB.key_with(ALICE)
    body = (1).to_bytes(8, "big") + BOB.public_key + b"\x00"
    assert isinstance(codec.open_datagram(seal_raw_body(1, body, key), key), Ping)
    future = seal_raw_body(1, body, key, prefix=b"mg\x02\x01\x00\x00\x00\x00")
    with pytest.raises(DecodeError, match="version 2"):
        codec.open_datagram(future, key)


def test_short_datagrams_are_rejected() -> None:
    datagram = seal_to_bob(Ping(1, BOB.public_key))
    for length in (0, 8, 27, 43):
        with pytest.raises(DecodeError, match="shorter"):
            codec.open_datagram(datagram[:length], BOB.key_with(ALICE))


def test_truncated_and_extended_datagrams_fail_authentication() -> None:
    datagram = seal_to_bob(Ping(1, BOB.public_key))
    for altered in (datagram[:-1], datagram + b"\x00"):
        with pytest.raises(DecodeError, match="authentication"):
            codec.open_datagram(altered, BOB.key_with(ALICE))


def test_seal_rejects_bad_ids_nonces_and_keys_as_caller_misuse() -> None:
    message = Ping(1, BOB.public_key)
    key = ALICE.key_with(BOB)
    sender = codec.key_id(ALICE.public_key)
    for args in ((sender[:7], key, NONCE), (sender, key, NONCE[:11]), (sender, key[:16], NONCE)):
        with pytest.raises(LocalProtocolError):
            codec.seal(message, *args)


# --- body validation (authentic datagrams with bad bodies) -------------------------------------

KEY = bytes(range(32))


def body_error(message_type: int, body: bytes) -> str:
    with pytest.raises(DecodeError) as raised:
        codec.open_datagram(seal_raw_body(message_type, body, KEY), KEY)
    return str(raised.value)


def record_body(
    status: int = 0, endpoints: bytes = b"\x00", nat: bytes = b"\x00\x00\x00"
) -> bytes:
    return ALICE.public_key + (1).to_bytes(8, "big") + bytes([status]) + endpoints + nat + bytes(
        64
    )


def test_valid_raw_bodies_decode() -> None:
    endpoint = b"\x04\xc0\x00\x02\x01\xca\x6d"
    message = codec.open_datagram(
        seal_raw_body(MessageType.ENDPOINT_UPDATE, record_body(endpoints=b"\x01" + endpoint), KEY),
        KEY,
    )
    assert isinstance(message, EndpointUpdate)
    assert message.record.endpoints == (Endpoint("192.0.2.1", 51821),)


@pytest.mark.parametrize(
    ("message_type", "body", "reason"),
    [
        (MessageType.NACK, bytes(40) + b"\x00", "trailing"),
        (MessageType.NACK, bytes(39), "truncated"),
        (MessageType.ACK, bytes(8), "truncated"),
        (MessageType.ACK, bytes(8) + b"\x41", "too many updates"),
        (MessageType.ACK, bytes(8) + b"\x01\x07", "update tag"),
        (MessageType.PUNCH_PROBE, bytes(16) + b"\x02", "flag"),
        (MessageType.ENDPOINT_UPDATE, record_body(status=2), "status"),
        (MessageType.ENDPOINT_UPDATE, record_body(endpoints=b"\x11"), "too many record endpoints"),
        (MessageType.ENDPOINT_UPDATE, record_body(endpoints=b"\x01\x05" + bytes(6)), "family"),
        (MessageType.ENDPOINT_UPDATE, record_body(endpoints=b"\x01\x04" + bytes(6)), "port is 0"),
        (MessageType.ENDPOINT_UPDATE, record_body(nat=b"\x05\x00\x00"), "NAT behaviour"),
        (MessageType.ENDPOINT_UPDATE, record_body(nat=b"\x00\x04\x00"), "NAT behaviour"),
        (MessageType.ENDPOINT_UPDATE, record_body(nat=b"\x00\x00\x04"), "NAT flags"),
        (MessageType.STATE_SYNC, bytes(8) + b"\x00\x00\x00\x00\x00\x00", "impossible"),
        (MessageType.STATE_SYNC, bytes(8) + b"\x00\x01\x00\x01\x00\x00", "impossible"),
        (MessageType.STATE_SYNC, bytes(8) + b"\x00\x00\x00\x01\x00\x01" + record_body() + b"\x01",
         "accusation tag"),
        (MessageType.STATE_DIGEST, bytes(8) + b"\x00\x00\x00", "impossible"),
        (MessageType.STATE_DIGEST, bytes(8) + b"\x00\x00\x03" + bytes(12), "impossible"),
        (MessageType.STATE_DIGEST, bytes(8) + b"\x00\x02\x00" + bytes(2048), "impossible"),
        (MessageType.STATE_DIGEST, bytes(8) + b"\x00\x00\x02" + bytes(4), "truncated"),
        (MessageType.STATE_DIGEST, bytes(8) + b"\x02\x00\x01" + bytes(4), "flag"),
        (MessageType.RELAY_ENVELOPE, bytes(32) + b"\x00\x00", "empty"),
        (MessageType.RELAY_ENVELOPE, bytes(32) + b"\x00\x05abcd", "truncated"),
        (MessageType.RELAY_ENVELOPE, bytes(32) + b"\x00\x03abcd", "trailing"),
    ],
)
def test_malformed_bodies_are_rejected(message_type: int, body: bytes, reason: str) -> None:
    assert reason in body_error(message_type, body)


def test_a_record_decoded_before_is_still_validated_in_a_new_context() -> None:
    good = record_body()
    first = codec.open_datagram(seal_raw_body(MessageType.ENDPOINT_UPDATE, good, KEY), KEY)
    again = codec.open_datagram(
        seal_raw_body(MessageType.ACK, bytes(8) + b"\x01\x01" + good, KEY), KEY
    )
    assert isinstance(first, EndpointUpdate)
    assert again == Ack(0, (Alive(first.record),))
    assert "trailing" in body_error(MessageType.ENDPOINT_UPDATE, good + b"\x00")
    assert "NAT flags" in body_error(
        MessageType.ENDPOINT_UPDATE, good[:-67] + b"\x00\x00\x08" + good[-64:]
    )


def test_a_relayed_meshguard_datagram_survives_the_relay() -> None:
    inner = codec.seal(Ping(9, CAROL.public_key), codec.key_id(ALICE.public_key),
                       ALICE.key_with(CAROL), NONCE)
    to_relay = codec.seal(RelayEnvelope(CAROL.public_key, inner), codec.key_id(ALICE.public_key),
                          ALICE.key_with(BOB), NONCE)
    envelope = codec.open_datagram(to_relay, BOB.key_with(ALICE))
    assert envelope == RelayEnvelope(CAROL.public_key, inner)
    forwarded = codec.seal(RelayEnvelope(ALICE.public_key, envelope.payload),
                           codec.key_id(BOB.public_key), BOB.key_with(CAROL), NONCE)
    delivered = codec.open_datagram(forwarded, CAROL.key_with(BOB))
    assert isinstance(delivered, RelayEnvelope)
    assert codec.peek_sender(delivered.payload) == codec.key_id(delivered.peer)
    assert codec.open_datagram(delivered.payload, CAROL.key_with(ALICE)) == Ping(
        9, CAROL.public_key
    )


def test_state_entry_accusation_is_about_the_entry_member() -> None:
    body = bytes(8) + b"\x00\x00\x00\x01\x00\x01" + record_body() + b"\x02" + bytes(8) + bytes(32)
    message = codec.open_datagram(seal_raw_body(MessageType.STATE_SYNC, body, KEY), KEY)
    assert isinstance(message, StateSync)
    assert message.entries[0].suspect_or_dead == Suspect(ALICE.public_key, 0, bytes(32))


# --- encoding misuse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Ping(1, bytes(31)),
        Ping(-1, bytes(32)),
        Ping(2**64, bytes(32)),
        Ack(1, (Suspect(bytes(32), 1, bytes(32)),) * 65),
        PingReq(1, bytes(32), Endpoint("example.com", 1)),
        PingReq(1, bytes(32), Endpoint("fe80::1%eth0", 1)),
        PingReq(1, bytes(32), Endpoint("192.0.2.1", 0)),
        PingReq(1, bytes(32), Endpoint("192.0.2.1", 65536)),
        StateSync(1, 1, 1, False, ()),
        StateSync(1, 0, 0, False, ()),
        StateSync(1, 0, 1, False, (StateEntry(ALICE.record(), Suspect(BOB.public_key, 1,
                                                                      bytes(32))),)),
        StateDigest(1, True, ()),
        StateDigest(1, True, (0, 0, 0)),
        StateDigest(1, True, (0,) * 512),
        StateDigest(1, True, (2**32,)),
        EndpointUpdate(dataclasses.replace(ALICE.record(), signature=bytes(63))),
        EndpointUpdate(dataclasses.replace(ALICE.record(), endpoints=(Endpoint("::1", 1),) * 17)),
        RelayEnvelope(bytes(32), b""),
        RelayEnvelope(bytes(32), bytes(65536)),
    ],
)
def test_encoding_an_invalid_message_is_caller_misuse(message: Message) -> None:
    with pytest.raises(LocalProtocolError):
        seal_to_bob(message)


# --- records -----------------------------------------------------------------------------------


def test_made_records_verify_and_survive_the_wire() -> None:
    record = ALICE.record(3)
    assert codec.verify_record(record)
    received = codec.open_datagram(seal_to_bob(EndpointUpdate(record)), BOB.key_with(ALICE))
    assert isinstance(received, EndpointUpdate)
    assert codec.verify_record(received.record)


def test_make_record_canonicalizes_hosts() -> None:
    record = ALICE.record(1, Endpoint("2001:DB8:0:0::1", 5))
    assert record.endpoints == (Endpoint("2001:db8::1", 5),)
    received = codec.open_datagram(seal_to_bob(EndpointUpdate(record)), BOB.key_with(ALICE))
    assert received == EndpointUpdate(record)


def test_signing_bytes_are_domain_separated_and_cover_every_field_but_the_signature() -> None:
    record = ALICE.record(3)
    signing = codec.record_signing_bytes(record)
    assert signing.startswith(b"meshguard member record v1\x00")
    assert codec.record_signing_bytes(dataclasses.replace(record, signature=bytes(64))) == signing
    changed = [
        dataclasses.replace(record, incarnation=4),
        dataclasses.replace(record, status=RecordStatus.LEFT),
        dataclasses.replace(record, endpoints=record.endpoints[:1]),
        dataclasses.replace(record, nat=NatInfo()),
        dataclasses.replace(record, nat=dataclasses.replace(record.nat, allows_relay=False)),
        dataclasses.replace(record, public_key=BOB.public_key),
    ]
    for other in changed:
        assert codec.record_signing_bytes(other) != signing
        assert not codec.verify_record(other)


def test_a_record_signed_by_someone_else_does_not_verify() -> None:
    record = ALICE.record(3)
    forged = dataclasses.replace(
        record, signature=BOB.signing.sign(codec.record_signing_bytes(record))
    )
    assert not codec.verify_record(forged)


@pytest.mark.parametrize(
    "record",
    [
        MemberRecord(bytes(32), 1, RecordStatus.ALIVE, (), NatInfo(), bytes(64)),
        MemberRecord(b"\xff" * 32, 1, RecordStatus.ALIVE, (), NatInfo(), bytes(64)),
        MemberRecord(bytes(31), 1, RecordStatus.ALIVE, (), NatInfo(), bytes(64)),
        MemberRecord(bytes(32), -1, RecordStatus.ALIVE, (), NatInfo(), bytes(64)),
        MemberRecord(bytes(32), 1, RecordStatus.ALIVE, [], NatInfo(), bytes(64)),  # type: ignore[arg-type]
        MemberRecord(bytes(32), 1, RecordStatus.ALIVE, (), NatInfo(), bytes(10)),
    ],
)
def test_verify_record_never_raises(record: MemberRecord) -> None:
    assert codec.verify_record(record) is False


SMALL_ORDER_KEYS = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    b"\xec" + b"\xff" * 30 + b"\x7f",
    b"\xed" + b"\xff" * 30 + b"\x7f",
    b"\xee" + b"\xff" * 30 + b"\x7f",
]


@pytest.mark.parametrize("public_key", SMALL_ORDER_KEYS)
def test_small_order_keys_are_detected(public_key: bytes) -> None:
    assert codec.is_small_order(public_key)
    assert codec.is_small_order(public_key[:31] + bytes([public_key[31] ^ 0x80]))


def test_ordinary_keys_are_not_small_order() -> None:
    for member in (ALICE, BOB, CAROL):
        assert not codec.is_small_order(member.public_key)


def test_a_small_order_key_cannot_vouch_for_a_record() -> None:
    record = MemberRecord(bytes(32), 1, RecordStatus.ALIVE, (), NatInfo(), bytes(64))
    Ed25519PublicKey.from_public_bytes(record.public_key).verify(
        record.signature, codec.record_signing_bytes(record)
    )
    assert not codec.verify_record(record)


def test_make_record_rejects_a_signer_that_returns_garbage() -> None:
    with pytest.raises(LocalProtocolError):
        codec.make_record(ALICE.public_key, 1, RecordStatus.ALIVE, (), NatInfo(), lambda _: b"x")


# --- sizes and chunking ------------------------------------------------------------------------


def test_each_update_adds_exactly_its_update_size() -> None:
    updates = every_message()[1]
    assert isinstance(updates, Ping)
    bare = codec.encoded_size(Ping(1, BOB.public_key))
    assert bare == codec.OVERHEAD + 8 + 32 + 1 == 85
    assert codec.encoded_size(updates) == bare + sum(codec.update_size(u) for u in updates.updates)
    assert codec.update_size(Suspect(bytes(32), 1, bytes(32))) == 73


def test_the_capacities_quoted_in_the_wire_document() -> None:
    accusation = Suspect(BOB.public_key, 1, CAROL.public_key)
    assert codec.encoded_size(Ping(1, BOB.public_key, (accusation,) * 16)) <= codec.MAX_DATAGRAM
    assert codec.encoded_size(Ping(1, BOB.public_key, (accusation,) * 17)) > codec.MAX_DATAGRAM
    alive = Alive(ALICE.record(1, Endpoint("192.0.2.1", 1), Endpoint("192.0.2.2", 2)))
    assert codec.update_size(alive) == 124
    assert codec.encoded_size(Ping(1, BOB.public_key, (alive,) * 9)) <= codec.MAX_DATAGRAM
    assert codec.encoded_size(Ping(1, BOB.public_key, (alive,) * 10)) > codec.MAX_DATAGRAM
    entry = StateEntry(ALICE.record(1, Endpoint("192.0.2.1", 1)))
    assert [len(c) for c in codec.chunk_state_entries([entry] * 25)] == [10, 10, 5]
    assert codec.encoded_size(StateDigest(1, True, (0,) * 256)) == 1079


def test_a_state_digest_buckets_about_four_members_each_up_to_256() -> None:
    counts = [codec.digest_bucket_count(n) for n in (0, 1, 4, 5, 8, 9, 100, 1000, 10**6)]
    assert counts == [1, 1, 1, 2, 2, 4, 32, 256, 256]
    assert codec.digest_bucket(bytes([0x80]) + bytes(31), 2) == 1
    assert codec.digest_bucket(bytes([0x7F]) + bytes(31), 2) == 0
    assert codec.digest_bucket(bytes([0xFF]) + bytes(31), 256) == 255


def digest_of(entries: list[StateEntry], buckets: int) -> tuple[int, ...]:
    hashes = [(e.record.public_key, codec.entry_digest(e.record, e.suspect_or_dead))
              for e in entries]
    return codec.state_digest(hashes, buckets)


def test_a_state_digest_shows_every_record_and_accusation_in_its_bucket_only() -> None:
    members = [Member.from_byte(n) for n in range(10, 30)]
    entries = [StateEntry(m.record(1)) for m in members]
    digest = digest_of(entries, 4)
    assert digest_of(entries[::-1], 4) == digest
    for index, change in enumerate(
        [
            StateEntry(members[3].record(2)),
            StateEntry(members[3].record(1), Suspect(members[3].public_key, 1, ALICE.public_key)),
            StateEntry(members[3].record(1), Dead(members[3].public_key, 1, ALICE.public_key)),
            StateEntry(members[3].record(1), Suspect(members[3].public_key, 2, ALICE.public_key)),
        ]
    ):
        changed = digest_of([*entries[:3], change, *entries[4:]], 4)
        differing = [b for b in range(4) if changed[b] != digest[b]]
        assert differing == [codec.digest_bucket(members[3].public_key, 4)], index
    assert digest_of(entries[:3] + entries[4:], 4) != digest


def test_state_entries_chunk_into_datagrams_within_budget() -> None:
    members = [Member.from_byte(n) for n in range(10, 60)]
    entries = [
        StateEntry(m.record(n, *(Endpoint(f"2001:db8::{n}:{i}", 1000 + i) for i in range(n % 5))))
        for n, m in enumerate(members)
    ]
    chunks = codec.chunk_state_entries(entries)
    assert len(chunks) > 1
    assert [e for chunk in chunks for e in chunk] == entries
    for part, chunk in enumerate(chunks):
        message = StateSync(1, part, len(chunks), True, chunk)
        assert len(seal_to_bob(message)) == codec.encoded_size(message) <= codec.MAX_DATAGRAM
    for first, second in itertools.pairwise(chunks):
        message = StateSync(1, 0, 1, True, (*first, second[0]))
        assert codec.encoded_size(message) > codec.MAX_DATAGRAM


def test_no_entries_still_make_one_chunk() -> None:
    assert codec.chunk_state_entries([]) == [()]


def test_an_entry_that_cannot_fit_the_budget_is_caller_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        codec.chunk_state_entries([StateEntry(ALICE.record())], budget=150)
