"""The batching UDP socket on loopback: GSO sends and GRO receives keep every datagram,
in order, with its boundaries; the plain path does the same one datagram per call."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from meshguard.drivers.udp import UdpSocket


@pytest.fixture(params=[True, False], ids=["offloads", "plain"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[UdpSocket, UdpSocket]]:
    sender = UdpSocket(0, host="::1", offloads=request.param)
    receiver = UdpSocket(0, host="::1", offloads=request.param)
    yield sender, receiver
    sender.close()
    receiver.close()


def _receive_all(receiver: UdpSocket, count: int) -> list[tuple[bytes, tuple[str, int]]]:
    received: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + 5
    while len(received) < count and time.monotonic() < deadline:
        for datagrams, address in receiver.receive(64):
            received.extend((data, address) for data in datagrams)
    return received


def test_batches_arrive_whole_and_in_order(pair: tuple[UdpSocket, UdpSocket]) -> None:
    sender, receiver = pair
    destination = ("::1", receiver.port)
    datagrams = [bytes([i]) * 1452 for i in range(100)] + [b"short", b"\x01" * 1452, b"end"]
    sender.send([(data, destination) for data in datagrams])
    received = _receive_all(receiver, len(datagrams))
    assert [data for data, _ in received] == datagrams
    assert {address for _, address in received} == {("::1", sender.port)}
    assert sender.send_errors == 0


def test_ipv4_peers_are_plain_ipv4_addresses() -> None:
    sender = UdpSocket(0, host="127.0.0.1", offloads=False)
    receiver = UdpSocket(0, offloads=True)
    try:
        sender.send([(b"x" * 100, ("127.0.0.1", receiver.port))] * 3)
        received = _receive_all(receiver, 3)
        assert received == [(b"x" * 100, ("127.0.0.1", sender.port))] * 3
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        receiver.send([(b"reply", ("127.0.0.1", raw.getsockname()[1]))])
        raw.settimeout(5)
        assert raw.recvfrom(100) == (b"reply", ("127.0.0.1", receiver.port))
        raw.close()
    finally:
        sender.close()
        receiver.close()


def test_unreachable_destination_is_counted_not_raised() -> None:
    sender = UdpSocket(0, host="::1", offloads=True)
    try:
        sender.send([(b"x", ("192.0.2.1", 9))] * 2)
        assert sender.send_errors >= 1
    finally:
        sender.close()
