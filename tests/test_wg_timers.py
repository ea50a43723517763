"""Every WireGuard timer, driven through next_deadline/on_timer with explicit time."""

from __future__ import annotations

import itertools

from wg_helpers import A_ADDR, A_IP, B_ADDR, B_IP, Pair, ipv4_packet

from meshguard.sansio.wireguard import HandshakeCompleted, PeerUnreachable, SessionExpired
from meshguard.sansio.wireguard.constants import (
    KEEPALIVE_SIZE,
    KEEPALIVE_TIMEOUT,
    LAST_MINUTE_HANDSHAKE_AGE,
    MAX_TIMER_HANDSHAKES,
    MESSAGE_INITIATION,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    ZERO_KEY_MATERIAL_AFTER,
)

JITTER_MAX = 0.334


def established(**kwargs: object) -> Pair:
    pair = Pair(**kwargs)  # type: ignore[arg-type]
    pair.handshake(0.0)
    assert not pair.a.counters and not pair.b.counters
    pair.a.events()
    pair.b.events()
    return pair


def keepalives(pair: Pair, side: str) -> list[float]:
    return [t for t, s, kind, size in pair.sent if s == side and kind == 4 and size == 32]


def test_deadlines_are_never_in_the_past_and_early_calls_are_harmless() -> None:
    pair = established()
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 1.0)
    pair.deliver(1.0)
    deadline = pair.b.next_deadline()
    assert deadline is not None and deadline > 1.0
    pair.b.on_timer(deadline - 0.5)
    assert pair.b.datagrams_to_send() == []
    assert pair.b.next_deadline() == deadline


def test_passive_keepalive_after_keepalive_timeout_without_reply() -> None:
    pair = established()
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 1.0)
    pair.deliver(1.0)
    pair.advance(30.0)
    assert keepalives(pair, "b") == [1.0 + KEEPALIVE_TIMEOUT]
    assert pair.b.tun_packets() == [ipv4_packet(A_IP, B_IP, b"x")]
    assert pair.a.tun_packets() == [], "keepalives never reach the TUN"
    assert pair.sends("a", MESSAGE_INITIATION) == [0.0], "the keepalive proved the session"


def test_no_keepalive_when_data_flows_back() -> None:
    pair = established()
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 1.0)
    pair.deliver(1.0)
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"y")], 2.0)
    pair.deliver(2.0)
    pair.advance(12.5)
    assert keepalives(pair, "b") == []
    assert keepalives(pair, "a") == [0.0, 2.0 + KEEPALIVE_TIMEOUT]


def test_another_keepalive_when_data_arrived_while_one_was_pending() -> None:
    pair = established()
    for t in (1.0, 3.0):
        pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], t)
        pair.deliver(t)
    pair.advance(40.0)
    assert keepalives(pair, "b") == [11.0, 21.0]


def test_new_handshake_when_sent_data_gets_no_answer() -> None:
    pair = established()
    pair.b_to_a_up = False
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 1.0)
    pair.deliver(1.0)
    pair.advance(1.0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + JITTER_MAX)
    initiations = pair.sends("a", MESSAGE_INITIATION)
    assert len(initiations) == 2
    delay = initiations[1] - 1.0
    assert KEEPALIVE_TIMEOUT + REKEY_TIMEOUT <= delay < KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.334


def test_rekey_after_time_by_the_initiator_only() -> None:
    pair = established()
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"y")], REKEY_AFTER_TIME + 1)
    assert pair.sends("b", MESSAGE_INITIATION) == []
    pair.deliver(REKEY_AFTER_TIME + 1)
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], REKEY_AFTER_TIME - 1)
    pair.deliver(REKEY_AFTER_TIME - 1)
    assert pair.sends("a", MESSAGE_INITIATION) == [0.0]
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], REKEY_AFTER_TIME + 2)
    pair.deliver(REKEY_AFTER_TIME + 2)
    assert pair.sends("a", MESSAGE_INITIATION) == [0.0, REKEY_AFTER_TIME + 2]
    assert any(isinstance(e, HandshakeCompleted) for e in pair.a.events())
    assert len(pair.b.tun_packets()) == 2


def test_reject_after_time_stops_sending_and_receiving_on_the_old_session() -> None:
    pair = established()
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"late")], REJECT_AFTER_TIME - 1)
    (late,) = [d for d, _ in pair.a.datagrams_to_send() if d[0] == MESSAGE_TRANSPORT]
    pair.b.receive_datagram(late, A_ADDR, REJECT_AFTER_TIME)
    assert pair.b.tun_packets() == []
    assert pair.b.counters["expired_session"] == 1
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"y")], REJECT_AFTER_TIME + 1)
    sent = pair.b.datagrams_to_send()
    assert [d[0] for d, _ in sent] == [MESSAGE_INITIATION], "packet queued, handshake started"
    for data, _ in sent:
        pair.a.receive_datagram(data, B_ADDR, REJECT_AFTER_TIME + 1)
    pair.deliver(REJECT_AFTER_TIME + 1)
    # A's own rekey initiation (sent with "late") was lost, so the two initiations may have
    # collided; a retransmission settles it.
    pair.advance(REJECT_AFTER_TIME + 1 + REKEY_TIMEOUT + JITTER_MAX)
    assert pair.a.tun_packets() == [ipv4_packet(B_IP, A_IP, b"y")]


def test_retransmits_with_jitter_then_gives_up_after_rekey_attempt_time() -> None:
    pair = Pair()
    pair.a_to_b_up = False
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 0.0)
    pair.deliver(0.0)
    pair.advance(300.0)
    initiations = pair.sends("a", MESSAGE_INITIATION)
    assert len(initiations) == 1 + MAX_TIMER_HANDSHAKES + 1
    gaps = [b - a for a, b in itertools.pairwise(initiations)]
    assert all(REKEY_TIMEOUT <= gap < REKEY_TIMEOUT + JITTER_MAX for gap in gaps)
    assert len({round(gap, 3) for gap in gaps}) > 1, "the jitter varies"
    unreachable = [e for e in pair.a.events() if isinstance(e, PeerUnreachable)]
    assert unreachable == [PeerUnreachable(pair.b.public_key)]
    assert REKEY_ATTEMPT_TIME <= initiations[-1] < REKEY_ATTEMPT_TIME + 2 * REKEY_TIMEOUT
    pair.a_to_b_up = True
    pair.advance(1000.0)
    assert pair.b.tun_packets() == [], "the queued packet was dropped on giving up"


def test_a_fresh_packet_after_giving_up_tries_again() -> None:
    pair = Pair()
    pair.a_to_b_up = False
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 0.0)
    pair.advance(200.0)
    pair.a_to_b_up = True
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"again")], 201.0)
    pair.deliver(201.0)
    assert pair.b.tun_packets() == [ipv4_packet(A_IP, B_IP, b"again")]


def test_persistent_keepalive_keeps_sending() -> None:
    pair = Pair(keepalive_a=25.0)
    assert pair.sends("a", MESSAGE_INITIATION) == []
    pair.deliver(0.0)
    assert pair.sends("a", MESSAGE_INITIATION) == [0.0], "adding the peer starts a handshake"
    pair.advance(100.0)
    assert keepalives(pair, "a") == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert keepalives(pair, "b") == []


def test_persistent_keepalive_counts_from_the_last_packet_either_way() -> None:
    pair = Pair(keepalive_a=25.0)
    pair.deliver(0.0)
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"y")], 20.0)
    pair.deliver(20.0)
    pair.advance(56.0)
    # 20: data from B re-arms the persistent timer (45) and the passive one (30); the
    # passive keepalive at 30 is itself a packet, so the next persistent one is at 55.
    assert keepalives(pair, "a") == [0.0, 30.0, 55.0]


def test_session_keys_are_erased_after_three_reject_after_times() -> None:
    pair = established()
    pair.advance(ZERO_KEY_MATERIAL_AFTER + 1)
    assert pair.a.events() == [SessionExpired(pair.b.public_key)]
    assert pair.b.events() == [SessionExpired(pair.a.public_key)]
    assert pair.a.next_deadline() is None and pair.b.next_deadline() is None
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], ZERO_KEY_MATERIAL_AFTER + 2)
    pair.deliver(ZERO_KEY_MATERIAL_AFTER + 2)
    assert pair.b.tun_packets() == [ipv4_packet(A_IP, B_IP, b"x")]


def test_removed_peer_leaves_no_timers() -> None:
    pair = established()
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 1.0)
    pair.a.datagrams_to_send()
    assert pair.a.next_deadline() is not None
    pair.a.remove_peer(pair.b.public_key, 1.0)
    assert pair.a.next_deadline() is None
    pair.a.on_timer(1000.0)
    assert pair.a.datagrams_to_send() == []
    assert pair.a.peers() == []


def test_transport_keepalive_is_the_bare_header_and_tag() -> None:
    pair = established()
    transport = [(t, size) for t, s, kind, size in pair.sent if kind == MESSAGE_TRANSPORT]
    assert transport == [(0.0, KEEPALIVE_SIZE)]


def test_initiator_receiving_on_an_old_session_rekeys_before_it_dies() -> None:
    pair = established()
    pair.a_to_b_up = False
    for t in (LAST_MINUTE_HANDSHAKE_AGE - 1, LAST_MINUTE_HANDSHAKE_AGE + 1):
        pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"y")], t)
        pair.deliver(t)
    assert pair.sends("a", MESSAGE_INITIATION)[-1] == LAST_MINUTE_HANDSHAKE_AGE + 1
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"y")], LAST_MINUTE_HANDSHAKE_AGE + 6)
    pair.deliver(LAST_MINUTE_HANDSHAKE_AGE + 6)
    last_minute = [
        t for t in pair.sends("a", MESSAGE_INITIATION) if t >= LAST_MINUTE_HANDSHAKE_AGE
    ]
    assert last_minute == [LAST_MINUTE_HANDSHAKE_AGE + 1], "only once per session"


def test_rekey_after_messages_and_refusal_at_reject_after_messages() -> None:
    pair = established()
    session = pair.a._peers[pair.b.public_key].current  # white box: jump the counter
    assert session is not None
    session.send_counter = REKEY_AFTER_MESSAGES + 1
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 6.0)
    kinds = [d[0] for d, _ in pair.a.datagrams_to_send()]
    assert kinds == [MESSAGE_TRANSPORT, MESSAGE_INITIATION]
    session.send_counter = REJECT_AFTER_MESSAGES
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 7.0)
    assert pair.a.datagrams_to_send() == [], "queued: the session may not send any more"
