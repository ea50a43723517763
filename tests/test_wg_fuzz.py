"""Arbitrary bytes from the network never raise out of the WireGuard device."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wg_helpers import A_ADDR, A_IP, B_IP, Pair, ipv4_packet, ipv6_packet

from meshguard.sansio.wireguard import DeviceConfig
from meshguard.sansio.wireguard.constants import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
)

addresses = st.one_of(
    st.tuples(st.sampled_from(["192.0.2.1", "::1", "fe80::1%eth0", "not-an-ip", ""]),
              st.integers(0, 65535)),
)


def established(loaded: bool) -> Pair:
    config = DeviceConfig(under_load_handshakes_per_second=0 if loaded else 100)
    pair = Pair(config_b=config)
    pair.a.send_packets([ipv4_packet(A_IP, B_IP, b"x")], 0.0)
    pair.deliver(0.0)
    pair.advance(6.0)
    return pair


PAIR = established(loaded=False)
LOADED_PAIR = established(loaded=True)


def live_indices(pair: Pair) -> list[int]:
    return sorted(pair.b._keypairs) + sorted(pair.b._handshakes)


def shaped(message_type: int, size: int, index_at: int) -> st.SearchStrategy[bytes]:
    """Datagrams of a valid type and length whose index (at ``index_at``) is often live,
    with random contents elsewhere."""
    indices = st.sampled_from([*live_indices(PAIR), *live_indices(LOADED_PAIR), 0, 0xFFFFFFFF])
    return st.builds(
        lambda index, body: (
            struct.pack("<I", message_type) + body[: index_at - 4] + struct.pack("<I", index)
            + body[index_at - 4 :]
        )[:size],
        indices,
        st.binary(min_size=size, max_size=size),
    )


datagrams = st.one_of(
    st.binary(max_size=200),
    shaped(1, INITIATION_SIZE, 4),
    shaped(2, RESPONSE_SIZE, 8),
    shaped(3, COOKIE_REPLY_SIZE, 4),
    shaped(4, 32, 4),
    shaped(4, 100, 4),
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams, max_size=8), addresses, st.floats(0, 1000), st.booleans())
def test_arbitrary_datagrams_are_dropped_without_raising(
    batch: list[bytes], addr: tuple[str, int], now: float, loaded: bool
) -> None:
    device = (LOADED_PAIR if loaded else PAIR).b
    for data in batch:
        device.receive_datagram(data, addr, 6.0 + now)
    device.receive_datagrams(batch, addr, 6.0 + now)
    device.on_timer(6.0 + now)
    device.datagrams_to_send()
    device.tun_packets()
    device.events()


@settings(max_examples=300)
@given(st.binary(max_size=1500), st.integers(0, 3))
def test_arbitrary_tun_packets_and_inner_packets_never_raise(packet: bytes, variant: int) -> None:
    """Packets routed to B whose length fields and contents are arbitrary."""
    pair = PAIR
    if variant == 1:
        header = ipv4_packet(A_IP, B_IP)
        packet = header[:2] + packet[:2] + header[4:] + packet[2:]
    elif variant == 2:
        header = ipv6_packet("fd00::1", "fd00::2")
        packet = header[:4] + packet[:2] + header[6:] + packet[2:]
    pair.a.send_packets([packet], 7.0)
    for data, _ in pair.a.datagrams_to_send():
        pair.b.receive_datagrams([data], A_ADDR, 7.0)
    pair.b.tun_packets()
    pair.b.datagrams_to_send()
