"""Transport sessions: cryptokey routing both ways, padding, roaming, rekeying without loss."""

from __future__ import annotations

import ipaddress
import random

from wg_helpers import (
    A_ADDR,
    A_IP,
    B_ADDR,
    B_IP,
    FakeWallClock,
    Pair,
    ipv4_packet,
    ipv6_packet,
    make_device,
)

from meshguard.sansio.wireguard import DeviceConfig, EndpointChanged, HandshakeCompleted
from meshguard.sansio.wireguard.constants import MESSAGE_INITIATION, MESSAGE_TRANSPORT


def established(**kwargs: object) -> Pair:
    pair = Pair(**kwargs)  # type: ignore[arg-type]
    pair.handshake(0.0)
    pair.a.events()
    pair.b.events()
    return pair


def transport(datagrams: list[tuple[bytes, tuple[str, int]]]) -> list[bytes]:
    return [d for d, _ in datagrams if d[0] == MESSAGE_TRANSPORT]


def test_ipv4_and_ipv6_route_to_the_owner_of_the_destination() -> None:
    pair = established()
    v4 = ipv4_packet(A_IP, B_IP, b"four")
    v6 = ipv6_packet("fd00::1", "fd00::2", b"six")
    pair.a.send_packets([v4, v6], 1.0)
    pair.deliver(1.0)
    assert pair.b.tun_packets() == [v4, v6]


def test_unroutable_and_malformed_packets_are_counted_and_dropped() -> None:
    pair = established()
    pair.a.send_packets(
        [
            ipv4_packet(A_IP, "10.0.0.3", b"x"),
            ipv6_packet("fd00::1", "fd00::3", b"x"),
            b"",
            b"\x45" * 19,
            b"\x60" * 39,
            b"\x10" * 60,
        ],
        1.0,
    )
    assert pair.a.datagrams_to_send() == []
    assert pair.a.counters == {"no_route": 2, "malformed_packet": 4}


def test_longest_prefix_wins_and_set_allowed_ips_moves_prefixes() -> None:
    wall = FakeWallClock()
    hub = make_device(1, wall)
    spokes = [make_device(10 + i, wall) for i in range(3)]
    networks = ["10.1.0.0/16", "10.1.2.0/24", "10.1.2.128/25"]
    for i, (spoke, network) in enumerate(zip(spokes, networks, strict=True)):
        hub.add_peer(
            spoke.public_key,
            allowed_ips=[ipaddress.ip_network(network)],
            endpoint=("192.0.2.10", 1000 + i),
            now=0.0,
        )

    def route(destination: str) -> int | None:
        hub.send_packets([ipv4_packet("10.9.9.9", destination, b"x")], 0.0)
        ports = [addr[1] for _, addr in hub.datagrams_to_send()]
        hub._routes.cache.clear()  # white box: take the uncached path too
        return ports[0] - 1000 if ports else None

    assert route("10.1.7.7") == 0
    assert route("10.1.2.7") == 1
    assert route("10.1.2.200") == 2
    assert route("10.2.0.1") is None
    hub.set_allowed_ips(spokes[0].public_key, [ipaddress.ip_network("10.1.2.0/24")])
    hub.on_timer(10.0)
    hub.datagrams_to_send()
    assert hub.allowed_ips(spokes[1].public_key) == []
    assert hub.allowed_ips(spokes[0].public_key) == [ipaddress.ip_network("10.1.2.0/24")]


def test_inbound_source_outside_the_senders_allowed_ips_is_dropped() -> None:
    pair = established()
    spoofed = ipv4_packet("10.0.0.99", A_IP, b"spoofed")
    genuine = ipv4_packet(B_IP, A_IP, b"genuine")
    pair.b.send_packets([spoofed, genuine], 1.0)
    pair.deliver(1.0)
    assert pair.a.tun_packets() == [genuine]
    assert pair.a.counters["not_allowed_ip"] == 1


def test_padding_to_sixteen_bytes_and_trimmed_on_receipt() -> None:
    pair = established(config_a=DeviceConfig(mtu=1420))
    sizes = [21, 32, 33, 1419, 1420]
    packets = [ipv4_packet(A_IP, B_IP, bytes(size - 20)) for size in sizes]
    pair.a.send_packets(packets, 1.0)
    datagrams = transport(pair.a.datagrams_to_send())
    assert [len(d) - 32 for d in datagrams] == [32, 32, 48, 1420, 1420]
    pair.b.receive_datagrams(datagrams, A_ADDR, 1.0)
    assert pair.b.tun_packets() == packets


def test_counter_nonce_is_in_the_header_and_increments() -> None:
    pair = established()
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")] * 3, 1.0)
    counters = [int.from_bytes(d[8:16], "little") for d in transport(pair.a.datagrams_to_send())]
    assert counters == [1, 2, 3], "counter 0 went out as the handshake-confirming keepalive"


def test_replayed_and_corrupted_transport_is_dropped() -> None:
    pair = established()
    packet = ipv4_packet(A_IP, B_IP, b"once")
    pair.a.send_packets([packet], 1.0)
    (datagram,) = transport(pair.a.datagrams_to_send())
    pair.b.receive_datagrams([datagram, datagram], A_ADDR, 1.0)
    assert pair.b.tun_packets() == [packet]
    assert pair.b.counters["replay"] == 1
    for i in range(len(datagram)):
        corrupted = bytearray(datagram)
        corrupted[i] ^= 1
        pair.b.receive_datagram(bytes(corrupted), A_ADDR, 1.0)
    assert pair.b.tun_packets() == []
    assert pair.b.counters["unknown_index"] + pair.b.counters["decrypt"] + pair.b.counters[
        "malformed"
    ] == len(datagram)
    for size in range(len(datagram)):
        pair.b.receive_datagrams([datagram[:size]], A_ADDR, 1.0)
    assert pair.b.tun_packets() == []


def test_inner_packet_whose_ip_length_field_lies_is_dropped() -> None:
    pair = established()
    for claimed in (200, 19):
        lying = bytearray(ipv4_packet(A_IP, B_IP, b"x" * 30))
        lying[2:4] = claimed.to_bytes(2, "big")
        pair.a.send_packets([bytes(lying)], 1.0)
    pair.deliver(1.0)
    assert pair.b.tun_packets() == []
    assert pair.b.counters["malformed_packet"] == 2


def test_endpoint_follows_the_latest_authenticated_packet() -> None:
    pair = established()
    roamed = ("198.51.100.7", 40000)
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"from new place")], 1.0)
    pair.deliver(1.0, a_from=roamed)
    assert pair.a.events() == [EndpointChanged(pair.b.public_key, roamed)]
    assert pair.a.peer_stats(pair.b.public_key).endpoint == roamed
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"reply")], 2.0)
    assert [addr for _, addr in pair.a.datagrams_to_send()] == [roamed]


def test_forged_packet_from_elsewhere_does_not_move_the_endpoint() -> None:
    pair = established()
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"x")], 1.0)
    (datagram,) = transport(pair.b.datagrams_to_send())
    forged = datagram[:-1] + bytes([datagram[-1] ^ 1])
    pair.a.receive_datagram(forged, ("203.0.113.66", 6666), 1.0)
    pair.a.receive_datagram(datagram, ("203.0.113.66", 6666), 1.0)
    pair.a.receive_datagram(datagram, B_ADDR, 1.0)
    assert pair.a.peer_stats(pair.b.public_key).endpoint == ("203.0.113.66", 6666)
    assert pair.a.counters == {"decrypt": 1, "replay": 1}


def test_initiation_teaches_a_responder_the_endpoint() -> None:
    wall = FakeWallClock()
    a = make_device(1, wall)
    b = make_device(2, wall)
    a.add_peer(b.public_key, allowed_ips=[ipaddress.ip_network("10.0.0.2/32")],
               endpoint=B_ADDR, now=0.0)
    b.add_peer(a.public_key, allowed_ips=[ipaddress.ip_network("10.0.0.1/32")], now=0.0)
    b.send_packets([ipv4_packet(B_IP, A_IP, b"x")], 0.0)
    assert b.datagrams_to_send() == []
    assert b.counters["no_endpoint"] == 1
    a.initiate_handshake(b.public_key, 0.0)
    for data, _ in a.datagrams_to_send():
        b.receive_datagram(data, ("198.51.100.1", 5555), 0.0)
    assert [addr for _, addr in b.datagrams_to_send()] == [("198.51.100.1", 5555)]
    assert b.events() == [EndpointChanged(a.public_key, ("198.51.100.1", 5555))]


def test_stats_count_bytes_each_way() -> None:
    pair = established()
    before = pair.a.peer_stats(pair.b.public_key)
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, bytes(100))], 1.0)
    pair.deliver(1.0)
    after_a = pair.a.peer_stats(pair.b.public_key)
    assert after_a.tx_bytes - before.tx_bytes == 32 + 128
    assert pair.b.peer_stats(pair.a.public_key).rx_bytes == 148 + 32 + 32 + 128


def test_rekey_under_continuous_traffic_loses_no_packet() -> None:
    """Both ways, a packet every 100 ms for 20 minutes, over a link with 30 ms latency
    and reordering within a batch; every packet arrives exactly once, in several sessions."""
    pair = Pair(seed=3)
    rng = random.Random(11)
    in_flight: list[tuple[float, str, bytes]] = []
    sent_to = {"a": [], "b": []}  # type: dict[str, list[bytes]]
    got = {"a": [], "b": []}  # type: dict[str, list[bytes]]
    handshakes = 0
    step = 0.1
    latency = 0.03
    now = 0.0
    sequence = 0
    while now < 1200.0:
        for side, device, src, dst in (("a", pair.a, A_IP, B_IP), ("b", pair.b, B_IP, A_IP)):
            packet = ipv4_packet(src, dst, sequence.to_bytes(4, "big"))
            sequence += 1
            sent_to["b" if side == "a" else "a"].append(packet)
            device.send_packets([packet], now)
        for side, device in (("a", pair.a), ("b", pair.b)):
            device.on_timer(now)
            batch = device.datagrams_to_send()
            rng.shuffle(batch)
            in_flight += [(now + latency, side, data) for data, _ in batch]
        due = [item for item in in_flight if item[0] <= now]
        in_flight = [item for item in in_flight if item[0] > now]
        for _, side, data in due:
            if side == "a":
                pair.b.receive_datagrams([data], A_ADDR, now)
            else:
                pair.a.receive_datagrams([data], B_ADDR, now)
        got["a"] += pair.a.tun_packets()
        got["b"] += pair.b.tun_packets()
        handshakes += sum(isinstance(e, HandshakeCompleted) for e in pair.a.events())
        pair.b.events()
        now = round(now + step, 6)
    for side in ("a", "b"):
        delivered = got[side]
        in_transit = len(sent_to[side]) - len(delivered)
        assert 0 <= in_transit <= 2 * int(latency / step + 2)
        assert sorted(delivered) == sorted(sent_to[side][: len(delivered)])
    assert handshakes >= 1200 // 120, "a new session at least every REKEY_AFTER_TIME"
    assert set(pair.a.counters) | set(pair.b.counters) <= {"handshake_collision"}


def test_simultaneous_initiations_settle_on_one_working_session() -> None:
    pair = Pair()
    pair.a.initiate_handshake(pair.b.public_key, 0.0)
    pair.b.initiate_handshake(pair.a.public_key, 0.0)
    pair.deliver(0.0)
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"ab")], 1.0)
    pair.b.send_packets([ipv4_packet(B_IP, A_IP, b"ba")], 1.0)
    pair.deliver(1.0)
    assert pair.b.tun_packets() == [ipv4_packet(A_IP, B_IP, b"ab")]
    assert pair.a.tun_packets() == [ipv4_packet(B_IP, A_IP, b"ba")]
    assert sorted(pair.sends("a", MESSAGE_INITIATION) + pair.sends("b", MESSAGE_INITIATION)) == [
        0.0,
        0.0,
    ], "settled without a retransmission"
    greater, lesser = sorted((pair.a, pair.b), key=lambda d: d.public_key, reverse=True)
    assert greater.counters == {"handshake_collision": 1}
    assert lesser.counters == {}, "it answered and dropped its own initiation, unanswered"


def test_crossed_initiations_with_a_peer_that_answered_ours_settle_in_one_round_trip() -> None:
    """Like wireguard-go, B answers A's initiation and so gives up its own (here because its
    own is already old); A, the lesser key, answers B's but keeps its own, so B's response
    completes a session at once instead of after a retransmission."""
    pair = Pair(seed=6)
    lesser, greater = sorted((pair.a, pair.b), key=lambda d: d.public_key)
    lesser_addr, greater_addr = (A_ADDR, B_ADDR) if lesser is pair.a else (B_ADDR, A_ADDR)
    greater.initiate_handshake(lesser.public_key, 0.0)
    (delayed, _), = greater.datagrams_to_send()
    lesser.initiate_handshake(greater.public_key, 5.2)
    (fresh, _), = lesser.datagrams_to_send()
    greater.receive_datagram(fresh, lesser_addr, 5.2)
    (response_to_lesser, _), = greater.datagrams_to_send()
    lesser.receive_datagram(delayed, greater_addr, 5.2)
    (response_to_greater, _), = lesser.datagrams_to_send()
    lesser.receive_datagram(response_to_lesser, greater_addr, 5.3)
    assert HandshakeCompleted(greater.public_key) in lesser.events()
    (keepalive, _), = lesser.datagrams_to_send()
    greater.receive_datagram(response_to_greater, lesser_addr, 5.3)
    greater.receive_datagram(keepalive, lesser_addr, 5.3)
    assert HandshakeCompleted(lesser.public_key) in greater.events()
    assert greater.counters == {"unknown_index": 1}, "it had given up its own initiation"
    assert lesser.counters == {}


def test_one_batch_may_mix_sessions_and_handshake_messages() -> None:
    """GRO batches from one address carrying an initiation between old-session packets, then
    the confirming keepalive between old- and new-session packets."""
    pair = established()
    old = [ipv4_packet(B_IP, A_IP, b"old%d" % i) for i in range(4)]
    pair.b.send_packets(old, 130.0)
    old_datagrams = transport(pair.b.datagrams_to_send())
    pair.b.initiate_handshake(pair.a.public_key, 130.0)
    (initiation, _), = pair.b.datagrams_to_send()
    pair.a.receive_datagrams([old_datagrams[0], initiation, old_datagrams[1]], B_ADDR, 130.0)
    (response, _), = pair.a.datagrams_to_send()
    pair.b.receive_datagram(response, A_ADDR, 130.1)
    (keepalive, _), = pair.b.datagrams_to_send()
    new = [ipv4_packet(B_IP, A_IP, b"new%d" % i) for i in range(3)]
    pair.b.send_packets(new, 130.1)
    new_datagrams = transport(pair.b.datagrams_to_send())
    batch = [old_datagrams[2], keepalive, new_datagrams[0], old_datagrams[3], *new_datagrams[1:]]
    pair.a.receive_datagrams(batch, B_ADDR, 130.2)
    assert pair.a.tun_packets() == [old[0], old[1], old[2], new[0], old[3], new[1], new[2]]
    assert pair.a.counters == {}
    assert HandshakeCompleted(pair.b.public_key) in pair.a.events()
