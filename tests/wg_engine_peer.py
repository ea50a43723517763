"""A WireGuard peer made of the bare engine and one UDP socket, for interop tests.

Run inside a test's network namespace. It answers IPv4 pings that arrive through the tunnel
(so ``ping`` on the other side succeeds without a TUN device) and, when told to, pings the
other side itself. On SIGTERM or after ``--seconds`` it prints a JSON summary: handshakes,
pings answered, echo replies received and the device's counters.

    python3 tests/wg_engine_peer.py --listen 192.168.91.2:51821 --address 10.99.9.9 \\
        --peer <base64 key> [--private B64] [--endpoint IP:PORT] [--under-load] [--ping IP]
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshguard.sansio.wireguard import (
    DeviceConfig,
    HandshakeCompleted,
    WireGuardDevice,
)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(src: str, dst: str, kind: int, ident: int, seq: int, payload: bytes) -> bytes:
    icmp = struct.pack("!BBHHH", kind, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + icmp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--address", required=True, help="this peer's tunnel IPv4 address")
    parser.add_argument("--private", help="this peer's private key (base64); default: random")
    parser.add_argument("--peer", required=True, help="the other side's public key (base64)")
    parser.add_argument("--endpoint")
    parser.add_argument("--under-load", action="store_true")
    parser.add_argument("--ping", help="tunnel address to ping once a second")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()

    host, port = args.listen.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, int(port)))
    config = DeviceConfig(under_load_handshakes_per_second=0 if args.under_load else 100)
    private_key = base64.b64decode(args.private) if args.private else os.urandom(32)
    device = WireGuardDevice(
        private_key, entropy=os.urandom, rng=random.Random(), wallclock=time.time,
        config=config,
    )
    endpoint = None
    if args.endpoint:
        endpoint_host, endpoint_port = args.endpoint.rsplit(":", 1)
        endpoint = (endpoint_host, int(endpoint_port))
    device.add_peer(
        base64.b64decode(args.peer), allowed_ips=[ipaddress.ip_network("0.0.0.0/0")],
        endpoint=endpoint, now=time.monotonic(),
    )
    print(base64.b64encode(device.public_key).decode(), flush=True)

    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    summary = {"handshakes": 0, "pings_answered": 0, "echo_replies": 0}
    deadline = time.monotonic() + args.seconds
    next_ping = time.monotonic()
    sequence = 0
    while not stop and time.monotonic() < deadline:
        now = time.monotonic()
        if args.ping and now >= next_ping:
            sequence += 1
            device.send_packets(
                [icmp_echo(args.address, args.ping, 8, 0x4D47, sequence, b"meshguard")], now
            )
            next_ping = now + 1.0
        timer = device.next_deadline()
        wait = min(0.1, max(0.0, (timer - now) if timer is not None else 0.1))
        if select.select([sock], [], [], wait)[0]:
            data, addr = sock.recvfrom(65535)
            device.receive_datagram(data, addr[:2], time.monotonic())
        timer = device.next_deadline()
        if timer is not None and timer <= time.monotonic():
            device.on_timer(time.monotonic())
        replies = []
        for packet in device.tun_packets():
            if packet[9] == 1 and packet[20] == 8:
                ident, seq = struct.unpack("!HH", packet[24:28])
                source = socket.inet_ntoa(packet[12:16])
                replies.append(icmp_echo(args.address, source, 0, ident, seq, packet[28:]))
                summary["pings_answered"] += 1
            elif packet[9] == 1 and packet[20] == 0:
                summary["echo_replies"] += 1
        if replies:
            device.send_packets(replies, time.monotonic())
        summary["handshakes"] += sum(isinstance(e, HandshakeCompleted) for e in device.events())
        for data, addr in device.datagrams_to_send():
            sock.sendto(data, addr)
    print(json.dumps({**summary, "counters": dict(device.counters)}), flush=True)


if __name__ == "__main__":
    main()
