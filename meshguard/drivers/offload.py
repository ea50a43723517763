"""TUN offload support: virtio-net headers, TCP segmentation and TCP coalescing.

With ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD`` the kernel hands the TUN reader TCP "super-packets"
of up to 64 KiB (TSO) with a checksum left to fill in, and accepts such super-packets on write
(so one write carries many received segments up the stack). Everything that goes on the wire
must still be an ordinary MTU-sized IP packet inside a standard WireGuard message, so
:func:`segment` cuts super-packets into MTU-sized packets with correct IPv4/IPv6 and TCP
headers, and :func:`coalesce` glues decrypted in-order TCP segments back together for the
write side.

Checksums use the identity 65536 ≡ 1 (mod 0xFFFF): the ones' complement sum of the 16-bit
words of ``data`` is ``int.from_bytes(data, "big") % 0xFFFF``, computed in C in one pass; the
payload sums of all segments of a super-packet come from one numpy reduction.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy

VNET_HDR_LEN = 10
"""Size of ``struct virtio_net_hdr`` (no ``num_buffers``), set with ``TUNSETVNETHDRSZ``."""

F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80

_PROTO_TCP = 6
_TCP_FIN = 0x01
_TCP_PSH = 0x08
_TCP_ACK = 0x10
_TCP_CWR = 0x80

_VNET = struct.Struct("<BBHHHH")
DATA_VALID_HEADER = _VNET.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0)
"""Header for a packet written to the TUN whose checksum needs no verification (the
WireGuard tag authenticated it, as the kernel's WireGuard marks CHECKSUM_UNNECESSARY)."""

_MAX_IP_PACKET = 65535


class OffloadError(ValueError):
    """A packet from the TUN cannot be segmented (malformed header); the caller drops it."""


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of ``data`` as 16-bit big-endian words (odd length zero-padded).

    Returns a value in [0, 0xFFFE] that is congruent to the RFC 1071 sum modulo 0xFFFF;
    partial sums add with ``+`` and reduce with ``% 0xFFFF`` at the end.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8
    return value % 0xFFFF


def finish_checksum(total: int) -> int:
    """The checksum field value for a ones' complement sum (never 0, so valid for UDP too)."""
    return 0xFFFF - total % 0xFFFF


def parse_vnet_header(buf: bytes) -> tuple[int, int, int, int, int, int]:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) of a TUN read."""
    if len(buf) < VNET_HDR_LEN:
        raise OffloadError("read shorter than the virtio-net header")
    return _VNET.unpack_from(buf)


def build_vnet_header(
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> bytes:
    return _VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def _pseudo_sum(packet: bytes) -> int:
    """Ones' complement sum of the pseudo-header's addresses and protocol (not its length)."""
    if packet[0] >> 4 == 4:
        return ones_sum(packet[12:20]) + packet[9]
    return ones_sum(packet[8:40]) + packet[6]


def complete_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Fill in a CHECKSUM_PARTIAL checksum: the field already holds the pseudo-header sum."""
    field = csum_start + csum_offset
    if field + 2 > len(packet) or csum_start >= len(packet):
        raise OffloadError("checksum offsets outside the packet")
    checksum = finish_checksum(ones_sum(memoryview(packet)[csum_start:]))
    return packet[:field] + checksum.to_bytes(2, "big") + packet[field + 2 :]


def segment(buf: bytes, mtu: int) -> list[bytes]:
    """The MTU-sized IP packets carried by one TUN read (virtio-net header + packet).

    A TSO super-packet is cut into segments of ``gso_size`` payload bytes each with its own
    IP header (length, IPv4 identification and header checksum) and TCP header (sequence
    number, FIN/PSH only on the last segment, CWR only on the first, full checksum). A
    non-GSO packet with a pending checksum gets it filled in. Raises :class:`OffloadError`
    for a header that does not describe the packet; the caller drops the read.
    """
    flags, gso_type, _, gso_size, csum_start, csum_offset = _VNET.unpack_from(buf)
    packet = buf[VNET_HDR_LEN:]
    gso_type &= ~GSO_ECN
    if gso_type == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            return [complete_checksum(packet, csum_start, csum_offset)]
        return [packet]
    if gso_type in (GSO_TCPV4, GSO_TCPV6):
        return _segment_tcp(packet, gso_type == GSO_TCPV4, gso_size, csum_start, mtu)
    raise OffloadError(f"unsupported GSO type {gso_type}")


def _chunk_sums(payload: memoryview, size: int) -> list[int]:
    """Ones' complement sums (big-endian words) of each ``size``-byte chunk of ``payload``.

    numpy sums all full chunks in one call; a ones' complement sum of little-endian words is
    the byte swap of the big-endian one, and reading little-endian is the fast native order.
    """
    full = len(payload) // size if size % 2 == 0 else 0
    sums: list[int] = []
    if full:
        words = numpy.frombuffer(payload[: full * size], "<u2").reshape(full, size // 2)
        for value in words.sum(axis=1, dtype=numpy.uint32).tolist():
            value %= 0xFFFF
            sums.append((value >> 8) | (value & 0xFF) << 8)
    for start in range(full * size, len(payload), size):
        sums.append(ones_sum(payload[start : start + size]))
    if not sums:
        sums.append(0)
    return sums


_IPV4_TCP_HEADER = struct.Struct("!2sHH4sH8s4sI4sH2sH")
"""IPv4 header without options, then TCP header up to the urgent pointer."""
_IPV6_TCP_HEADER = struct.Struct("!4sH34s4sI4sH2sH")
"""IPv6 header, then TCP header up to the urgent pointer."""


def _segment_tcp(packet: bytes, ipv4: bool, gso_size: int, l4: int, mtu: int) -> list[bytes]:
    if len(packet) < l4 + 20 or gso_size == 0 or (packet[0] >> 4) != (4 if ipv4 else 6):
        raise OffloadError("malformed TSO packet")
    if ipv4 and (l4 != (packet[0] & 0x0F) * 4 or packet[9] != _PROTO_TCP):
        raise OffloadError("TSO IPv4 packet with IP options or not TCP")
    if not ipv4 and (l4 != 40 or packet[6] != _PROTO_TCP):
        raise OffloadError("TSO IPv6 packet with extension headers or not TCP")
    tcp_len = (packet[l4 + 12] >> 4) * 4
    payload_start = l4 + tcp_len
    if tcp_len < 20 or payload_start > len(packet):
        raise OffloadError("malformed TCP header in TSO packet")
    if payload_start + gso_size > mtu:
        raise OffloadError("TSO segment larger than the MTU")
    ports = packet[l4 : l4 + 4]
    seq0 = int.from_bytes(packet[l4 + 4 : l4 + 8], "big")
    ack = packet[l4 + 8 : l4 + 12]
    offset_word = packet[l4 + 12] << 8
    tcp_flags = packet[l4 + 13]
    window = packet[l4 + 14 : l4 + 16]
    urgent_options = packet[l4 + 18 : payload_start]
    # TCP checksum words that are the same in every segment, summed once.
    tcp_fixed = (
        _pseudo_sum(packet)
        + ones_sum(ports)
        + ones_sum(ack)
        + int.from_bytes(window, "big")
        + ones_sum(urgent_options)
    )
    payload = memoryview(packet)[payload_start:]
    sums = _chunk_sums(payload, gso_size)
    count = len(sums)
    # FIN and PSH belong to the last segment only, CWR to the first only.
    flags = [tcp_flags & ~(_TCP_FIN | _TCP_PSH | _TCP_CWR)] * count
    if count > 1:
        flags[0] = tcp_flags & ~(_TCP_FIN | _TCP_PSH)
        flags[-1] = tcp_flags & ~_TCP_CWR
    else:
        flags[0] = tcp_flags
    lengths = [tcp_len + gso_size] * count
    lengths[-1] = tcp_len + len(payload) - (count - 1) * gso_size
    segments = []
    offset = 0
    if ipv4:
        ip_id0 = int.from_bytes(packet[4:6], "big")
        ip_version_tos = packet[0:2]
        ip_frag_ttl_proto = packet[6:10]
        ip_addresses = packet[12:20]
        # IPv4 header checksum words except total length and identification.
        ip_fixed = (
            int.from_bytes(ip_version_tos, "big")
            + ones_sum(ip_frag_ttl_proto)
            + ones_sum(ip_addresses)
        )
        pack_v4 = _IPV4_TCP_HEADER.pack
        for index, chunk_sum in enumerate(sums):
            seq = (seq0 + offset) & 0xFFFFFFFF
            flag_word = offset_word | flags[index]
            l4_len = lengths[index]
            length = 20 + l4_len
            ip_id = (ip_id0 + index) & 0xFFFF
            header = pack_v4(
                ip_version_tos,
                length,
                ip_id,
                ip_frag_ttl_proto,
                0xFFFF - (ip_fixed + length + ip_id) % 0xFFFF,
                ip_addresses,
                ports,
                seq,
                ack,
                flag_word,
                window,
                0xFFFF
                - (tcp_fixed + (seq >> 16) + (seq & 0xFFFF) + flag_word + l4_len + chunk_sum)
                % 0xFFFF,
            )
            segments.append(b"".join((header, urgent_options, payload[offset : offset + gso_size])))
            offset += gso_size
    else:
        ip_front = packet[0:4]
        ip_back = packet[6:40]
        pack_v6 = _IPV6_TCP_HEADER.pack
        for index, chunk_sum in enumerate(sums):
            seq = (seq0 + offset) & 0xFFFFFFFF
            flag_word = offset_word | flags[index]
            l4_len = lengths[index]
            header = pack_v6(
                ip_front,
                l4_len,
                ip_back,
                ports,
                seq,
                ack,
                flag_word,
                window,
                0xFFFF
                - (tcp_fixed + (seq >> 16) + (seq & 0xFFFF) + flag_word + l4_len + chunk_sum)
                % 0xFFFF,
            )
            segments.append(b"".join((header, urgent_options, payload[offset : offset + gso_size])))
            offset += gso_size
    return segments


def _run_start(packet: bytes) -> tuple[int, int] | None:
    """(L4 offset, payload offset) if ``packet`` is a TCP segment that may start a run.

    It must be IPv4 without options and unfragmented, or IPv6 with TCP as next header;
    carry a payload; have only ACK set; and be exactly as long as its IP header says.
    """
    size = len(packet)
    if size < 41:
        return None
    version = packet[0] >> 4
    if version == 4:
        if (
            packet[0] != 0x45
            or packet[9] != _PROTO_TCP
            or packet[6] & 0x3F
            or packet[7]
            or int.from_bytes(packet[2:4], "big") != size
        ):
            return None
        l4 = 20
    elif version == 6:
        if size < 61 or packet[6] != _PROTO_TCP or int.from_bytes(packet[4:6], "big") + 40 != size:
            return None
        l4 = 40
    else:
        return None
    payload_start = l4 + (packet[l4 + 12] >> 4) * 4
    if payload_start < l4 + 20 or payload_start >= size or packet[l4 + 13] != _TCP_ACK:
        return None
    return l4, payload_start


def _super_packet(
    first: bytes, l4: int, payload_start: int, payloads: list[bytes], payload_length: int
) -> list[bytes]:
    """One TUN write (virtio-net header + TSO packet headers, then the segments' payloads)."""
    gso_size = len(payloads[0])
    l4_len = payload_start - l4 + payload_length
    # With F_NEEDS_CSUM the checksum field holds the pseudo-header sum, not yet complemented.
    partial = (_pseudo_sum(first) + l4_len) % 0xFFFF or 0xFFFF
    tcp_header = (
        first[l4 : l4 + 16]
        + partial.to_bytes(2, "big")
        + first[l4 + 18 : payload_start]
    )
    if l4 == 20:
        length = 20 + l4_len
        ip_fixed = ones_sum(first[0:2]) + ones_sum(first[4:10]) + ones_sum(first[12:20])
        ip = (
            first[0:2]
            + length.to_bytes(2, "big")
            + first[4:10]
            + finish_checksum(ip_fixed + length).to_bytes(2, "big")
            + first[12:20]
        )
        gso_type = GSO_TCPV4
    else:
        ip = first[0:4] + l4_len.to_bytes(2, "big") + first[6:40]
        gso_type = GSO_TCPV6
    header = _VNET.pack(F_NEEDS_CSUM, gso_type, payload_start, gso_size, l4, 16)
    payloads.insert(0, header + ip + tcp_header)
    return payloads


def coalesce(packets: Sequence[bytes]) -> list[list[bytes]]:
    """TUN writes for decrypted packets, in order, each as the buffers of one ``writev``
    (a virtio-net header, then the packet), so payloads are never copied together.

    Runs of adjacent in-order TCP segments of one flow, all of one size except possibly a
    shorter last one, become one TSO super-packet (the receive-side twin of :func:`segment`,
    like the kernel's GRO), so the kernel's stack sees one packet per run and we make one
    write. A segment joins a run only if every header field the kernel's GRO compares is
    equal (addresses, ports, ACK, flags, window, options, TOS/traffic class, TTL/hop limit);
    runs are of ACK-only segments, so a segment with PSH (or any other flag) is written alone,
    marked checksum-valid, like anything that is not TCP.
    """
    writes: list[list[bytes]] = []
    append = writes.append
    payloads: list[bytes] = []
    first = b""
    l4 = payload_start = next_seq = gso_size = length = 0
    ip_a = ip_b = ip_c = ip_d = flow_start = flow_end = 0
    ip_head = ip_tail = flow = ack_flags_window = options = b""
    for packet in packets:
        if payloads:
            size = len(packet) - payload_start
            if (
                0 < size <= gso_size
                and length + size <= _MAX_IP_PACKET
                and packet[flow_start:flow_end] == flow
                and packet[l4 + 8 : l4 + 16] == ack_flags_window
                and packet[l4 + 18 : payload_start] == options
                and packet[ip_a:ip_b] == ip_head
                and packet[ip_c:ip_d] == ip_tail
                and int.from_bytes(packet[l4 + 4 : l4 + 8], "big") == next_seq
            ):
                payloads.append(packet[payload_start:])
                length += size
                next_seq = (next_seq + size) & 0xFFFFFFFF
                if size == gso_size:
                    continue
                append(_super_packet(first, l4, payload_start, payloads, length - payload_start))
                payloads = []
                continue
            if len(payloads) == 1:
                append([DATA_VALID_HEADER, first])
            else:
                append(_super_packet(first, l4, payload_start, payloads, length - payload_start))
            payloads = []
        start = _run_start(packet)
        if start is None:
            append([DATA_VALID_HEADER, packet])
            continue
        l4, payload_start = start
        first = packet
        gso_size = len(packet) - payload_start
        length = len(packet)
        next_seq = (int.from_bytes(packet[l4 + 4 : l4 + 8], "big") + gso_size) & 0xFFFFFFFF
        if l4 == 20:
            flow_start, flow_end, ip_a, ip_b, ip_c, ip_d = 12, 24, 0, 2, 6, 10
        else:
            flow_start, flow_end, ip_a, ip_b, ip_c, ip_d = 8, 44, 0, 4, 6, 8
        flow = packet[flow_start:flow_end]
        ip_head = packet[ip_a:ip_b]
        ip_tail = packet[ip_c:ip_d]
        ack_flags_window = packet[l4 + 8 : l4 + 16]
        options = packet[l4 + 18 : payload_start]
        payloads = [packet[payload_start:]]
    if len(payloads) == 1:
        append([DATA_VALID_HEADER, first])
    elif payloads:
        append(_super_packet(first, l4, payload_start, payloads, length - payload_start))
    return writes
