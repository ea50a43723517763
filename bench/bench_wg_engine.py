"""Micro-benchmark of the WireGuard engine on one core, with no I/O at all.

Measures packets per second through two in-memory devices (A encrypts with ``send_packets``,
B decrypts with ``receive_datagrams`` in GRO-sized batches), next to a baseline of bare
ChaCha20-Poly1305 encrypt+decrypt calls on the same sizes in the same run, and prints the
ratio: how much of the cipher's speed the engine keeps. Then handshakes per second.
Rates are per CPU-second of this process (``time.process_time``), so other load on a shared
machine does not skew them.

    python3 bench/bench_wg_engine.py [--packets N] [--size BYTES] [--batch N]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import struct
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from meshguard.sansio.wireguard import HandshakeCompleted, WireGuardDevice

A_ADDR = ("192.0.2.1", 51820)
B_ADDR = ("192.0.2.2", 51820)


def ipv4_packet(size: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, size, 0, 0, 64, 17, 0,
        bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]),
    )
    return header + os.urandom(size - 20)


class TickingClock:
    """A wall clock one second further on at every reading, so back-to-back handshakes
    carry strictly newer TAI64N timestamps (real time would repeat within 16 ms)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make_pair() -> tuple[WireGuardDevice, WireGuardDevice]:
    clock = TickingClock()
    a = WireGuardDevice(os.urandom(32), entropy=os.urandom, rng=random.Random(1),
                        wallclock=clock)
    b = WireGuardDevice(os.urandom(32), entropy=os.urandom, rng=random.Random(2),
                        wallclock=clock)
    a.add_peer(b.public_key, allowed_ips=[ipaddress.ip_network("10.0.0.2/32")],
               endpoint=B_ADDR, now=0.0)
    b.add_peer(a.public_key, allowed_ips=[ipaddress.ip_network("10.0.0.1/32")],
               endpoint=A_ADDR, now=0.0)
    a.initiate_handshake(b.public_key, 0.0)
    for _ in range(3):
        for data, _ in a.datagrams_to_send():
            b.receive_datagram(data, A_ADDR, 0.0)
        for data, _ in b.datagrams_to_send():
            a.receive_datagram(data, B_ADDR, 0.0)
    b.tun_packets()
    return a, b


def bench_engine(packets: int, size: int, batch: int) -> tuple[float, float, float]:
    """Packets per CPU-second: both ways (seal and open), sealing only, opening only."""
    a, b = make_pair()
    burst = [ipv4_packet(size)] * batch
    rounds = packets // batch
    now = 1.0
    sealing = opening = 0.0
    for _ in range(rounds):
        start = time.process_time()
        a.send_packets(burst, now)
        datagrams = [d for d, _ in a.datagrams_to_send()]
        middle = time.process_time()
        b.receive_datagrams(datagrams, A_ADDR, now)
        delivered = b.tun_packets()
        opening += time.process_time() - middle
        sealing += middle - start
    assert len(delivered) == batch and delivered[0] == burst[0], "engine lost packets"
    total = rounds * batch
    return total / (sealing + opening), total / sealing, total / opening


def bench_cipher(packets: int, size: int) -> float:
    """Bare cipher: one encrypt and one decrypt per packet, padded size, same nonce form."""
    send = ChaCha20Poly1305(os.urandom(32))
    plaintext = ipv4_packet(size) + bytes(-size & 15)
    nonce = bytes(12)
    start = time.process_time()
    for _ in range(packets):
        send.decrypt(nonce, send.encrypt(nonce, plaintext, None), None)
    return packets / (time.process_time() - start)


def bench_handshakes(count: int) -> float:
    """Complete handshakes per second (initiation, response, confirming keepalive)."""
    a, b = make_pair()
    start = time.process_time()
    now = 10.0
    for _ in range(count):
        now += 5.0
        a.initiate_handshake(b.public_key, now)
        for data, _ in a.datagrams_to_send():
            b.receive_datagram(data, A_ADDR, now)
        for data, _ in b.datagrams_to_send():
            a.receive_datagram(data, B_ADDR, now)
        for data, _ in a.datagrams_to_send():
            b.receive_datagram(data, A_ADDR, now)
    elapsed = time.process_time() - start
    completed = sum(isinstance(e, HandshakeCompleted) for e in a.events())
    assert completed == count + 1, f"only {completed - 1} of {count} handshakes completed"
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=1420)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--handshakes", type=int, default=500)
    args = parser.parse_args()
    if not 40 <= args.size <= 65535:
        parser.error("--size must be between 40 and 65535")
    engine, sealing, opening = bench_engine(args.packets, args.size, args.batch)
    cipher = bench_cipher(args.packets, args.size)

    def gbits(rate: float) -> str:
        return f"{rate * args.size * 8 / 1e9:.2f} Gbit/s"

    print(f"engine  encrypt+decrypt: {engine:12,.0f} packets/s  ({gbits(engine)} at "
          f"{args.size} B, batch {args.batch}; each packet sealed and opened on one core)")
    print(f"engine  send_packets:    {sealing:12,.0f} packets/s  ({gbits(sealing)})")
    print(f"engine  receive:         {opening:12,.0f} packets/s  ({gbits(opening)})")
    print(f"cipher  encrypt+decrypt: {cipher:12,.0f} packets/s")
    print(f"engine / cipher ratio:   {engine / cipher:12.2f}")
    print(f"handshakes per second:   {bench_handshakes(args.handshakes):12,.0f} "
          "(complete, both ends' work on one core)")


if __name__ == "__main__":
    main()
