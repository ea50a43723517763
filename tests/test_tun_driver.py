"""The data plane on real TUN devices and sockets (root), driving a trivial core.

The core here forwards TUN packets as plain UDP datagrams to one address and back: no
crypto, so what is tested is the driver (TUN offloads, segmentation, UDP GSO/GRO, TCP
coalescing, the loop) and that it works with any core of the ``Core`` shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dataplane_lab import REPO, ping, tcp_transfer
from tests.netns import Lab, Namespace, wait_until

pytestmark = pytest.mark.root

_FORWARDER = """
import ipaddress, json, signal, sys
from meshguard.drivers.loop import DataPlane
from meshguard.drivers.netlink import configure_interface
from meshguard.drivers.tun import TunDevice
from meshguard.drivers.udp import UdpSocket

class ForwardingCore:
    '''Every TUN packet to the one peer as a datagram, every datagram to the TUN.'''
    def __init__(self, peer):
        self.peer, self.out, self.tun = peer, [], []
    def receive_datagrams(self, datagrams, addr, now):
        self.tun.extend(datagrams)
    def send_packets(self, packets, now):
        self.out.extend((packet, self.peer) for packet in packets)
    def datagrams_to_send(self):
        out, self.out = self.out, []
        return out
    def tun_packets(self):
        out, self.tun = self.tun, []
        return out
    def events(self):
        return []
    def next_deadline(self):
        return None
    def on_timer(self, now):
        pass

name, address, peer_host, port, offloads, configure = sys.argv[1:7]
tun = TunDevice(name, offloads=offloads == "1")
udp = UdpSocket(int(port), offloads=offloads == "1")
if configure == "1":
    configure_interface(
        tun.name, mtu=1420, addresses=[ipaddress.ip_interface(address)], routes=[]
    )
plane = DataPlane(ForwardingCore((peer_host, int(port))), tun, udp, mtu=1420)
signal.signal(signal.SIGTERM, lambda *_: plane.stop())
print(json.dumps({"vnet_hdr": tun.vnet_hdr, "gso": udp.gso, "gro": udp.gro}), flush=True)
plane.run()
print(json.dumps(vars(plane.counters)), flush=True)
"""

A_UNDERLAY, B_UNDERLAY = "192.168.91.1", "192.168.91.2"
A_INNER, B_INNER = "10.77.0.1", "10.77.0.2"
PORT = 47000


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(prefix="mgd") as lab:
        yield lab


def _forwarder(
    ns: Namespace, inner: str, peer: str, *, offloads: bool, configure: bool = True
) -> subprocess.Popen[bytes]:
    proc = ns.popen(
        [sys.executable, "-c", _FORWARDER, "tfw0", f"{inner}/24", peer, str(PORT),
         "1" if offloads else "0", "1" if configure else "0"],
        env={"PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    return proc


def _counters(lab: Lab, proc: subprocess.Popen[bytes]) -> dict[str, int]:
    lab.stop(proc)
    assert proc.stdout is not None
    lines = proc.stdout.read().decode().splitlines()
    counters: dict[str, int] = json.loads(lines[-1])
    return counters


def _two_hosts(lab: Lab) -> tuple[Namespace, Namespace]:
    a, b = lab.namespace("a"), lab.namespace("b")
    lab.link(a, b, f"{A_UNDERLAY}/24", f"{B_UNDERLAY}/24")
    return a, b


@pytest.mark.parametrize("offloads", [True, False], ids=["offloads", "plain"])
def test_tcp_through_the_data_plane_arrives_intact(lab: Lab, offloads: bool) -> None:
    a, b = _two_hosts(lab)
    fa = _forwarder(a, A_INNER, B_UNDERLAY, offloads=offloads)
    fb = _forwarder(b, B_INNER, A_UNDERLAY, offloads=offloads)
    for proc in (fa, fb):
        assert proc.stdout is not None
        features = json.loads(proc.stdout.readline())
        assert features == {"vnet_hdr": offloads, "gso": offloads, "gro": offloads}
    assert ping(a, B_INNER)
    size = 30_000_000
    sent, received = tcp_transfer(a, b, B_INNER, size)
    assert sent == received and sent.startswith(f"{size} ")
    counters_a, counters_b = _counters(lab, fa), _counters(lab, fb)
    assert counters_a["tun_read_drops"] == counters_b["tun_read_drops"] == 0
    assert counters_a["tun_write_errors"] == counters_b["tun_write_errors"] == 0
    full_packets = size // 1400
    if offloads:
        # TSO hands over many segments per read, coalescing writes many per write.
        assert counters_a["tun_reads"] < full_packets / 4
        assert counters_b["tun_writes"] < full_packets / 4
    else:
        assert counters_a["tun_reads"] > full_packets
        assert counters_b["tun_writes"] > full_packets


def test_writing_to_an_interface_that_is_down_is_counted_not_fatal(lab: Lab) -> None:
    a, b = _two_hosts(lab)
    proc = _forwarder(b, B_INNER, A_UNDERLAY, offloads=True, configure=False)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    packet = bytes.fromhex("4500001c000100004011") + bytes(2) + bytes([10, 77, 0, 1] * 2) + bytes(8)
    sender = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"[s.sendto(bytes.fromhex(sys.argv[1]), ('{B_UNDERLAY}', {PORT})) for _ in range(3)]"
    )
    a.run([sys.executable, "-c", sender, packet.hex()])
    wait_until(
        lambda: b.run(["ss", "-Hunl", "sport", f"= :{PORT}"]).stdout.split()[1:2] == ["0"],
        timeout=5,
        what="the forwarder to drain its socket",
    )
    assert proc.poll() is None
    counters = _counters(lab, proc)
    assert counters["tun_write_errors"] == 3
    assert counters["udp_batches"] >= 1


def test_closing_the_device_removes_the_interface(lab: Lab) -> None:
    a, _ = _two_hosts(lab)
    proc = _forwarder(a, A_INNER, B_UNDERLAY, offloads=True)
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    assert "tfw0" in a.run(["ip", "-o", "link", "show"]).stdout
    assert f"{A_INNER}/24" in a.run(["ip", "-o", "addr", "show", "dev", "tfw0"]).stdout
    _counters(lab, proc)
    assert "tfw0" not in a.run(["ip", "-o", "link", "show"]).stdout
    assert Path("/dev/net/tun").exists()
