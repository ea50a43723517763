"""Noise_IKpsk2 handshakes between two in-memory devices, and the ways they must fail."""

from __future__ import annotations

import ipaddress

import pytest
from wg_helpers import A_ADDR, A_IP, B_ADDR, B_IP, Pair, ipv4_packet

from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.wireguard import DeviceConfig, HandshakeCompleted
from meshguard.sansio.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    KEEPALIVE_SIZE,
    RESPONSE_SIZE,
)

PSK = bytes(range(32))


def completed(events: list[object]) -> int:
    return sum(isinstance(e, HandshakeCompleted) for e in events)


@pytest.mark.parametrize("psk", [None, PSK], ids=["no-psk", "psk"])
@pytest.mark.parametrize("initiator", ["a", "b"])
def test_handshake_then_data_both_ways(psk: bytes | None, initiator: str) -> None:
    pair = Pair(psk_a=psk, psk_b=psk)
    one, other = (pair.a, pair.b) if initiator == "a" else (pair.b, pair.a)
    one.initiate_handshake(other.public_key, 0.0)
    sent = one.datagrams_to_send()
    assert [len(d) for d, _ in sent] == [INITIATION_SIZE]
    assert sent[0][0][:4] == b"\x01\x00\x00\x00"
    other.receive_datagram(sent[0][0], A_ADDR if initiator == "a" else B_ADDR, 0.0)
    response = other.datagrams_to_send()
    assert [len(d) for d, _ in response] == [RESPONSE_SIZE]
    assert response[0][0][:4] == b"\x02\x00\x00\x00"
    assert response[0][0][8:12] == sent[0][0][4:8], "response names the initiator's index"
    one.receive_datagram(response[0][0], B_ADDR if initiator == "a" else A_ADDR, 0.0)
    pair.deliver(0.0)
    assert completed(pair.a.events()) == 1
    assert completed(pair.b.events()) == 1
    assert pair.a.peer_stats(pair.b.public_key).handshake_completed
    last_handshake = pair.a.peer_stats(pair.b.public_key).last_handshake
    assert last_handshake is not None and 1_700_000_000 < last_handshake <= pair.wall.now

    to_b = ipv4_packet(A_IP, B_IP, b"ping")
    to_a = ipv4_packet(B_IP, A_IP, b"pong")
    pair.a.send_packets([to_b], 1.0)
    pair.b.send_packets([to_a], 1.0)
    pair.deliver(1.0)
    assert pair.b.tun_packets() == [to_b]
    assert pair.a.tun_packets() == [to_a]
    assert not pair.a.counters and not pair.b.counters


def test_wrong_preshared_key_never_completes() -> None:
    pair = Pair(psk_a=PSK, psk_b=bytes(32))
    pair.handshake(0.0)
    assert completed(pair.a.events()) == 0
    assert completed(pair.b.events()) == 0
    assert pair.a.counters["handshake_invalid"] == 1
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 1.0)
    pair.deliver(1.0)
    assert pair.b.tun_packets() == []


def test_preshared_key_on_one_side_only_fails() -> None:
    pair = Pair(psk_a=PSK)
    pair.handshake(0.0)
    assert completed(pair.a.events()) == 0


def test_responder_queues_data_until_the_initiator_confirms_the_session() -> None:
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    pair.b.receive_datagram(initiation, A_ADDR, 0.0)
    (response, _), = pair.b.datagrams_to_send()
    reply = ipv4_packet(B_IP, A_IP, b"early")
    pair.b.send_packets([reply], 0.1)
    assert pair.b.datagrams_to_send() == [], "responder may not send before confirmation"
    pair.a.receive_datagram(response, B_ADDR, 0.2)
    (keepalive, _), = pair.a.datagrams_to_send()
    assert len(keepalive) == KEEPALIVE_SIZE
    pair.b.receive_datagram(keepalive, A_ADDR, 0.3)
    assert completed(pair.b.events()) == 1
    flushed = pair.b.datagrams_to_send()
    assert len(flushed) == 1
    pair.a.receive_datagram(flushed[0][0], B_ADDR, 0.3)
    assert pair.a.tun_packets() == [reply]


def test_initiator_sends_queued_packets_when_the_handshake_completes() -> None:
    pair = Pair()
    packets = [ipv4_packet(A_IP, B_IP, bytes([i]) * 10) for i in range(5)]
    pair.a.send_packets(packets, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    assert len(initiation) == INITIATION_SIZE
    pair.a.initiate_handshake(pair.b.public_key, 1.0)
    assert pair.a.datagrams_to_send() == [], "initiations are at most one per REKEY_TIMEOUT"
    pair.b.receive_datagram(initiation, A_ADDR, 1.0)
    (response, _), = pair.b.datagrams_to_send()
    pair.a.receive_datagram(response, B_ADDR, 1.0)
    queued = pair.a.datagrams_to_send()
    assert len(queued) == 5, "the queued packets confirm the session; no separate keepalive"
    pair.b.receive_datagrams([d for d, _ in queued], A_ADDR, 1.0)
    assert pair.b.tun_packets() == packets


def test_queue_for_a_handshake_is_bounded_and_drops_the_oldest() -> None:
    pair = Pair(config_a=DeviceConfig(staged_packets=3))
    packets = [ipv4_packet(A_IP, B_IP, bytes([i])) for i in range(5)]
    pair.a.send_packets(packets, 0.0)
    assert pair.a.counters["queue_full"] == 2
    pair.deliver(0.0)
    assert pair.b.tun_packets() == packets[2:]


def test_replayed_initiation_is_rejected() -> None:
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    pair.b.receive_datagram(initiation, A_ADDR, 0.0)
    assert len(pair.b.datagrams_to_send()) == 1
    pair.b.receive_datagram(initiation, A_ADDR, 10.0)
    assert pair.b.datagrams_to_send() == []
    assert pair.b.counters["handshake_replay"] == 1


def test_initiation_with_an_older_timestamp_is_rejected() -> None:
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (first, _), = pair.a.datagrams_to_send()
    pair.wall.now -= 60
    pair.a.initiate_handshake(pair.b.public_key, 10.0)
    (older, _), = pair.a.datagrams_to_send()
    pair.b.receive_datagram(first, A_ADDR, 0.0)
    pair.b.datagrams_to_send()
    pair.b.receive_datagram(older, A_ADDR, 10.0)
    assert pair.b.datagrams_to_send() == []
    assert pair.b.counters["handshake_replay"] == 1


def test_initiations_closer_than_a_fiftieth_of_a_second_are_rejected() -> None:
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (first, _), = pair.a.datagrams_to_send()
    pair.wall.now += 1
    pair.a.initiate_handshake(pair.b.public_key, 5.0)
    (second, _), = pair.a.datagrams_to_send()
    pair.wall.now += 1
    pair.a.initiate_handshake(pair.b.public_key, 10.0)
    (third, _), = pair.a.datagrams_to_send()
    pair.b.receive_datagram(first, A_ADDR, 100.0)
    pair.b.receive_datagram(second, A_ADDR, 100.01)
    assert pair.b.counters["handshake_flood"] == 1
    pair.b.receive_datagram(third, A_ADDR, 100.05)
    assert len(pair.b.datagrams_to_send()) == 2


def test_initiation_from_an_unknown_key_gets_no_answer() -> None:
    pair = Pair()
    stranger = Pair(seed=9)
    stranger.a.add_peer(pair.b.public_key, endpoint=B_ADDR, now=0.0)
    stranger.a.initiate_handshake(pair.b.public_key, 0.0)
    for data, _ in stranger.a.datagrams_to_send():
        if len(data) == INITIATION_SIZE:
            pair.b.receive_datagram(data, ("203.0.113.9", 1), 0.0)
    assert pair.b.datagrams_to_send() == []
    assert pair.b.counters["handshake_invalid"] == 1


@pytest.mark.parametrize("message", ["initiation", "response"])
def test_every_corrupted_byte_is_dropped_without_an_answer(message: str) -> None:
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    if message == "initiation":
        original, receiver, source = initiation, pair.b, A_ADDR
    else:
        pair.b.receive_datagram(initiation, A_ADDR, 0.0)
        (original, _), = pair.b.datagrams_to_send()
        receiver, source = pair.a, B_ADDR
    for i in range(len(original) - 16):  # the last 16 bytes are mac2, unchecked when not loaded
        corrupted = bytearray(original)
        corrupted[i] ^= 0x40
        receiver.receive_datagram(bytes(corrupted), source, 1.0)
        assert receiver.datagrams_to_send() == [], i
    assert receiver.events() == []
    assert sum(receiver.counters.values()) == len(original) - 16


def test_truncated_and_extended_handshake_messages_are_malformed() -> None:
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    for size in (0, 1, 3, 4, 40, INITIATION_SIZE - 1):
        pair.b.receive_datagram(initiation[:size], A_ADDR, 0.0)
    pair.b.receive_datagram(initiation + b"\x00", A_ADDR, 0.0)
    pair.b.receive_datagram(initiation[:COOKIE_REPLY_SIZE - 1], A_ADDR, 0.0)
    assert pair.b.datagrams_to_send() == []
    assert pair.b.counters["malformed"] == 8


def test_same_seed_same_bytes() -> None:
    def run() -> list[bytes]:
        pair = Pair(seed=5)
        pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 0.0)
        out = []
        for _ in range(3):
            sent = pair.a.datagrams_to_send()
            out += [d for d, _ in sent]
            for data, _ in sent:
                pair.b.receive_datagram(data, A_ADDR, 0.0)
            sent = pair.b.datagrams_to_send()
            out += [d for d, _ in sent]
            for data, _ in sent:
                pair.a.receive_datagram(data, B_ADDR, 0.0)
        return out

    assert run() == run()


def test_caller_misuse_raises_local_protocol_error() -> None:
    pair = Pair()
    with pytest.raises(LocalProtocolError):
        pair.a.add_peer(pair.b.public_key, now=0.0)
    with pytest.raises(LocalProtocolError):
        pair.a.add_peer(b"short", now=0.0)
    with pytest.raises(LocalProtocolError):
        pair.a.add_peer(pair.a.public_key, now=0.0)
    with pytest.raises(LocalProtocolError):
        pair.a.add_peer(bytes(32), now=0.0)  # a low-order point
    with pytest.raises(LocalProtocolError):
        pair.a.add_peer(b"\x09" + bytes(31), preshared_key=b"x", now=0.0)
    with pytest.raises(LocalProtocolError):
        pair.a.add_peer(b"\x09" + bytes(31), allowed_ips=["10.0.0.0/8"], now=0.0)  # type: ignore[list-item]
    with pytest.raises(LocalProtocolError):
        pair.a.peer_stats(b"\x09" + bytes(31))
    with pytest.raises(LocalProtocolError):
        pair.a.initiate_handshake(b"\x09" + bytes(31), 0.0)
    assert pair.a.peers() == [pair.b.public_key]
    assert pair.a.allowed_ips(pair.b.public_key) == [
        ipaddress.ip_network(f"{B_IP}/32"),
        ipaddress.ip_network("fd00::2/128"),
    ]


def test_nonsense_configuration_is_refused() -> None:
    for bad in (
        {"mtu": 10},
        {"staged_packets": 0},
        {"under_load_handshakes_per_second": -1},
        {"handshakes_per_source_per_second": 0.0},
    ):
        with pytest.raises(LocalProtocolError):
            DeviceConfig(**bad)  # type: ignore[arg-type]
