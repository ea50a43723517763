"""Property tests of the wire codec (DESIGN.md §7, layer 3).

Every message round-trips; bytes from the network either decode or raise ``DecodeError``;
a meshguard datagram is never classified as WireGuard or STUN; any altered byte or a wrong
key fails authentication; and the body encoding is canonical (one message, one encoding).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshguard.sansio import codec
from meshguard.sansio.codec import DatagramKind, MessageType
from meshguard.sansio.codec_wire import decode_body, encode_body
from meshguard.sansio.errors import DecodeError
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

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

keys = st.binary(min_size=32, max_size=32)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
hosts = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n))),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
    st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv6Address(0xFFFF << 32 | n))),
)
endpoints = st.builds(Endpoint, hosts, st.integers(1, 65535))
nat_infos = st.builds(
    NatInfo,
    st.sampled_from(NatMapping),
    st.sampled_from(NatFiltering),
    st.booleans(),
    st.booleans(),
)
records = st.builds(
    MemberRecord,
    keys,
    u64,
    st.sampled_from(RecordStatus),
    st.lists(endpoints, max_size=4).map(tuple),
    nat_infos,
    st.binary(min_size=64, max_size=64),
)
updates: st.SearchStrategy[Update] = st.one_of(
    st.builds(Alive, records),
    st.builds(Suspect, keys, u64, keys),
    st.builds(Dead, keys, u64, keys),
)
update_lists = st.lists(updates, max_size=6).map(tuple)


@st.composite
def state_entries(draw: st.DrawFn) -> StateEntry:
    record = draw(records)
    kind = draw(st.sampled_from([None, Suspect, Dead]))
    if kind is None:
        return StateEntry(record)
    return StateEntry(record, kind(record.public_key, draw(u64), draw(keys)))


@st.composite
def state_syncs(draw: st.DrawFn) -> StateSync:
    parts = draw(st.integers(1, 65535))
    return StateSync(
        draw(u64),
        draw(st.integers(0, parts - 1)),
        parts,
        draw(st.booleans()),
        tuple(draw(st.lists(state_entries(), max_size=5))),
    )


candidates = st.lists(endpoints, max_size=16).map(tuple)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Ping, u64, keys, update_lists),
    st.builds(Ack, u64, update_lists),
    st.builds(PingReq, u64, keys, endpoints, update_lists),
    st.builds(IndirectAck, u64, keys, update_lists),
    st.builds(Nack, u64, keys),
    state_syncs(),
    st.builds(
        StateDigest,
        u64,
        st.booleans(),
        st.integers(0, 8).flatmap(
            lambda bits: st.lists(
                st.integers(0, 2**32 - 1), min_size=1 << bits, max_size=1 << bits
            ).map(tuple)
        ),
    ),
    st.builds(PunchRequest, u64, keys, keys, candidates),
    st.builds(PunchResponse, u64, keys, keys, candidates),
    st.builds(PunchProbe, u64, u64, st.booleans()),
    st.builds(RelayEnvelope, keys, st.binary(min_size=1, max_size=1500)),
    st.builds(EndpointUpdate, records),
)
nonces = st.binary(min_size=12, max_size=12)
key_ids = st.binary(min_size=8, max_size=8)


def seal_body(message_type: int, body: bytes, key: bytes, nonce: bytes) -> bytes:
    """An authentic datagram around an arbitrary body, bypassing the encoder."""
    header = b"mg\x01" + bytes([message_type, 0, 0, 0, 0]) + bytes(8) + nonce
    return header + ChaCha20Poly1305(key).encrypt(nonce, body, header)


def assert_canonical(message_type: MessageType, body: bytes, key: bytes, nonce: bytes) -> None:
    """Opening gives a message whose encoding is exactly ``body``, or a DecodeError."""
    try:
        message = codec.open_datagram(seal_body(message_type, body, key, nonce), key)
    except DecodeError:
        return
    assert encode_body(message) == (message_type, body)


@PROPERTY
@given(messages, key_ids, keys, nonces)
def test_every_message_round_trips_with_an_exact_size(
    message: Message, sender: bytes, key: bytes, nonce: bytes
) -> None:
    datagram = codec.seal(message, sender, key, nonce)
    assert codec.open_datagram(datagram, key) == message
    assert codec.peek_sender(datagram) == sender
    assert len(datagram) == codec.encoded_size(message)


@PROPERTY
@given(messages, key_ids, keys, nonces)
def test_no_meshguard_datagram_looks_like_wireguard_or_stun(
    message: Message, sender: bytes, key: bytes, nonce: bytes
) -> None:
    datagram = codec.seal(message, sender, key, nonce)
    assert int.from_bytes(datagram[0:4], "little") not in range(1, 5)
    assert int.from_bytes(datagram[4:8], "big") != 0x2112A442
    assert codec.classify(datagram) is DatagramKind.MESHGUARD


@PROPERTY
@given(st.binary(max_size=2000), keys)
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes, key: bytes) -> None:
    try:
        message = codec.open_datagram(data, key)
    except DecodeError:
        return
    raise AssertionError(f"random bytes authenticated as {message!r}")


@PROPERTY
@given(st.binary(max_size=64).flatmap(lambda tail: st.tuples(st.sampled_from(MessageType),
       st.just(tail))), keys)
def test_arbitrary_bytes_behind_a_valid_header_raise_only_decode_error(
    typed: tuple[MessageType, bytes], key: bytes
) -> None:
    message_type, tail = typed
    datagram = b"mg\x01" + bytes([message_type, 0, 0, 0, 0]) + tail
    try:
        codec.open_datagram(datagram, key)
    except DecodeError:
        return
    raise AssertionError("an unauthenticated datagram opened")


@PROPERTY
@given(st.sampled_from(MessageType), st.binary(max_size=400), keys, nonces)
def test_arbitrary_authentic_bodies_decode_canonically_or_raise_decode_error(
    message_type: MessageType, body: bytes, key: bytes, nonce: bytes
) -> None:
    assert_canonical(message_type, body, key, nonce)


@PROPERTY
@given(messages, st.data(), keys, nonces)
def test_mutated_authentic_bodies_decode_canonically_or_raise_decode_error(
    message: Message, data: st.DataObject, key: bytes, nonce: bytes
) -> None:
    message_type, body = encode_body(message)
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = data.draw(st.integers(0, len(mutated)))
        if action == "flip" and position < len(mutated):
            mutated[position] ^= data.draw(st.integers(1, 255))
        elif action == "insert":
            mutated.insert(position, data.draw(st.integers(0, 255)))
        elif action == "delete" and position < len(mutated):
            del mutated[position]
        elif action == "truncate":
            del mutated[position:]
    assert_canonical(message_type, bytes(mutated), key, nonce)


@PROPERTY
@given(messages, key_ids, keys, nonces, st.data())
def test_changing_any_byte_of_a_datagram_makes_it_fail(
    message: Message, sender: bytes, key: bytes, nonce: bytes, data: st.DataObject
) -> None:
    datagram = bytearray(codec.seal(message, sender, key, nonce))
    index = data.draw(st.integers(0, len(datagram) - 1))
    datagram[index] ^= data.draw(st.integers(1, 255))
    try:
        codec.open_datagram(bytes(datagram), key)
    except DecodeError:
        return
    raise AssertionError(f"datagram altered at byte {index} still opened")


@PROPERTY
@given(messages, key_ids, keys, keys, nonces)
def test_a_wrong_key_fails(
    message: Message, sender: bytes, key: bytes, other: bytes, nonce: bytes
) -> None:
    datagram = codec.seal(message, sender, key, nonce)
    if other == key:
        return
    try:
        codec.open_datagram(datagram, other)
    except DecodeError:
        return
    raise AssertionError("opened under the wrong key")


@PROPERTY
@given(st.integers(1, 4), st.binary(max_size=200))
def test_wireguard_prefixes_classify_as_wireguard(message_type: int, rest: bytes) -> None:
    assert codec.classify(bytes([message_type, 0, 0, 0]) + rest) is DatagramKind.WIREGUARD


@PROPERTY
@given(
    st.sampled_from([0x0001, 0x0101, 0x0111, 0x0011]),
    st.integers(0, 200).map(lambda n: n * 4),
    st.binary(min_size=12, max_size=12),
)
def test_stun_binding_headers_classify_as_stun(
    message_type: int, length: int, transaction: bytes
) -> None:
    header = message_type.to_bytes(2, "big") + length.to_bytes(2, "big")
    datagram = header + codec.STUN_MAGIC_COOKIE + transaction + bytes(length)
    assert codec.classify(datagram) is DatagramKind.STUN


@PROPERTY
@given(st.binary(max_size=100))
def test_classify_accepts_any_bytes(data: bytes) -> None:
    kind = codec.classify(data)
    if kind is DatagramKind.WIREGUARD:
        assert len(data) >= 4 and 1 <= int.from_bytes(data[:4], "little") <= 4
    elif kind is DatagramKind.STUN:
        assert data[4:8] == codec.STUN_MAGIC_COOKIE


def builders(seq: int, target: bytes) -> list[Callable[[tuple[Update, ...]], Message]]:
    return [
        lambda carried: Ping(seq, target, carried),
        lambda carried: Ack(seq, carried),
        lambda carried: IndirectAck(seq, target, carried),
        lambda carried: PingReq(seq, target, Endpoint("192.0.2.1", 1), carried),
    ]


@PROPERTY
@given(st.integers(0, 3), u64, keys, update_lists)
def test_updates_add_exactly_their_size(
    which: int, seq: int, target: bytes, piggyback: tuple[Update, ...]
) -> None:
    build = builders(seq, target)[which]
    total = codec.encoded_size(build(()))
    assert codec.encoded_size(build(piggyback)) == total + sum(map(codec.update_size, piggyback))


@PROPERTY
@given(st.lists(state_entries(), max_size=40), st.integers(400, 1500))
def test_state_chunks_fit_their_budget_and_keep_every_entry_in_order(
    entries: list[StateEntry], budget: int
) -> None:
    chunks = codec.chunk_state_entries(entries, budget)
    assert [entry for chunk in chunks for entry in chunk] == entries
    assert chunks
    for part, chunk in enumerate(chunks):
        message = StateSync(1, part, len(chunks), False, chunk)
        assert codec.encoded_size(message) <= budget
        assert decode_body(MessageType.STATE_SYNC, encode_body(message)[1]) == message
