"""Prometheus metrics: the text a real scrape over loopback returns, parsed back."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from meshguard.errors import UserError
from meshguard.metrics import (
    LatestSnapshot,
    MetricsServer,
    MetricsSnapshot,
    PeerTraffic,
    peer_label,
    render_metrics,
    serve_metrics,
)

SNAPSHOT = MetricsSnapshot(
    members={"alive": 4, "suspect": 1},
    tunnels=3,
    local_health=2,
    handshakes={"initiated": 7, "completed": 5},
    drops={"decode_error": 11, "replay": 2},
    gossip={"untrusted_sender": 9, "forged_claim": 1},
    traversal={"relay_forwarded": 40, "relay_forwarded_bytes": 64320},
    peers=(PeerTraffic("db1", 1000, 2000), PeerTraffic("k9Zx+/ab", 5, 0)),
)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _scrape(server: MetricsServer) -> str:
    host, port = server.address
    host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


@pytest.fixture
def latest() -> LatestSnapshot:
    return LatestSnapshot(SNAPSHOT)


@pytest.fixture
def server(latest: LatestSnapshot) -> Iterator[MetricsServer]:
    server = serve_metrics("127.0.0.1:0", latest)
    try:
        yield server
    finally:
        server.close()


def test_scrape_over_loopback_reports_the_snapshot(server: MetricsServer) -> None:
    samples = _samples(_scrape(server))
    expected = {
        ("meshguard_members", (("state", "alive"),)): 4,
        ("meshguard_members", (("state", "suspect"),)): 1,
        ("meshguard_members", (("state", "dead"),)): 0,
        ("meshguard_members", (("state", "left"),)): 0,
        ("meshguard_tunnels", ()): 3,
        ("meshguard_local_health", ()): 2,
        ("meshguard_handshakes_total", (("result", "initiated"),)): 7,
        ("meshguard_handshakes_total", (("result", "completed"),)): 5,
        ("meshguard_dropped_datagrams_total", (("reason", "decode_error"),)): 11,
        ("meshguard_dropped_datagrams_total", (("reason", "replay"),)): 2,
        ("meshguard_gossip_events_total", (("event", "untrusted_sender"),)): 9,
        ("meshguard_gossip_events_total", (("event", "forged_claim"),)): 1,
        ("meshguard_traversal_events_total", (("event", "relay_forwarded"),)): 40,
        ("meshguard_traversal_events_total", (("event", "relay_forwarded_bytes"),)): 64320,
        ("meshguard_peer_receive_bytes_total", (("peer", "db1"),)): 1000,
        ("meshguard_peer_transmit_bytes_total", (("peer", "db1"),)): 2000,
        ("meshguard_peer_receive_bytes_total", (("peer", "k9Zx+/ab"),)): 5,
        ("meshguard_peer_transmit_bytes_total", (("peer", "k9Zx+/ab"),)): 0,
    }
    assert samples == expected
    assert not any(name.startswith(("python_", "process_")) for name, _ in samples)


def test_each_scrape_sees_the_latest_published_snapshot(
    server: MetricsServer, latest: LatestSnapshot
) -> None:
    assert _samples(_scrape(server))[("meshguard_tunnels", ())] == 3
    latest.publish(MetricsSnapshot(tunnels=8, drops={"replay": 3}))
    samples = _samples(_scrape(server))
    assert samples[("meshguard_tunnels", ())] == 8
    assert samples[("meshguard_dropped_datagrams_total", (("reason", "replay"),))] == 3
    assert ("meshguard_peer_receive_bytes_total", (("peer", "db1"),)) not in samples


def test_two_servers_in_one_process_do_not_mix_and_leave_the_global_registry_alone() -> None:
    before = {family.name for family in REGISTRY.collect()}
    first = serve_metrics("127.0.0.1:0", lambda: MetricsSnapshot(tunnels=1))
    second = serve_metrics("[::1]:0", lambda: MetricsSnapshot(tunnels=2))
    try:
        assert second.address[0] == "::1"
        assert _samples(_scrape(first))[("meshguard_tunnels", ())] == 1
        assert _samples(_scrape(second))[("meshguard_tunnels", ())] == 2
    finally:
        first.close()
        second.close()
    assert {family.name for family in REGISTRY.collect()} == before


def test_closed_server_stops_listening(latest: LatestSnapshot) -> None:
    server = serve_metrics("127.0.0.1:0", latest)
    address = server.address
    server.close()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(address, timeout=2):
        pass


def test_bad_or_busy_addresses_are_one_line_errors(server: MetricsServer) -> None:
    with pytest.raises(UserError, match=r"^--metrics: '9100' is not HOST:PORT$"):
        serve_metrics("9100", MetricsSnapshot)
    host, port = server.address
    with pytest.raises(UserError, match=r"cannot listen on .*Address already in use"):
        serve_metrics(f"{host}:{port}", MetricsSnapshot)


def test_render_and_peer_labels() -> None:
    text = render_metrics(lambda: SNAPSHOT).decode()
    assert "# TYPE meshguard_dropped_datagrams_total counter" in text
    assert 'meshguard_members{state="alive"} 4.0' in text
    assert peer_label("db1", bytes(32)) == "db1"
    assert peer_label(None, bytes(32)) == "AAAAAAAA"
    assert peer_label("", b"\xff" * 32) == "////////"
