"""The data plane when another WireGuard implementation owns the tunnels (UAPI or kernel mode).

wireguard-go, boringtun or the kernel hold the TUN interface and the crypto; meshguard keeps
the one mesh UDP port (DESIGN.md §4) and its Node, with ``NodeConfig.external_wireguard``. The
external WireGuard listens on its own port, reached over loopback, and knows every member as
a peer whose endpoint is a loopback socket of ours (one per member, ``127.0.0.1:<ephemeral>``).
What it sends to that socket goes out of the mesh port along the member's current path
(``Node.send_wireguard``: direct, punched or wrapped for the relay); WireGuard datagrams that
arrive on the mesh port come back from the Node (``Node.wireguard_datagrams``, with the member
found by its path or relay envelope) and are passed to the external WireGuard from that
member's socket, so it never roams a peer off its proxy. Datagrams from sources the Node
cannot attribute go through one shared socket, and its answers go to the last such source.

Peers follow the Node's events (``PeerAdded``/``PeerRemoved``); a punched path gets a
persistent keepalive so the NAT mapping stays open.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from meshguard.drivers.pollloop import PollLoop
from meshguard.drivers.uapi import ExternalPeerStats, UapiClient, peer_lines
from meshguard.drivers.udp import UdpSocket
from meshguard.errors import UserError
from meshguard.sansio.node import Node, PeerAdded, PeerRemoved
from meshguard.sansio.traversal import PathChanged, PathKind
from meshguard.sansio.types import Address

log = logging.getLogger("meshguard.dataplane")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK = "127.0.0.1"
PUNCHED_KEEPALIVE = 25
"""Seconds between keepalives on a punched path (NAT mappings often expire after 30 s)."""
UDP_READS_PER_ROUND = 16
PROXY_READS_PER_ROUND = 64
_RECEIVE_BYTES = 65535


class ExternalWireGuard(Protocol):
    """The few operations meshguard needs from a WireGuard implementation it does not run."""

    def set_peer(
        self,
        public_key: bytes,
        *,
        endpoint: Address | None,
        allowed_ips: Sequence[Network],
        persistent_keepalive: int | None,
        preshared_key: bytes | None = None,
    ) -> None: ...

    def remove_peer(self, public_key: bytes) -> None: ...

    def peer_stats(self) -> dict[bytes, ExternalPeerStats]: ...


class UapiWireGuard:
    """``ExternalWireGuard`` over a UAPI socket (wireguard-go, boringtun)."""

    def __init__(self, client: UapiClient) -> None:
        self.client = client

    def configure(self, private_key: bytes) -> int:
        """Set the private key and an ephemeral listen port, drop any old peers; returns the
        port it listens on."""
        self.client.set([f"private_key={private_key.hex()}", "listen_port=0", "replace_peers=true"])
        return self.client.listen_port()

    def set_peer(
        self,
        public_key: bytes,
        *,
        endpoint: Address | None,
        allowed_ips: Sequence[Network],
        persistent_keepalive: int | None,
        preshared_key: bytes | None = None,
    ) -> None:
        self.client.set(
            peer_lines(
                public_key,
                endpoint=endpoint,
                allowed_ips=allowed_ips,
                persistent_keepalive=persistent_keepalive,
                preshared_key=preshared_key,
            )
        )

    def remove_peer(self, public_key: bytes) -> None:
        self.client.remove_peer(public_key)

    def peer_stats(self) -> dict[bytes, ExternalPeerStats]:
        return self.client.get()[1]


@dataclass
class ProxyCounters:
    """What the proxy forwarded or dropped, for logs and tests."""

    from_mesh: int = 0
    to_mesh: int = 0
    unknown_source: int = 0
    not_loopback: int = 0
    configure_errors: int = 0


@dataclass(slots=True)
class _Proxy:
    member: bytes
    wireguard_key: bytes
    sock: socket.socket
    networks: tuple[Network, ...]
    keepalive: int | None


class _Core(Protocol):
    """The parts of ``mesh_daemon.MeshCore`` the proxy drives."""

    node: Node

    def receive_datagrams(self, datagrams: Sequence[bytes], addr: Address, now: float) -> None:
        """Datagrams that arrived on the mesh port from one address."""

    def split_datagrams_to_send(
        self,
    ) -> tuple[list[tuple[bytes, Address]], list[tuple[bytes, Address, int]]]:
        """Datagrams for the mesh port: (ordinary, TTL-limited with their TTL)."""

    def events(self) -> Sequence[object]:
        """What happened."""

    def next_deadline(self) -> float | None:
        """When ``on_timer`` is due."""

    def on_timer(self, now: float) -> None:
        """Run timers."""


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    return sock


class ProxyPlane(PollLoop):
    """Runs the Node on the mesh port and proxies WireGuard datagrams to an external one."""

    def __init__(
        self,
        core: _Core,
        external: ExternalWireGuard,
        udp: UdpSocket,
        *,
        wireguard_port: int,
        on_event: Callable[[object], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(core, clock)
        self.core = core
        self.node = core.node
        self.external = external
        self.udp = udp
        self.wireguard_address = (LOOPBACK, wireguard_port)
        self.on_event = on_event
        self.counters = ProxyCounters()
        self._proxies: dict[bytes, _Proxy] = {}
        self._by_fd: dict[int, _Proxy] = {}
        self._shared = _loopback_socket()
        self._last_unknown: Address | None = None
        self._udp_fd = udp.fileno()
        for fd in (self._udp_fd, self._shared.fileno()):
            self._poller.register(fd, select.EPOLLIN)

    def close(self) -> None:
        for proxy in list(self._proxies.values()):
            proxy.sock.close()
        self._proxies.clear()
        self._by_fd.clear()
        self._shared.close()
        super().close()

    def proxy_port(self, member: bytes) -> int | None:
        """The loopback port standing for ``member`` (the external peer's endpoint)."""
        proxy = self._proxies.get(member)
        return None if proxy is None else int(proxy.sock.getsockname()[1])

    def run(self) -> None:
        self._flush()
        super().run()

    def _ready(self, fd: int) -> None:
        if fd == self._udp_fd:
            self._from_mesh()
        elif fd == self._shared.fileno():
            self._from_shared()
        elif fd in self._by_fd:
            self._from_proxy(self._by_fd[fd])

    # -- datagrams ---------------------------------------------------------------------

    def _from_mesh(self) -> None:
        runs = self.udp.receive(UDP_READS_PER_ROUND)
        if not runs:
            return
        now = self.clock()
        for datagrams, address in runs:
            self.core.receive_datagrams(datagrams, address, now)
        self._flush()

    def _read_loopback(self, sock: socket.socket) -> list[bytes]:
        """What the external WireGuard sent to ``sock`` (other local senders are ignored)."""
        received = []
        for _ in range(PROXY_READS_PER_ROUND):
            try:
                data, source = sock.recvfrom(_RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            if source != self.wireguard_address:
                self.counters.not_loopback += 1
                continue
            received.append(data)
        return received

    def _from_proxy(self, proxy: _Proxy) -> None:
        received = self._read_loopback(proxy.sock)
        if received:
            self.node.send_wireguard(proxy.member, received, self.clock())
            self.counters.to_mesh += len(received)
            self._flush()

    def _from_shared(self) -> None:
        received = self._read_loopback(self._shared)
        if self._last_unknown is not None and received:
            self.udp.send((data, self._last_unknown) for data in received)
            self.counters.to_mesh += len(received)

    def _flush(self) -> None:
        datagrams, limited = self.core.split_datagrams_to_send()
        if limited:
            self.udp.send_limited(limited)
        if datagrams:
            self.udp.send(datagrams)
        if self.side is not None:
            self.side.flush()
        events = self.core.events()
        for event in events:
            self._mirror(event)
            if self.on_event is not None:
                self.on_event(event)
        for data, member, source in self.node.wireguard_datagrams():
            proxy = None if member is None else self._proxies.get(member)
            if proxy is None:
                self.counters.unknown_source += 1
                self._last_unknown = source
                sock = self._shared
            else:
                sock = proxy.sock
            try:
                sock.sendto(data, self.wireguard_address)
            except OSError:
                continue
            self.counters.from_mesh += 1

    # -- peers -------------------------------------------------------------------------

    def _mirror(self, event: object) -> None:
        """Node peers become external peers; a punched path keeps its NAT mapping warm."""
        if isinstance(event, PeerAdded):
            self._add(event)
        elif isinstance(event, PeerRemoved):
            self._remove(event.public_key)
        elif isinstance(event, PathChanged):
            proxy = self._proxies.get(event.public_key)
            keepalive = PUNCHED_KEEPALIVE if event.path.kind is PathKind.PUNCHED else None
            if proxy is not None and proxy.keepalive != keepalive:
                proxy.keepalive = keepalive
                self._configure(proxy)

    def _add(self, event: PeerAdded) -> None:
        self._remove(event.public_key)
        networks: tuple[Network, ...] = (
            ipaddress.ip_network(event.mesh_ipv4),
            ipaddress.ip_network(event.mesh_ipv6),
        )
        path = self.node.paths().get(event.public_key)
        keepalive = (
            PUNCHED_KEEPALIVE if path is not None and path.kind is PathKind.PUNCHED else None
        )
        sock = _loopback_socket()
        proxy = _Proxy(
            event.public_key, self.node.wireguard_key_of(event.public_key), sock, networks,
            keepalive,
        )  # fmt: skip
        self._proxies[event.public_key] = proxy
        self._by_fd[sock.fileno()] = proxy
        self._poller.register(sock.fileno(), select.EPOLLIN)
        self._configure(proxy)

    def _configure(self, proxy: _Proxy) -> None:
        try:
            self.external.set_peer(
                proxy.wireguard_key,
                endpoint=proxy.sock.getsockname(),
                allowed_ips=proxy.networks,
                persistent_keepalive=proxy.keepalive,
            )
        except UserError as error:
            self.counters.configure_errors += 1
            log.warning("event=external_peer_failed error=%s", str(error).replace(" ", "_"))

    def _remove(self, member: bytes) -> None:
        proxy = self._proxies.pop(member, None)
        if proxy is None:
            return
        self._poller.unregister(proxy.sock.fileno())
        del self._by_fd[proxy.sock.fileno()]
        proxy.sock.close()
        try:
            self.external.remove_peer(proxy.wireguard_key)
        except UserError as error:
            self.counters.configure_errors += 1
            log.warning("event=external_peer_failed error=%s", str(error).replace(" ", "_"))
