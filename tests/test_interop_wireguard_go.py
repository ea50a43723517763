"""``meshguard run`` with static peers against a real WireGuard implementation (wireguard-go).

Two namespaces joined by a veth pair: wireguard-go (configured with ``wg`` and ``ip``) on
one side, a ``meshguard run`` subprocess with its own config dir and identity on the other.
Then the same with meshguard on both sides.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dataplane_lab import (
    MeshguardNode,
    WireGuardGoNode,
    meshguard_cli,
    ping,
    psk,
    tcp_transfer,
    wg_genkey,
)
from tests.netns import Lab, Namespace, wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

WG_UNDERLAY = "192.168.90.1"
MG_UNDERLAY = "192.168.90.2"
TRANSFER_BYTES = 50_000_000


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(prefix="mgi") as lab:
        yield lab


@pytest.fixture
def hosts(lab: Lab) -> tuple[Namespace, Namespace]:
    wg_host = lab.namespace("wg")
    mg_host = lab.namespace("mg")
    lab.link(wg_host, mg_host, f"{WG_UNDERLAY}/24", f"{MG_UNDERLAY}/24")
    return wg_host, mg_host


def _pair(
    lab: Lab,
    hosts: tuple[Namespace, Namespace],
    tmp_path: Path,
    *,
    key: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> tuple[WireGuardGoNode, MeshguardNode]:
    """wireguard-go and meshguard peered with each other (optionally with a preshared key)."""
    wg_host, mg_host = hosts
    wgo = WireGuardGoNode(wg_host, lab, WG_UNDERLAY)
    mg = MeshguardNode(mg_host, tmp_path / "mg", MG_UNDERLAY, extra_args=list(extra_args))
    wgo.start([mg.as_peer(key)], log_path=tmp_path / "wireguard-go.log")
    mg.start([wgo.as_peer(key)])
    return wgo, mg


def _assert_pings(a: Namespace, b: Namespace, b_ipv4: object, b_ipv6: object,
                  a_ipv4: object, a_ipv6: object) -> None:
    assert ping(a, b_ipv4), "IPv4 ping a → b"
    assert ping(a, b_ipv6), "IPv6 ping a → b"
    assert ping(b, a_ipv4), "IPv4 ping b → a"
    assert ping(b, a_ipv6), "IPv6 ping b → a"


def test_handshake_when_meshguard_initiates(
    lab: Lab, hosts: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    wg_host, mg_host = hosts
    wgo, mg = _pair(lab, hosts, tmp_path)
    assert wgo.latest_handshake() == 0
    assert ping(mg_host, wgo.ipv4)
    assert wgo.latest_handshake() > 0
    assert mg.handshakes() == 1
    _assert_pings(mg_host, wg_host, wgo.ipv4, wgo.ipv6, mg.ipv4, mg.ipv6)
    (static,) = json.loads(meshguard_cli(mg.directory, "status", "--json"))["static_peers"]
    assert static["public_key"] == wgo.public_key
    assert static["allowed_ips"] == [f"{wgo.ipv4}/32", f"{wgo.ipv6}/128"]
    assert static["endpoint"] == wgo.endpoint
    assert static["last_handshake"] is not None and static["rx_bytes"] > 0
    text = meshguard_cli(mg.directory, "status")
    assert "STATIC WIREGUARD PEER" in text and wgo.public_key in text


def test_handshake_when_wireguard_go_initiates(
    lab: Lab, hosts: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    wg_host, mg_host = hosts
    wgo, mg = _pair(lab, hosts, tmp_path)
    assert ping(wg_host, mg.ipv6)
    wait_until(lambda: mg.handshakes() >= 1, timeout=5, what="meshguard's handshake event")
    assert wgo.latest_handshake() > 0
    _assert_pings(wg_host, mg_host, mg.ipv4, mg.ipv6, wgo.ipv4, wgo.ipv6)


@pytest.mark.parametrize("extra_args", [(), ("--no-offload",)], ids=["offloads", "plain"])
def test_tcp_transfer_both_ways_arrives_intact(
    lab: Lab, hosts: tuple[Namespace, Namespace], tmp_path: Path, extra_args: tuple[str, ...]
) -> None:
    wg_host, mg_host = hosts
    wgo, mg = _pair(lab, hosts, tmp_path, extra_args=extra_args)
    expected = "tun_offload=False" if extra_args else "tun_offload=True"
    assert expected in mg.log()
    sent, received = tcp_transfer(mg_host, wg_host, wgo.ipv4, TRANSFER_BYTES)
    assert sent == received and sent.startswith(f"{TRANSFER_BYTES} ")
    sent, received = tcp_transfer(wg_host, mg_host, mg.ipv6, TRANSFER_BYTES, port=5556)
    assert sent == received and sent.startswith(f"{TRANSFER_BYTES} ")
    rx, tx = wgo.transfer()
    assert rx > TRANSFER_BYTES and tx > TRANSFER_BYTES


def test_preshared_key_on_both_sides(
    lab: Lab, hosts: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    wg_host, mg_host = hosts
    wgo, mg = _pair(lab, hosts, tmp_path, key=psk())
    _assert_pings(mg_host, wg_host, wgo.ipv4, wgo.ipv6, mg.ipv4, mg.ipv6)
    assert wgo.latest_handshake() > 0


def test_mismatched_preshared_key_passes_nothing(
    lab: Lab, hosts: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    wg_host, mg_host = hosts
    wgo = WireGuardGoNode(wg_host, lab, WG_UNDERLAY)
    mg = MeshguardNode(mg_host, tmp_path / "mg", MG_UNDERLAY)
    wgo.start([mg.as_peer(psk())])
    mg.start([wgo.as_peer(psk())])
    assert not ping(mg_host, wgo.ipv4, count=2, wait=1)
    assert not ping(wg_host, mg.ipv4, count=2, wait=1)
    assert wgo.latest_handshake() == 0
    assert mg.handshakes() == 0


def test_wrong_public_key_passes_nothing(
    lab: Lab, hosts: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    wg_host, mg_host = hosts
    wgo = WireGuardGoNode(wg_host, lab, WG_UNDERLAY)
    mg = MeshguardNode(mg_host, tmp_path / "mg", MG_UNDERLAY)
    wgo.start([mg.as_peer()])
    impostor = wgo.as_peer()
    impostor.public_key = wg_genkey()[1]
    mg.start([impostor])
    assert not ping(mg_host, wgo.ipv4, count=2, wait=1)
    assert not ping(wg_host, mg.ipv4, count=2, wait=1)
    assert wgo.latest_handshake() == 0
    assert mg.handshakes() == 0


def test_meshguard_to_meshguard(
    lab: Lab, hosts: tuple[Namespace, Namespace], tmp_path: Path
) -> None:
    host_a, host_b = hosts
    a = MeshguardNode(host_a, tmp_path / "a", WG_UNDERLAY)
    b = MeshguardNode(host_b, tmp_path / "b", MG_UNDERLAY)
    key = psk()
    a.start([b.as_peer(key)])
    b.start([a.as_peer(key)])
    _assert_pings(host_a, host_b, b.ipv4, b.ipv6, a.ipv4, a.ipv6)
    assert a.handshakes() >= 1 and b.handshakes() >= 1
    sent, received = tcp_transfer(host_a, host_b, b.ipv4, TRANSFER_BYTES)
    assert sent == received and sent.startswith(f"{TRANSFER_BYTES} ")
    sent, received = tcp_transfer(host_b, host_a, a.ipv6, TRANSFER_BYTES, port=5556)
    assert sent == received and sent.startswith(f"{TRANSFER_BYTES} ")


def test_ipv6_underlay(lab: Lab, tmp_path: Path) -> None:
    """Endpoints on an IPv6-only link: UDP (with GSO/GRO) over IPv6 to wireguard-go."""
    wg_host, mg_host = lab.namespace("wg6"), lab.namespace("mg6")
    lab.link(wg_host, mg_host, "fd00:90::1/64", "fd00:90::2/64")
    wgo = WireGuardGoNode(wg_host, lab, "fd00:90::1")
    mg = MeshguardNode(mg_host, tmp_path / "mg", "fd00:90::2")
    wgo.start([mg.as_peer()])
    mg.start([wgo.as_peer()])
    _assert_pings(mg_host, wg_host, wgo.ipv4, wgo.ipv6, mg.ipv4, mg.ipv6)
    sent, received = tcp_transfer(wg_host, mg_host, mg.ipv4, TRANSFER_BYTES // 5)
    assert sent == received and sent.startswith(f"{TRANSFER_BYTES // 5} ")
    assert wgo.transfer()[1] > TRANSFER_BYTES // 5
