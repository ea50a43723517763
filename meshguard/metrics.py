"""Prometheus text metrics of a running daemon (``--metrics HOST:PORT``).

The daemon's loop builds an immutable ``MetricsSnapshot`` and publishes it to a
``LatestSnapshot``; prometheus-client's HTTP server thread turns the latest one into text on
every scrape. The scrape thread therefore never touches live daemon state, and a scrape costs
the loop nothing. Metrics live on a dedicated ``CollectorRegistry``, not the process-global
one, so several nodes in one process (tests) never mix.

Exposed (counters are totals since the daemon started):

- ``meshguard_members{state}`` gauge: members by state (alive, suspect, dead, left);
- ``meshguard_tunnels`` gauge: WireGuard peers with a current session;
- ``meshguard_local_health`` gauge: Lifeguard awareness score, 0 is healthy;
- ``meshguard_handshakes_total{result}``: handshakes by result (initiated, completed, ...);
- ``meshguard_dropped_datagrams_total{reason}``: drops by reason (decode_error, replay, ...);
- ``meshguard_gossip_events_total{event}``: SWIM counters (untrusted_sender, forged_claim, ...);
- ``meshguard_traversal_events_total{event}``: NAT traversal counters (punch_succeeded,
  punch_failed, relay_forwarded, relay_forwarded_bytes, ...), so a relay shows that it relays;
- ``meshguard_peer_receive_bytes_total{peer}``, ``meshguard_peer_transmit_bytes_total{peer}``:
  traffic per peer, labelled by trusted name or short key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshguard.discovery import SeedError, parse_host_port
from meshguard.errors import UserError
from meshguard.identity.keys import public_key_to_base64

MEMBER_STATES = ("alive", "suspect", "dead", "left")


@dataclass(frozen=True, slots=True)
class PeerTraffic:
    peer: str
    """The peer's label: its trusted name, or its short key (``peer_label``)."""
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Everything one scrape reports; built by the daemon on its own loop."""

    members: Mapping[str, int] = field(default_factory=dict)
    """Member count by state; states missing here are reported as 0."""
    tunnels: int = 0
    local_health: int = 0
    handshakes: Mapping[str, int] = field(default_factory=dict)
    drops: Mapping[str, int] = field(default_factory=dict)
    gossip: Mapping[str, int] = field(default_factory=dict)
    traversal: Mapping[str, int] = field(default_factory=dict)
    peers: Sequence[PeerTraffic] = ()


CollectFn = Callable[[], MetricsSnapshot]


def peer_label(name: str | None, public_key: bytes) -> str:
    """A peer's metric label: its trusted name, else the first 8 base64 characters of its key."""
    return name if name else public_key_to_base64(public_key)[:8]


class LatestSnapshot:
    """Hands snapshots from the daemon loop to the scrape thread; call it to get the latest."""

    def __init__(self, initial: MetricsSnapshot | None = None) -> None:
        self._lock = threading.Lock()
        self._snapshot = initial or MetricsSnapshot()

    def publish(self, snapshot: MetricsSnapshot) -> None:
        with self._lock:
            self._snapshot = snapshot

    def __call__(self) -> MetricsSnapshot:
        with self._lock:
            return self._snapshot


class _SnapshotCollector(Collector):
    def __init__(self, collect_fn: CollectFn) -> None:
        self._collect_fn = collect_fn

    def collect(self) -> Iterator[Metric]:
        snapshot = self._collect_fn()
        members = GaugeMetricFamily(
            "meshguard_members", "Members known to this node, by state.", labels=["state"]
        )
        for state in (*MEMBER_STATES, *sorted(set(snapshot.members) - set(MEMBER_STATES))):
            members.add_metric([state], snapshot.members.get(state, 0))
        yield members
        yield GaugeMetricFamily(
            "meshguard_tunnels", "WireGuard peers with a current session.", value=snapshot.tunnels
        )
        yield GaugeMetricFamily(
            "meshguard_local_health",
            "Lifeguard local health (awareness) score; 0 is healthy.",
            value=snapshot.local_health,
        )
        for name, documentation, label, values in (
            ("meshguard_handshakes", "WireGuard handshakes, by result.", "result",
             snapshot.handshakes),
            ("meshguard_dropped_datagrams", "Datagrams dropped, by reason.", "reason",
             snapshot.drops),
            ("meshguard_gossip_events", "Membership protocol events and rejections (untrusted "
             "senders, forged claims, ...).", "event", snapshot.gossip),
            ("meshguard_traversal_events", "NAT traversal events (punches, relayed datagrams "
             "and bytes, refusals, ...).", "event", snapshot.traversal),
        ):  # fmt: skip
            family = CounterMetricFamily(name, documentation, labels=[label])
            for key in sorted(values):
                family.add_metric([key], values[key])
            yield family
        rx = CounterMetricFamily(
            "meshguard_peer_receive_bytes", "Bytes received from a peer.", labels=["peer"]
        )
        tx = CounterMetricFamily(
            "meshguard_peer_transmit_bytes", "Bytes sent to a peer.", labels=["peer"]
        )
        for traffic in sorted(snapshot.peers, key=lambda t: t.peer):
            rx.add_metric([traffic.peer], traffic.rx_bytes)
            tx.add_metric([traffic.peer], traffic.tx_bytes)
        yield rx
        yield tx


def metrics_registry(collect_fn: CollectFn) -> CollectorRegistry:
    """A registry of its own whose every scrape reports ``collect_fn()``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(collect_fn))
    return registry


def render_metrics(collect_fn: CollectFn) -> bytes:
    """The Prometheus text exposition of one snapshot."""
    return generate_latest(metrics_registry(collect_fn))


class MetricsServer:
    """prometheus-client's HTTP server on a thread of its own; ``close()`` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def serve_metrics(addr: str, collect_fn: CollectFn) -> MetricsServer:
    """Serve ``collect_fn()`` as Prometheus text at ``http://addr/metrics``.

    ``addr`` is ``HOST:PORT`` (``[IPv6]:PORT``; port 0 picks a free one). ``collect_fn`` runs
    on the server's thread (pass a ``LatestSnapshot``). Raises UserError if it cannot listen.
    """
    try:
        listen = parse_host_port(addr, what="--metrics", allow_zero_port=True)
    except SeedError as error:
        raise UserError(str(error)) from None
    try:
        server, thread = start_http_server(listen.port, listen.host, metrics_registry(collect_fn))
    except OSError as error:
        raise UserError(f"--metrics: cannot listen on {addr}: {error.strerror}") from None
    return MetricsServer(server, thread)
