"""Cookies under load (whitepaper §5.4.7): mac2, 64-byte cookie replies, secret rotation."""

from __future__ import annotations

from wg_helpers import A_ADDR, A_IP, B_IP, Pair, ipv4_packet, seeded_entropy

from meshguard.sansio.wireguard import DeviceConfig, HandshakeCompleted
from meshguard.sansio.wireguard.constants import (
    COOKIE_REFRESH_TIME,
    COOKIE_REPLY_SIZE,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    REKEY_TIMEOUT,
)
from meshguard.sansio.wireguard.cookie import CookieChecker, CookieGenerator, LoadMonitor

ALWAYS_LOADED = DeviceConfig(under_load_handshakes_per_second=0)


def test_under_load_an_initiation_without_mac2_gets_a_cookie_reply_then_succeeds() -> None:
    pair = Pair(config_b=ALWAYS_LOADED)
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 0.0)
    (first, _), = pair.a.datagrams_to_send()
    assert first[-16:] == bytes(16), "no cookie yet: mac2 is zeros"
    pair.b.receive_datagram(first, A_ADDR, 0.0)
    (reply, reply_addr), = pair.b.datagrams_to_send()
    assert reply_addr == A_ADDR
    assert len(reply) == COOKIE_REPLY_SIZE and reply[0] == MESSAGE_COOKIE_REPLY
    assert reply[4:8] == first[4:8], "the reply names the initiation's sender index"
    assert pair.b.counters["under_load"] == 1
    assert pair.b.events() == []
    pair.deliver(0.0, b_from=A_ADDR)
    pair.a.receive_datagram(reply, ("192.0.2.2", 51820), 0.0)
    assert not pair.a.counters
    pair.advance(REKEY_TIMEOUT + 1)
    (retry,) = pair.sends("a", MESSAGE_INITIATION)
    assert REKEY_TIMEOUT <= retry < REKEY_TIMEOUT + 0.334
    assert any(isinstance(e, HandshakeCompleted) for e in pair.b.events())
    assert pair.b.tun_packets() == [ipv4_packet(A_IP, B_IP, b"x")]
    assert pair.b.counters["under_load"] == 1


def test_under_load_a_cookie_is_bound_to_the_source_address() -> None:
    pair = Pair(config_b=ALWAYS_LOADED)
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    pair.b.receive_datagram(initiation, A_ADDR, 0.0)
    (reply, _), = pair.b.datagrams_to_send()
    pair.a.receive_datagram(reply, ("192.0.2.2", 51820), 0.0)
    pair.a.initiate_handshake(pair.b.public_key, 6.0)
    (with_cookie, _), = pair.a.datagrams_to_send()
    assert with_cookie[-16:] != bytes(16)
    pair.b.receive_datagram(with_cookie, ("198.51.100.99", 51820), 6.0)
    assert [d[0] for d, _ in pair.b.datagrams_to_send()] == [MESSAGE_COOKIE_REPLY]
    pair.b.receive_datagram(with_cookie, A_ADDR, 6.0)
    assert [d[0] for d, _ in pair.b.datagrams_to_send()] == [MESSAGE_RESPONSE]


def test_cookie_secret_rotates_and_stored_cookies_expire() -> None:
    checker = CookieChecker(b"\x01" * 32, seeded_entropy(1))
    generator = CookieGenerator(b"\x01" * 32)
    body = b"\x01\x00\x00\x00" + bytes(112)
    message = generator.add_macs(body, 0.0)
    reply = checker.create_reply(message, 7, A_ADDR, 0.0)
    assert generator.consume_reply(reply, 1.0)
    signed = generator.add_macs(body, 2.0)
    assert checker.check_mac1(signed)
    assert checker.check_mac2(signed, A_ADDR, 2.0)
    assert not checker.check_mac2(signed, A_ADDR, COOKIE_REFRESH_TIME + 1), "secret too old"
    fresh_reply = checker.create_reply(signed, 7, A_ADDR, COOKIE_REFRESH_TIME + 1)
    assert not checker.check_mac2(signed, A_ADDR, COOKIE_REFRESH_TIME + 2), "secret rotated"
    assert generator.consume_reply(fresh_reply, COOKIE_REFRESH_TIME + 2)
    resigned = generator.add_macs(body, COOKIE_REFRESH_TIME + 3)
    assert checker.check_mac2(resigned, A_ADDR, COOKIE_REFRESH_TIME + 3)
    stale = generator.add_macs(body, 2 * COOKIE_REFRESH_TIME + 3)
    assert stale[-16:] == bytes(16), "a cookie is used for COOKIE_REFRESH_TIME only"


def test_a_bogus_or_unsolicited_cookie_reply_is_ignored() -> None:
    generator = CookieGenerator(b"\x01" * 32)
    checker = CookieChecker(b"\x01" * 32, seeded_entropy(2))
    message = b"\x01\x00\x00\x00" + bytes(112) + bytes(32)
    reply = checker.create_reply(message, 7, A_ADDR, 0.0)
    assert not generator.consume_reply(reply, 0.0), "no handshake message sent yet"
    generator.add_macs(b"\x01\x00\x00\x00" + bytes(112), 0.0)
    assert not generator.consume_reply(reply, 0.0), "reply to another message's mac1"
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    forged = (3).to_bytes(4, "little") + initiation[4:8] + bytes(56)
    pair.a.receive_datagram(forged, ("203.0.113.1", 1), 0.0)
    assert pair.a.counters == {"cookie_invalid": 1}
    pair.a.receive_datagram((3).to_bytes(4, "little") + bytes(60), ("203.0.113.1", 1), 0.0)
    assert pair.a.counters["unknown_index"] == 1


def test_load_is_a_rate_of_handshake_messages_and_lasts_a_second() -> None:
    monitor = LoadMonitor(handshakes_per_second=3)
    assert [monitor.note_handshake(0.1 * i) for i in range(4)] == [False, False, False, True]
    assert monitor.note_handshake(1.2)
    assert not monitor.note_handshake(1.5)


def test_under_load_each_source_is_rate_limited_even_with_valid_mac2() -> None:
    pair = Pair(config_b=ALWAYS_LOADED)
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    pair.b.receive_datagram(initiation, A_ADDR, 0.0)
    (reply, _), = pair.b.datagrams_to_send()
    pair.a.receive_datagram(reply, ("192.0.2.2", 51820), 0.0)
    pair.a.initiate_handshake(pair.b.public_key, 6.0)
    (signed, _), = pair.a.datagrams_to_send()
    for _ in range(10):
        pair.b.receive_datagram(signed, A_ADDR, 6.0)
    assert pair.b.counters["rate_limited"] == 5
    assert pair.b.counters["handshake_replay"] == 4
    assert len(pair.b.datagrams_to_send()) == 1


def test_not_under_load_mac2_is_not_required() -> None:
    pair = Pair(config_b=DeviceConfig(under_load_handshakes_per_second=1000))
    pair.handshake(0.0)
    assert any(isinstance(e, HandshakeCompleted) for e in pair.b.events())
    assert pair.b.counters == {}


def test_wrong_mac1_is_dropped_before_anything_else() -> None:
    pair = Pair(config_b=ALWAYS_LOADED)
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    (initiation, _), = pair.a.datagrams_to_send()
    bad = initiation[:-32] + bytes(16) + initiation[-16:]
    pair.b.receive_datagram(bad, A_ADDR, 0.0)
    assert pair.b.datagrams_to_send() == []
    assert pair.b.counters == {"mac1": 1}
