"""Bursts of datagrams bigger than the path MTU (a relayed tunnel packet at MTU 1420 is a
1608-byte datagram) all leave the host: they bypass UDP GSO, which cannot fragment, and the
kernel fragments them one by one. Two namespaces joined by a veth of the given MTU."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns import Lab

RECEIVER = """
import socket, sys
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE)
receiver.bind(("10.77.0.2", 5000))
print("ready", flush=True)
receiver.settimeout(2)
sizes = []
try:
    while True:
        sizes.append(len(receiver.recv(65535)))
except socket.timeout:
    pass
print(len(sizes), sorted(set(sizes)), flush=True)
"""

SENDER = """
import sys
from meshguard.drivers.udp import UdpSocket
size, rounds = int(sys.argv[1]), int(sys.argv[2])
sender = UdpSocket(0)
for _ in range(rounds):
    sender.send([(bytes([i]) * size, ("10.77.0.2", 5000)) for i in range(40)]
                + [(b"small" * 20, ("10.77.0.2", 5000))] * 3)
print(sender.send_errors, sender.gso, sender.gso_max_segment, flush=True)
"""


@pytest.mark.root
@pytest.mark.parametrize(
    ("mtu", "size"), [(1500, 1608), (1280, 1452)], ids=["relayed-1608", "below-path-mtu"]
)
def test_bursts_of_oversized_datagrams_all_arrive(mtu: int, size: int) -> None:
    rounds = 5
    with Lab(prefix="mgfrag") as lab:
        a, b = lab.namespace("a"), lab.namespace("b")
        lab.link(a, b, "10.77.0.1/24", "10.77.0.2/24", mtu=mtu)
        receiver = b.popen([sys.executable, "-c", RECEIVER], stdout=subprocess.PIPE)
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == b"ready"
        sent = a.run([sys.executable, "-c", SENDER, str(size), str(rounds)], timeout=30)
        send_errors, gso, max_segment = sent.stdout.split()
        out, _ = receiver.communicate(timeout=30)
        count, sizes = out.decode().split(" ", 1)
    assert send_errors == "0"
    assert gso == "True"
    assert int(max_segment) < size
    assert int(count) == rounds * 43
    assert sizes.strip() == f"[100, {size}]"
