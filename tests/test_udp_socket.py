"""The batching UDP socket on loopback: GSO sends and GRO receives keep every datagram,
in order, with its boundaries; the plain path does the same one datagram per call. In
namespaces: TTL-limited sends carry their TTL on the wire."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshguard.drivers.udp import UdpSocket
from tests.netns import Lab


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


IP_RECVTTL = 12
"""Linux ``IP_RECVTTL`` (Python's socket module lacks the name)."""

_RECEIVER = """
import json, select, socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET:
    sock.setsockopt(socket.IPPROTO_IP, 12, 1)
else:
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
sock.bind((sys.argv[1], 5555))
print("ready", flush=True)
seen = []
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    if select.select([sock], [], [], 0.05)[0]:
        data, ancillary, _, _ = sock.recvmsg(100, 64)
        seen.append([data.decode(), [int.from_bytes(d, "little") for _, _, d in ancillary]])
print(json.dumps(seen), flush=True)
"""

_SENDER = """
import sys
from meshguard.drivers.udp import UdpSocket
udp = UdpSocket(0)
far = (sys.argv[1], 5555)
udp.send_limited([(b"ttl2", far, 2), (b"ttl3", far, 3)])
udp.send([(b"full", far)])
udp.send_limited([(b"ttl1", far, 1)])
print(udp.send_errors)
"""


@pytest.mark.root
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_ttl_limited_datagrams_die_at_the_router_they_are_meant_to(family: str) -> None:
    """sender ─ r1 ─ r2 ─ receiver: a datagram sent with TTL (hop limit) 2 passes r1 and
    dies at r2, TTL 3 arrives with 1 left, and a full-TTL one sent in between arrives with
    the socket's default: the TTL is per datagram and really on the wire."""
    root = Path(__file__).resolve().parent.parent
    v6 = family == "ipv6"

    def addr(net: int, host: int) -> str:
        return f"fd00:{net}::{host}/64" if v6 else f"10.77.{net}.{host}/24"

    def bare(net: int, host: int) -> str:
        return addr(net, host).split("/")[0]

    with Lab(prefix="mgttl") as lab:
        sender, r1, r2, receiver = (lab.namespace(n) for n in ("snd", "r1", "r2", "rcv"))
        lab.link(sender, r1, addr(1, 2), addr(1, 1))
        lab.link(r1, r2, addr(2, 1), addr(2, 2))
        lab.link(r2, receiver, addr(3, 1), addr(3, 2))
        forwarding = "net.ipv6.conf.all.forwarding" if v6 else "net.ipv4.ip_forward"
        for router in (r1, r2):
            router.sysctl(forwarding, "1")
        ip = ["ip", "-6"] if v6 else ["ip"]
        sender.run([*ip, "route", "add", "default", "via", bare(1, 1)])
        r1.run([*ip, "route", "add", bare(3, 2), "via", bare(2, 2)])
        r2.run([*ip, "route", "add", bare(1, 2), "via", bare(2, 1)])
        receiver.run([*ip, "route", "add", "default", "via", bare(3, 1)])
        env = {"PYTHONPATH": str(root)}
        listener = receiver.popen(
            [sys.executable, "-c", _RECEIVER, bare(3, 2), "3"],
            env=env,
            stdout=subprocess.PIPE,
        )
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == b"ready"
        errors = sender.run(
            ["env", f"PYTHONPATH={root}", sys.executable, "-c", _SENDER, bare(3, 2)]
        ).stdout
        out, _ = listener.communicate(timeout=15)
        seen = {payload: ttls for payload, ttls in json.loads(out)}
        print(seen)
        assert errors.strip() == "0"
        assert "ttl1" not in seen and "ttl2" not in seen, seen
        assert seen["ttl3"] == [1], seen
        assert seen["full"] == [64 - 2], seen
