"""Simulated TUN traffic: small IPv4/UDP packets between live nodes' mesh addresses, and the
ledger that says which of them came out of the destination's TUN.

Each packet carries a sequence number, so a delivery is matched to its send exactly and a
duplicate is counted once.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"mgsim"
SEQUENCE = struct.Struct("!Q")
IPV4_UDP_HEADERS = 28


def ipv4_udp_packet(src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address,
                    payload: bytes) -> bytes:
    """An IPv4 header (valid checksum) and a UDP header around ``payload``."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, IPV4_UDP_HEADERS + len(payload), 0, 0, 64,
                         17, 0, src.packed, dst.packed)
    total = sum(struct.unpack("!10H", header))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    header = header[:10] + struct.pack("!H", ~total & 0xFFFF) + header[12:]
    return header + struct.pack("!HHHH", 40000, 40000, 8 + len(payload), 0) + payload


def sequence_of(packet: bytes) -> int | None:
    """The sequence number a simulator packet carries, None for any other packet."""
    start = IPV4_UDP_HEADERS
    if packet[start:start + len(MAGIC)] != MAGIC:
        return None
    begin = start + len(MAGIC)
    if len(packet) < begin + SEQUENCE.size:
        return None
    value: int = SEQUENCE.unpack_from(packet, begin)[0]
    return value


@dataclass(slots=True)
class SentPacket:
    at: float
    src: str
    dst: str
    delivered_at: float | None = None


@dataclass(slots=True)
class TrafficLedger:
    """Every packet handed to a source node's ``send_packets`` and whether it arrived."""

    payload: int
    sent: list[SentPacket] = field(default_factory=list)
    misdelivered: int = 0

    def packet(self, src: str, dst: str, src_ip: ipaddress.IPv4Address,
               dst_ip: ipaddress.IPv4Address, now: float) -> bytes:
        sequence = len(self.sent)
        self.sent.append(SentPacket(now, src, dst))
        body = MAGIC + SEQUENCE.pack(sequence)
        return ipv4_udp_packet(src_ip, dst_ip, body + bytes(max(0, self.payload - len(body))))

    def received(self, host: str, packets: list[bytes], now: float) -> None:
        for packet in packets:
            sequence = sequence_of(packet)
            if sequence is None or sequence >= len(self.sent):
                continue
            record = self.sent[sequence]
            if record.dst != host:
                self.misdelivered += 1
            elif record.delivered_at is None:
                record.delivered_at = now

    def summary(self, eligible: list[SentPacket]) -> dict[str, Any]:
        """Totals, and the delivery ratio and per-pair reachability over ``eligible``."""
        delivered = [record for record in eligible if record.delivered_at is not None]
        pairs: dict[tuple[str, str], bool] = {}
        for record in eligible:
            pair = (record.src, record.dst)
            pairs[pair] = pairs.get(pair, False) or record.delivered_at is not None
        failing = sorted(pair for pair, reached in pairs.items() if not reached)
        latencies = sorted(record.delivered_at - record.at for record in delivered
                           if record.delivered_at is not None)
        return {
            "traffic_sent": len(self.sent),
            "traffic_delivered": sum(1 for record in self.sent
                                     if record.delivered_at is not None),
            "traffic_eligible": len(eligible),
            "traffic_eligible_delivered": len(delivered),
            "traffic_delivery_ratio": (round(len(delivered) / len(eligible), 6)
                                       if eligible else None),
            "traffic_misdelivered": self.misdelivered,
            "traffic_median_latency": (round(latencies[len(latencies) // 2], 6)
                                       if latencies else None),
            "traffic_pairs": len(pairs),
            "traffic_pairs_reached": len(pairs) - len(failing),
            "traffic_pairs_failing": [f"{src}->{dst}" for src, dst in failing[:20]],
        }
