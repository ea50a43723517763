"""TSO segmentation, checksum completion and TCP coalescing, checked against independent
RFC 1071 / RFC 793 / RFC 8200 arithmetic (a plain word-by-word loop, nothing shared with
the code under test)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.drivers import offload

MTU = 1420
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80
SRC4, DST4 = ipaddress.IPv4Address("10.99.1.2").packed, ipaddress.IPv4Address("10.99.3.4").packed
SRC6 = ipaddress.IPv6Address("fd99:6d67::1:2").packed
DST6 = ipaddress.IPv6Address("fd99:6d67::3:4").packed


def rfc1071_sum(data: bytes) -> int:
    """The 16-bit ones' complement sum, folded, the textbook way."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(packet: bytes, l4_length: int, proto: int = 6) -> bytes:
    if packet[0] >> 4 == 4:
        return packet[12:20] + bytes((0, proto)) + l4_length.to_bytes(2, "big")
    return packet[8:40] + l4_length.to_bytes(4, "big") + bytes((0, 0, 0, proto))


def l4_offset(packet: bytes) -> int:
    return (packet[0] & 0x0F) * 4 if packet[0] >> 4 == 4 else 40


def tcp_checksum_ok(packet: bytes) -> bool:
    l4 = l4_offset(packet)
    segment = packet[l4:]
    return rfc1071_sum(pseudo_header(packet, len(segment)) + segment) == 0xFFFF


def ipv4_header_ok(packet: bytes) -> bool:
    return rfc1071_sum(packet[:20]) == 0xFFFF


def tcp_packet(
    payload: bytes,
    *,
    version: int = 4,
    seq: int = 1000,
    ack: int = 7,
    flags: int = ACK,
    options: bytes = b"",
    ip_id: int = 0x1234,
    tos: int = 0,
    window: int = 501,
    sport: int = 40000,
    dport: int = 5201,
) -> bytes:
    """An IP/TCP packet whose checksum field holds the pseudo-header sum (CHECKSUM_PARTIAL,
    as the kernel hands TSO packets to the TUN)."""
    tcp_len = 20 + len(options)
    l4_length = tcp_len + len(payload)
    if version == 4:
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, tos, 20 + l4_length, ip_id, 0x4000, 64, 6, 0, SRC4, DST4
        )
        checksum = 0xFFFF - rfc1071_sum(ip)
        ip = ip[:10] + checksum.to_bytes(2, "big") + ip[12:]
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000 | tos << 20, l4_length, 6, 64, SRC6, DST6)
    partial = rfc1071_sum(pseudo_header(ip, l4_length))
    tcp = struct.pack(
        "!HHIIBBHHH", sport, dport, seq, ack, (tcp_len // 4) << 4, flags, window, partial, 0
    )
    return ip + tcp + options + payload


def finished(packet: bytes) -> bytes:
    """The same packet with a complete, valid TCP checksum."""
    l4 = l4_offset(packet)
    zeroed = packet[: l4 + 16] + b"\0\0" + packet[l4 + 18 :]
    segment = zeroed[l4:]
    checksum = 0xFFFF - rfc1071_sum(pseudo_header(packet, len(segment)) + segment)
    return zeroed[: l4 + 16] + checksum.to_bytes(2, "big") + zeroed[l4 + 18 :]


def tso_read(packet: bytes, gso_size: int) -> bytes:
    """What a TUN read with IFF_VNET_HDR returns for a TSO super-packet."""
    l4 = l4_offset(packet)
    gso_type = offload.GSO_TCPV4 if packet[0] >> 4 == 4 else offload.GSO_TCPV6
    tcp_len = (packet[l4 + 12] >> 4) * 4
    header = offload.build_vnet_header(
        offload.F_NEEDS_CSUM, gso_type, l4 + tcp_len, gso_size, l4, 16
    )
    return header + packet


def tcp_fields(packet: bytes) -> tuple[int, int, int, bytes]:
    """(seq, flags, header length, payload) of a TCP packet."""
    l4 = l4_offset(packet)
    tcp_len = (packet[l4 + 12] >> 4) * 4
    seq = int.from_bytes(packet[l4 + 4 : l4 + 8], "big")
    return seq, packet[l4 + 13], tcp_len, packet[l4 + tcp_len :]


options_strategy = st.integers(0, 10).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))


@settings(max_examples=300, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    payload=st.binary(min_size=0, max_size=6000),
    gso_size=st.integers(1, 1300),
    seq=st.integers(0, 2**32 - 1),
    ip_id=st.integers(0, 0xFFFF),
    extra_flags=st.sets(st.sampled_from([FIN, PSH, CWR, ECE, URG])),
    options=options_strategy,
)
def test_segments_are_valid_mtu_sized_packets_carrying_the_payload(
    version: int,
    payload: bytes,
    gso_size: int,
    seq: int,
    ip_id: int,
    extra_flags: set[int],
    options: bytes,
) -> None:
    flags = ACK | sum(extra_flags)
    packet = tcp_packet(
        payload, version=version, seq=seq, ip_id=ip_id, flags=flags, options=options
    )
    segments = offload.segment(tso_read(packet, gso_size), MTU)

    assert len(segments) == max(1, -(-len(payload) // gso_size))
    offset = 0
    for index, segment in enumerate(segments):
        assert len(segment) <= MTU
        assert tcp_checksum_ok(segment)
        seg_seq, seg_flags, tcp_len, seg_payload = tcp_fields(segment)
        assert tcp_len == 20 + len(options)
        assert segment[l4_offset(segment) + 20 : l4_offset(segment) + tcp_len] == options
        assert seg_seq == (seq + offset) % 2**32
        assert seg_payload == payload[offset : offset + gso_size]
        last, first = index == len(segments) - 1, index == 0
        assert bool(seg_flags & FIN) == (last and bool(flags & FIN))
        assert bool(seg_flags & PSH) == (last and bool(flags & PSH))
        assert bool(seg_flags & CWR) == (first and bool(flags & CWR))
        assert seg_flags & (ACK | ECE | URG) == flags & (ACK | ECE | URG)
        if version == 4:
            assert ipv4_header_ok(segment)
            assert int.from_bytes(segment[2:4], "big") == len(segment)
            assert int.from_bytes(segment[4:6], "big") == (ip_id + index) % 0x10000
            assert segment[6:10] == packet[6:10] and segment[12:20] == packet[12:20]
        else:
            assert int.from_bytes(segment[4:6], "big") == len(segment) - 40
            assert segment[:4] == packet[:4] and segment[6:40] == packet[6:40]
        offset += len(seg_payload)
    assert offset == len(payload)


def test_known_segment_checksum() -> None:
    """A hand-checked case: a 3000-byte IPv4 super-packet cut at 1448 bytes."""
    payload = bytes(range(256)) * 11 + bytes(184)
    packet = tcp_packet(payload, seq=0xFFFFFF00, flags=ACK | PSH)
    segments = offload.segment(tso_read(packet, 1448), 1500)
    assert [len(s) for s in segments] == [1488, 1488, 144]
    assert [tcp_fields(s)[0] for s in segments] == [0xFFFFFF00, 0x000004A8, 0x00000A50]
    assert [s[33] for s in segments] == [ACK, ACK, ACK | PSH]
    assert all(tcp_checksum_ok(s) and ipv4_header_ok(s) for s in segments)


def test_oversized_segments_are_refused() -> None:
    packet = tcp_packet(bytes(4000))
    with pytest.raises(offload.OffloadError):
        offload.segment(tso_read(packet, 1400), MTU)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=offload.VNET_HDR_LEN, max_size=200))
def test_arbitrary_reads_segment_or_raise_offload_error(data: bytes) -> None:
    try:
        segments = offload.segment(data, MTU)
    except offload.OffloadError:
        return
    assert all(isinstance(s, bytes) for s in segments)


def test_plain_read_is_passed_through() -> None:
    packet = finished(tcp_packet(b"hello"))
    assert offload.segment(offload.build_vnet_header() + packet, MTU) == [packet]


@pytest.mark.parametrize("version", [4, 6])
def test_partial_udp_checksum_is_completed(version: int) -> None:
    payload = b"some datagram payload!!"
    udp_len = 8 + len(payload)
    if version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 1, 0, 64, 17, 0, SRC4, DST4)
    else:
        ip = struct.pack("!IHBB16s16s", 0x60000000, udp_len, 17, 64, SRC6, DST6)
    partial = rfc1071_sum(pseudo_header(ip, udp_len, proto=17))
    packet = ip + struct.pack("!HHHH", 1234, 53, udp_len, partial) + payload
    l4 = len(ip)
    header = offload.build_vnet_header(offload.F_NEEDS_CSUM, 0, 0, 0, l4, 6)
    [completed] = offload.segment(header + packet, MTU)
    assert completed[: l4 + 6] == packet[: l4 + 6] and completed[l4 + 8 :] == packet[l4 + 8 :]
    udp = completed[l4:]
    assert rfc1071_sum(pseudo_header(completed, udp_len, proto=17) + udp) == 0xFFFF


def kernel_view(buffers: list[bytes]) -> list[bytes]:
    """What the kernel makes of one TUN write: its checksum completed, then segmented."""
    write = b"".join(buffers)
    flags, gso_type, hdr_len, _, csum_start, csum_offset = offload.parse_vnet_header(write)
    packet = write[offload.VNET_HDR_LEN :]
    if gso_type == offload.GSO_NONE:
        assert flags == offload.F_DATA_VALID
        return [packet]
    assert flags == offload.F_NEEDS_CSUM and csum_offset == 16
    assert csum_start == l4_offset(packet)
    assert hdr_len == csum_start + tcp_fields(packet)[2]
    complete = offload.complete_checksum(packet, csum_start, csum_offset)
    assert tcp_checksum_ok(complete)
    if gso_type == offload.GSO_TCPV4:
        assert ipv4_header_ok(complete)
        assert int.from_bytes(complete[2:4], "big") == len(complete)
    else:
        assert int.from_bytes(complete[4:6], "big") == len(complete) - 40
    return offload.segment(write, 65535)


@settings(max_examples=200, deadline=None)
@given(
    version=st.sampled_from([4, 6]),
    payload=st.binary(min_size=1, max_size=30000),
    gso_size=st.integers(1, 1360),
    seq=st.integers(0, 2**32 - 1),
    psh=st.booleans(),
    options=options_strategy,
)
def test_coalescing_segments_restores_the_stream(
    version: int, payload: bytes, gso_size: int, seq: int, psh: bool, options: bytes
) -> None:
    packet = tcp_packet(
        payload, version=version, seq=seq, flags=ACK | (PSH if psh else 0), options=options
    )
    gso_size = min(gso_size, MTU - l4_offset(packet) - 20 - len(options))
    segments = offload.segment(tso_read(packet, gso_size), MTU)
    writes = offload.coalesce(segments)
    if len(segments) == 1:
        assert writes == [[offload.DATA_VALID_HEADER, segments[0]]]
        return
    seen = [s for write in writes for s in kernel_view(write)]
    assert seen == segments
    assert all(len(b"".join(w)) - offload.VNET_HDR_LEN <= 65535 for w in writes)
    headers = l4_offset(packet) + 20 + len(options)
    per_write = (65535 - headers) // gso_size
    assert len(writes) <= -(-len(segments) // per_write) + 1 + psh


def test_a_short_run_of_full_segments_becomes_one_tso_write() -> None:
    segments = [
        finished(tcp_packet(bytes([i]) * 1000, seq=5000 + 1000 * i, ip_id=i)) for i in range(5)
    ]
    [write] = offload.coalesce(segments)
    assert offload.parse_vnet_header(write[0])[:4] == (
        offload.F_NEEDS_CSUM, offload.GSO_TCPV4, 40, 1000
    )
    assert kernel_view(write) == segments


def test_non_tcp_and_control_segments_are_written_alone_and_in_order() -> None:
    udp = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 1, 0, 64, 17, 0, SRC4, DST4) + bytes(8)
    data = [finished(tcp_packet(bytes(100), seq=100 * i)) for i in range(4)]
    syn = finished(tcp_packet(b"x", seq=400, flags=SYN))
    packets = [data[0], data[1], udp, data[2], data[3], syn]
    writes = offload.coalesce(packets)
    assert len(writes) == 4
    assert writes[1] == [offload.DATA_VALID_HEADER, udp]
    assert writes[3] == [offload.DATA_VALID_HEADER, syn]
    assert [tcp_fields(s)[3] for s in kernel_view(writes[0])] == [bytes(100)] * 2


@pytest.mark.parametrize(
    "change",
    [
        {"ack": 8},
        {"window": 600},
        {"sport": 40001},
        {"tos": 3},
        {"options": b"\x01\x01\x01\x01"},
        {"seq": 2100},
    ],
)
def test_segments_that_differ_in_a_compared_field_are_not_merged(change: dict[str, object]) -> None:
    first = finished(tcp_packet(bytes(1000), seq=100))
    second_fields: dict[str, object] = {"seq": 1100, **change}
    second = finished(tcp_packet(bytes(1000), **second_fields))  # type: ignore[arg-type]
    writes = offload.coalesce([first, second])
    assert writes == [[offload.DATA_VALID_HEADER, first], [offload.DATA_VALID_HEADER, second]]


def test_interleaved_flows_keep_their_order() -> None:
    a = [finished(tcp_packet(bytes(500), seq=500 * i, sport=1)) for i in range(3)]
    b = [finished(tcp_packet(bytes(500), seq=500 * i, sport=2)) for i in range(3)]
    writes = offload.coalesce([a[0], b[0], a[1], b[1], a[2], b[2]])
    assert [w[1] for w in writes] == [a[0], b[0], a[1], b[1], a[2], b[2]]
    assert all(w[0] == offload.DATA_VALID_HEADER and len(w) == 2 for w in writes)


def test_a_longer_segment_after_a_short_one_starts_a_new_run() -> None:
    packets = [
        finished(tcp_packet(bytes(800), seq=0)),
        finished(tcp_packet(bytes(300), seq=800)),
        finished(tcp_packet(bytes(800), seq=1100)),
        finished(tcp_packet(bytes(800), seq=1900)),
    ]
    writes = offload.coalesce(packets)
    assert len(writes) == 2
    seen = [s for w in writes for s in kernel_view(w)]
    assert [tcp_fields(s)[3] for s in seen] == [tcp_fields(p)[3] for p in packets]
