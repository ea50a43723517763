"""A WireGuard device as a sans-IO machine: peers, sessions, cryptokey routing, timers.

Datagrams and TUN packets go in with an explicit ``now``; datagrams to send, packets for the
TUN and events come out when pulled. The transport path (``send_packets`` and
``receive_datagrams``) is written for throughput: per packet it does one dict lookup for the
route or the session, one AEAD call and a few integer operations; per-peer bookkeeping
(timers, byte counters, roaming) runs once per run of packets for the same peer.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.types import Address, Entropy, RandomSource, WallClock

from .constants import (
    COOKIE_REPLY_SIZE,
    HANDSHAKE_INITIATION_RATE,
    INITIATION_SIZE,
    KEEPALIVE_SIZE,
    KEEPALIVE_TIMEOUT,
    LAST_MINUTE_HANDSHAKE_AGE,
    MAX_TIMER_HANDSHAKES,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    REJECT_AFTER_MESSAGES,
    REKEY_AFTER_MESSAGES,
    REKEY_TIMEOUT,
    RESPONSE_SIZE,
)
from .cookie import CookieChecker, LoadMonitor, RateLimiter
from .crypto import dh, tai64n
from .events import (
    EndpointChanged,
    HandshakeCompleted,
    PeerUnreachable,
    SessionExpired,
    WireGuardEvent,
)
from .keypair import Keypair
from .noise import (
    StaticIdentity,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
)
from .peer import Peer
from .replay import RING_MASK
from .routing import AllowedIPs, Network

_HEADER = struct.Struct("<IIQ")
_INDEX = struct.Struct("<I")
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_PADDING = tuple(bytes(n) for n in range(16))


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """Tunables; the defaults suit a mesh node of up to a few hundred peers."""

    mtu: int = 1420
    """Padding to 16 bytes never grows a packet beyond this."""
    staged_packets: int = 128
    """Per-peer queue of packets waiting for a handshake; the oldest is dropped when full."""
    under_load_handshakes_per_second: int = 100
    """Above this rate of handshake messages the device demands cookies (mac2)."""
    handshakes_per_source_per_second: float = 20.0
    """Under load, handshake messages accepted per second from one source IP..."""
    handshake_burst_per_source: int = 5
    """...with this burst."""
    rate_limited_sources: int = 4096
    route_cache_size: int = 65536

    def __post_init__(self) -> None:
        if not 68 <= self.mtu <= 65535:
            raise LocalProtocolError("mtu must be between 68 and 65535")
        if self.staged_packets < 1 or self.rate_limited_sources < 1 or self.route_cache_size < 1:
            raise LocalProtocolError("queue and table sizes must be positive")
        if self.under_load_handshakes_per_second < 0:
            raise LocalProtocolError("the under-load threshold cannot be negative")
        if self.handshakes_per_source_per_second <= 0 or self.handshake_burst_per_source < 1:
            raise LocalProtocolError("the per-source handshake rate and burst must be positive")


@dataclass(frozen=True, slots=True)
class PeerStats:
    endpoint: Address | None
    last_handshake: float | None
    """Wall-clock seconds of the latest completed handshake."""
    rx_bytes: int
    tx_bytes: int
    handshake_completed: bool


class WireGuardDevice:
    """One WireGuard interface: a static key, its peers, and the sessions with them."""

    def __init__(
        self,
        private_key: bytes,
        *,
        entropy: Entropy,
        rng: RandomSource,
        wallclock: WallClock,
        config: DeviceConfig = DeviceConfig(),
    ) -> None:
        if not isinstance(private_key, bytes) or len(private_key) != 32:
            raise LocalProtocolError("a WireGuard private key is 32 bytes")
        self._identity = StaticIdentity(private_key)
        self._entropy = entropy
        self._rng = rng
        self._wallclock = wallclock
        self._config = config
        self._cookie_checker = CookieChecker(self._identity.public, entropy)
        self._load = LoadMonitor(config.under_load_handshakes_per_second)
        self._rate_limiter = RateLimiter(
            config.handshakes_per_source_per_second,
            config.handshake_burst_per_source,
            config.rate_limited_sources,
        )
        self._peers: dict[bytes, Peer] = {}
        self._keypairs: dict[int, Keypair] = {}
        """Receiver index → session: the transport path's one lookup."""
        self._handshakes: dict[int, Peer] = {}
        """Receiver index → peer with an initiation in flight under that index."""
        self._routes: AllowedIPs[Peer] = AllowedIPs(config.route_cache_size)
        self._timers: list[tuple[float, int, Peer]] = []
        self._timer_seq = 0
        self._datagrams: list[tuple[bytes, Address]] = []
        self._tun: list[bytes] = []
        self._events: list[WireGuardEvent] = []
        self.counters: Counter[str] = Counter()
        """Why datagrams and packets were dropped. From the network: ``malformed`` (bad
        type or length), ``mac1``, ``under_load`` (no valid mac2; a cookie reply was sent),
        ``rate_limited``, ``handshake_invalid``, ``handshake_replay`` (timestamp not newer),
        ``handshake_flood`` (initiations under 1/50 s apart), ``handshake_collision`` (ours
        and theirs crossed; ours wins), ``cookie_invalid``, ``unknown_index``,
        ``expired_session``, ``decrypt``, ``replay``, ``malformed_packet`` (inner packet),
        ``not_allowed_ip``. From the TUN: ``malformed_packet``, ``no_route``, ``queue_full``
        (oldest queued packet dropped), ``no_endpoint`` (nowhere to send a handshake)."""

    # ------------------------------------------------------------------ configuration

    @property
    def public_key(self) -> bytes:
        return self._identity.public

    def add_peer(
        self,
        public_key: bytes,
        *,
        allowed_ips: Sequence[Network] = (),
        endpoint: Address | None = None,
        preshared_key: bytes | None = None,
        persistent_keepalive: float | None = None,
        now: float,
    ) -> None:
        if not isinstance(public_key, bytes) or len(public_key) != 32:
            raise LocalProtocolError("a WireGuard public key is 32 bytes")
        if public_key in self._peers:
            raise LocalProtocolError("peer already added")
        if public_key == self._identity.public:
            raise LocalProtocolError("a device cannot be its own peer")
        if preshared_key is not None and (
            not isinstance(preshared_key, bytes) or len(preshared_key) != 32
        ):
            raise LocalProtocolError("a preshared key is 32 bytes")
        if persistent_keepalive is not None and not 0 < persistent_keepalive <= 65535:
            raise LocalProtocolError("persistent keepalive must be in (0, 65535] seconds")
        networks = _networks(allowed_ips)
        static_static = dh(self._identity.private, public_key)
        if static_static is None:
            raise LocalProtocolError("public key is a low-order point")
        peer = Peer(
            public_key,
            static_static,
            preshared_key,
            endpoint,
            persistent_keepalive,
            self._config.staged_packets,
        )
        self._peers[public_key] = peer
        self._routes.assign(peer, networks)
        if persistent_keepalive and endpoint is not None:
            self._send_keepalive(peer, now)
            self._schedule(peer)

    def remove_peer(self, public_key: bytes, now: float) -> None:
        peer = self._peer(public_key)
        self._erase_sessions(peer)
        self._routes.assign(peer, ())
        peer.removed = True
        del self._peers[public_key]

    def set_endpoint(self, public_key: bytes, endpoint: Address) -> None:
        self._peer(public_key).endpoint = endpoint

    def set_allowed_ips(self, public_key: bytes, allowed_ips: Sequence[Network]) -> None:
        peer = self._peer(public_key)
        self._routes.assign(peer, _networks(allowed_ips))

    def allowed_ips(self, public_key: bytes) -> list[Network]:
        return self._routes.networks_of(self._peer(public_key))

    def peer_stats(self, public_key: bytes) -> PeerStats:
        peer = self._peer(public_key)
        return PeerStats(
            endpoint=peer.endpoint,
            last_handshake=peer.last_handshake_wall,
            rx_bytes=peer.rx_bytes,
            tx_bytes=peer.tx_bytes,
            handshake_completed=peer.last_handshake_wall is not None,
        )

    def peers(self) -> list[bytes]:
        return list(self._peers)

    def initiate_handshake(self, public_key: bytes, now: float) -> None:
        """Start a handshake now (at most one per REKEY_TIMEOUT, as for any initiation)."""
        peer = self._peer(public_key)
        self._send_initiation(peer, now, is_retry=False)
        self._schedule(peer)

    # ------------------------------------------------------------------ output

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        out = self._datagrams
        self._datagrams = []
        return out

    def tun_packets(self) -> list[bytes]:
        out = self._tun
        self._tun = []
        return out

    def events(self) -> list[WireGuardEvent]:
        out = self._events
        self._events = []
        return out

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers:
            at, _, peer = timers[0]
            if not peer.removed and at == peer.scheduled_at:
                return at
            heapq.heappop(timers)
        return None

    def on_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            at, _, peer = heapq.heappop(timers)
            if peer.removed or at != peer.scheduled_at:
                continue
            peer.scheduled_at = float("inf")
            self._run_peer_timers(peer, now)
            self._schedule(peer)

    def _schedule(self, peer: Peer) -> None:
        """Make sure the heap wakes us no later than the peer's earliest timer."""
        at = peer.deadline()
        if at is not None and at < peer.scheduled_at and not peer.removed:
            peer.scheduled_at = at
            self._timer_seq += 1
            heapq.heappush(self._timers, (at, self._timer_seq, peer))

    def _run_peer_timers(self, peer: Peer, now: float) -> None:
        at = peer.retransmit_at
        if at is not None and at <= now:
            peer.retransmit_at = None
            if peer.handshake_attempts > MAX_TIMER_HANDSHAKES:
                peer.keepalive_at = None
                peer.staged.clear()
                if peer.zero_keys_at is None:
                    peer.on_session_derived(now)
                if peer.initiation is not None:
                    self._handshakes.pop(peer.initiation.local_index, None)
                    peer.initiation = None
                self._events.append(PeerUnreachable(peer.public_key))
            else:
                peer.handshake_attempts += 1
                self._send_initiation(peer, now, is_retry=True)
        at = peer.keepalive_at
        if at is not None and at <= now:
            peer.keepalive_at = None
            self._send_keepalive(peer, now)
            if peer.need_another_keepalive:
                peer.need_another_keepalive = False
                peer.keepalive_at = now + KEEPALIVE_TIMEOUT
        at = peer.new_handshake_at
        if at is not None and at <= now:
            peer.new_handshake_at = None
            self._send_initiation(peer, now, is_retry=False)
        at = peer.zero_keys_at
        if at is not None and at <= now:
            peer.zero_keys_at = None
            peer.staged.clear()
            if self._erase_sessions(peer):
                self._events.append(SessionExpired(peer.public_key))
        at = peer.persistent_at
        if at is not None and at <= now:
            peer.persistent_at = None
            self._send_keepalive(peer, now)

    # ------------------------------------------------------------------ outbound transport

    def send_packets(self, packets: Sequence[bytes], now: float) -> None:
        """Encrypt IP packets from the TUN to the peers their destinations route to."""
        cache = self._routes.cache
        lookup = self._routes.lookup
        out = self._datagrams
        append = out.append
        mtu = self._config.mtu
        padding = _PADDING
        prefix = _NONCE_PREFIX
        batch_peer: Peer | None = None
        batch_bytes = 0
        batch_data = False
        for packet in packets:
            size = len(packet)
            if size >= 20 and packet[0] >> 4 == 4:
                destination = packet[16:20]
            elif size >= 40 and packet[0] >> 4 == 6:
                destination = packet[24:40]
            else:
                self.counters["malformed_packet"] += 1
                continue
            peer = cache.get(destination) or lookup(destination)
            if peer is None:
                self.counters["no_route"] += 1
                continue
            if peer is not batch_peer:
                if batch_peer is not None:
                    self._after_send(batch_peer, batch_bytes, batch_data, now)
                batch_peer = peer
                batch_bytes = 0
                batch_data = False
            keypair = peer.current
            if (
                keypair is None
                or now >= keypair.rekey_at
                or keypair.send_counter >= REKEY_AFTER_MESSAGES
            ):
                batch_bytes += self._send_slow(peer, packet, now)
                batch_data = True
                continue
            counter = keypair.send_counter
            keypair.send_counter = counter + 1
            pad = -size & 15
            if pad:
                if size + pad > mtu:
                    pad = mtu - size if mtu > size else 0
                packet += padding[pad]
            counter_bytes = counter.to_bytes(8, "little")
            datagram = (
                keypair.header
                + counter_bytes
                + keypair.sender.encrypt(prefix + counter_bytes, packet, None)
            )
            batch_bytes += len(datagram)
            batch_data = True
            append((datagram, peer.endpoint))  # type: ignore[arg-type]
        if batch_peer is not None:
            self._after_send(batch_peer, batch_bytes, batch_data, now)

    def _send_slow(self, peer: Peer, packet: bytes, now: float) -> int:
        """Send one packet when the fast path cannot: stage it, rekey, or both.

        Returns the bytes sent.
        """
        keypair = peer.current
        if keypair is not None and _usable(keypair, now):
            sent = self._encrypt_and_send(peer, keypair, packet)
            self._keep_key_fresh_sending(peer, keypair, now)
            return sent
        if len(peer.staged) == peer.staged.maxlen:
            self.counters["queue_full"] += 1
        peer.staged.append(packet)
        self._send_initiation(peer, now, is_retry=False)
        return 0

    def _encrypt_and_send(self, peer: Peer, keypair: Keypair, packet: bytes) -> int:
        size = len(packet)
        pad = -size & 15
        mtu = self._config.mtu
        if pad and size + pad > mtu:
            pad = mtu - size if mtu > size else 0
        counter = keypair.send_counter
        keypair.send_counter = counter + 1
        counter_bytes = counter.to_bytes(8, "little")
        datagram = (
            keypair.header
            + counter_bytes
            + keypair.sender.encrypt(_NONCE_PREFIX + counter_bytes, packet + _PADDING[pad], None)
        )
        assert peer.endpoint is not None  # a session implies a peer we heard from
        self._datagrams.append((datagram, peer.endpoint))
        return len(datagram)

    def _keep_key_fresh_sending(self, peer: Peer, keypair: Keypair, now: float) -> None:
        if keypair.send_counter > REKEY_AFTER_MESSAGES or (
            keypair.is_initiator and now >= keypair.rekey_at
        ):
            self._send_initiation(peer, now, is_retry=False)

    def _after_send(self, peer: Peer, sent_bytes: int, data: bool, now: float) -> None:
        """Per-batch bookkeeping after transport messages went to ``peer``."""
        if sent_bytes:
            peer.tx_bytes += sent_bytes
            peer.on_authenticated_traversal(now)
            peer.on_authenticated_sent()
            if data:
                peer.on_data_sent(now, self._rng)
        self._schedule(peer)

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        """Send the staged packets, or an empty one if none: a session proves liveness."""
        if not peer.staged:
            peer.staged.append(b"")
        self._send_staged(peer, now)

    def _send_staged(self, peer: Peer, now: float) -> None:
        keypair = peer.current
        if keypair is None or not _usable(keypair, now):
            self._send_initiation(peer, now, is_retry=False)
            return
        sent = 0
        data = False
        staged = peer.staged
        while staged:
            packet = staged.popleft()
            data = data or bool(packet)
            sent += self._encrypt_and_send(peer, keypair, packet)
        self._after_send(peer, sent, data, now)
        self._keep_key_fresh_sending(peer, keypair, now)

    # ------------------------------------------------------------------ inbound

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one WireGuard datagram (message types 1-4) from ``addr``."""
        size = len(data)
        if size < 4:
            self.counters["malformed"] += 1
            return
        message_type = _INDEX.unpack_from(data)[0]
        if message_type == MESSAGE_TRANSPORT and size >= KEEPALIVE_SIZE:
            self.receive_datagrams((data,), addr, now)
        elif message_type == MESSAGE_INITIATION and size == INITIATION_SIZE:
            self._receive_handshake(data, addr, now, self._receive_initiation)
        elif message_type == MESSAGE_RESPONSE and size == RESPONSE_SIZE:
            self._receive_handshake(data, addr, now, self._receive_response)
        elif message_type == MESSAGE_COOKIE_REPLY and size == COOKIE_REPLY_SIZE:
            self._receive_cookie_reply(data, now)
        else:
            self.counters["malformed"] += 1

    def receive_datagrams(self, datagrams: Sequence[bytes], addr: Address, now: float) -> None:
        """Handle a batch of datagrams from one address (a GRO batch): the fast path."""
        keypairs = self._keypairs
        counters = self.counters
        routes = self._routes
        cache = routes.cache
        tun = self._tun
        append = tun.append
        header = _HEADER
        prefix = _NONCE_PREFIX
        reject_after_messages = REJECT_AFTER_MESSAGES
        ring_mask = RING_MASK
        batch_peer: Peer | None = None
        batch_keypair: Keypair | None = None
        peer: Peer | None = None
        allowed_source = b""
        # allowed_source: the last inner source address found in batch_peer's allowed IPs.
        batch_bytes = 0
        batch_data = False
        for data in datagrams:
            size = len(data)
            if size < KEEPALIVE_SIZE:
                self.receive_datagram(data, addr, now)
                continue
            message_type, index, counter = header.unpack_from(data)
            if message_type != MESSAGE_TRANSPORT:
                self.receive_datagram(data, addr, now)
                continue
            keypair = keypairs.get(index)
            if keypair is None:
                counters["unknown_index"] += 1
                continue
            if now >= keypair.reject_at:
                counters["expired_session"] += 1
                continue
            try:
                packet = keypair.receiver.decrypt(prefix + data[8:16], data[16:], None)
            except InvalidTag:
                counters["decrypt"] += 1
                continue
            replay = keypair.replay
            last = replay.last
            if last < counter < reject_after_messages and counter >> 6 == last >> 6:
                # ReplayWindow.accept's common case (in order, same block), inlined.
                replay.blocks[(counter >> 6) & ring_mask] |= 1 << (counter & 63)
                replay.last = counter
            elif not replay.accept(counter):
                counters["replay"] += 1
                continue
            if keypair is not batch_keypair:
                peer = keypair.peer
                if peer is not batch_peer:
                    if batch_peer is not None:
                        self._after_receive(batch_peer, batch_bytes, batch_data, addr, now)
                    batch_peer = peer
                    batch_bytes = 0
                    batch_data = False
                    allowed_source = b""
                if keypair is not peer.current:
                    self._received_on_other_keypair(peer, keypair, addr, now)
                batch_keypair = keypair
            batch_bytes += size
            length = len(packet)
            if not length:
                continue
            if length >= 20 and packet[0] >> 4 == 4:
                source = packet[12:16]
                total = (packet[2] << 8) | packet[3]
            elif length >= 40 and packet[0] >> 4 == 6:
                source = packet[8:24]
                total = ((packet[4] << 8) | packet[5]) + 40
            else:
                counters["malformed_packet"] += 1
                continue
            if total > length or total < 20:
                counters["malformed_packet"] += 1
                continue
            if source != allowed_source:
                if cache.get(source) is not peer and routes.lookup(source) is not peer:
                    counters["not_allowed_ip"] += 1
                    continue
                allowed_source = source
            batch_data = True
            append(packet if total == length else packet[:total])
        if batch_peer is not None:
            self._after_receive(batch_peer, batch_bytes, batch_data, addr, now)

    def _after_receive(
        self, peer: Peer, received_bytes: int, data: bool, addr: Address, now: float
    ) -> None:
        """Per-batch bookkeeping after authenticated transport messages from ``peer``."""
        peer.rx_bytes += received_bytes
        self._roam(peer, addr)
        current = peer.current
        if (
            current is not None
            and current.is_initiator
            and not peer.sent_last_minute_handshake
            and now - current.created >= LAST_MINUTE_HANDSHAKE_AGE
        ):
            peer.sent_last_minute_handshake = True
            self._send_initiation(peer, now, is_retry=False)
        peer.on_authenticated_traversal(now)
        peer.on_authenticated_received()
        if data:
            peer.on_data_received(now)
        self._schedule(peer)

    def _received_on_other_keypair(
        self, peer: Peer, keypair: Keypair, addr: Address, now: float
    ) -> None:
        """A packet on the responder's ``next`` session confirms it: make it current."""
        if keypair is not peer.next:
            return
        if peer.previous is not None:
            self._keypairs.pop(peer.previous.local_index, None)
        peer.previous = peer.current
        peer.current = keypair
        peer.next = None
        peer.on_handshake_complete(self._wallclock())
        self._events.append(HandshakeCompleted(peer.public_key))
        self._roam(peer, addr)
        if peer.staged:
            self._send_staged(peer, now)

    def _roam(self, peer: Peer, addr: Address) -> None:
        if peer.endpoint != addr:
            peer.endpoint = addr
            self._events.append(EndpointChanged(peer.public_key, addr))

    def _receive_handshake(
        self,
        data: bytes,
        addr: Address,
        now: float,
        handler: Callable[[bytes, Address, float], None],
    ) -> None:
        """mac1 always; under load, mac2 (else a cookie reply) and a per-source rate limit."""
        checker = self._cookie_checker
        if not checker.check_mac1(data):
            self.counters["mac1"] += 1
            return
        if self._load.note_handshake(now):
            if not checker.check_mac2(data, addr, now):
                sender_index = _INDEX.unpack_from(data, 4)[0]
                reply = checker.create_reply(data, sender_index, addr, now)
                self._datagrams.append((reply, addr))
                self.counters["under_load"] += 1
                return
            if not self._rate_limiter.allow(addr[0], now):
                self.counters["rate_limited"] += 1
                return
        handler(data, addr, now)

    def _receive_initiation(self, data: bytes, addr: Address, now: float) -> None:
        peers = self._peers

        def static_static_for(initiator: bytes) -> bytes | None:
            peer = peers.get(initiator)
            return None if peer is None else peer.static_static

        initiation = consume_initiation(self._identity, data, static_static_for)
        if initiation is None:
            self.counters["handshake_invalid"] += 1
            return
        peer = peers[initiation.initiator_static]
        crossed = peer.initiation is not None and now - peer.last_sent_handshake < REKEY_TIMEOUT
        if crossed and self._wins_collision(peer):
            self.counters["handshake_collision"] += 1
            return
        if initiation.timestamp <= peer.last_timestamp:
            self.counters["handshake_replay"] += 1
            return
        if now - peer.last_initiation_consumed <= HANDSHAKE_INITIATION_RATE:
            self.counters["handshake_flood"] += 1
            return
        peer.last_timestamp = initiation.timestamp
        peer.last_initiation_consumed = now
        index = self._new_index()
        created = create_response(initiation, self._entropy(32), index, peer.preshared_key)
        if created is None:
            self.counters["handshake_invalid"] += 1
            return
        body, keys = created
        if peer.initiation is not None and not crossed:
            self._handshakes.pop(peer.initiation.local_index, None)
            peer.initiation = None
        keypair = Keypair(peer, keys, index, False, now)
        if peer.next is not None:
            self._keypairs.pop(peer.next.local_index, None)
        if peer.previous is not None:
            self._keypairs.pop(peer.previous.local_index, None)
        peer.previous = None
        peer.next = keypair
        self._keypairs[index] = keypair
        peer.rx_bytes += len(data)
        self._roam(peer, addr)
        peer.on_authenticated_traversal(now)
        peer.on_authenticated_received()
        response = peer.cookies.add_macs(body, now)
        peer.last_sent_handshake = now
        peer.on_session_derived(now)
        peer.on_authenticated_sent()
        self._datagrams.append((response, addr))
        peer.tx_bytes += len(response)
        self._schedule(peer)

    def _wins_collision(self, peer: Peer) -> bool:
        """Whether our initiation beats ``peer``'s when both are in flight at once.

        wireguard-go always answers the other side's initiation, which discards its own, so
        when both sides initiate both handshakes fail until a retransmission. Here the
        greater static key keeps its initiation and ignores the other; the lesser answers
        and also keeps its own initiation, so a wireguard-go peer (which answered ours)
        still completes a session within one round trip.
        """
        return self._identity.public > peer.public_key

    def _receive_response(self, data: bytes, addr: Address, now: float) -> None:
        receiver = _INDEX.unpack_from(data, 8)[0]
        peer = self._handshakes.get(receiver)
        if peer is None or peer.initiation is None:
            self.counters["unknown_index"] += 1
            return
        keys = consume_response(self._identity, peer.initiation, data, peer.preshared_key)
        if keys is None:
            self.counters["handshake_invalid"] += 1
            return
        del self._handshakes[receiver]
        peer.initiation = None
        keypair = Keypair(peer, keys, receiver, True, now)
        if peer.next is not None:
            if peer.current is not None:
                self._keypairs.pop(peer.current.local_index, None)
            old_previous = peer.previous
            peer.previous = peer.next
            peer.next = None
        else:
            old_previous = peer.previous
            peer.previous = peer.current
        if old_previous is not None:
            self._keypairs.pop(old_previous.local_index, None)
        peer.current = keypair
        self._keypairs[receiver] = keypair
        peer.rx_bytes += len(data)
        self._roam(peer, addr)
        peer.on_authenticated_traversal(now)
        peer.on_authenticated_received()
        peer.on_session_derived(now)
        peer.on_handshake_complete(self._wallclock())
        self._events.append(HandshakeCompleted(peer.public_key))
        self._send_keepalive(peer, now)
        self._schedule(peer)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        receiver = _INDEX.unpack_from(data, 4)[0]
        peer = self._handshakes.get(receiver)
        if peer is None:
            keypair = self._keypairs.get(receiver)
            peer = None if keypair is None else keypair.peer
        if peer is None:
            self.counters["unknown_index"] += 1
            return
        if not peer.cookies.consume_reply(data, now):
            self.counters["cookie_invalid"] += 1

    # ------------------------------------------------------------------ handshakes

    def _send_initiation(self, peer: Peer, now: float, *, is_retry: bool) -> None:
        """Send a handshake initiation, at most one per REKEY_TIMEOUT per peer."""
        if not is_retry:
            peer.handshake_attempts = 0
        if now - peer.last_sent_handshake < REKEY_TIMEOUT:
            return
        endpoint = peer.endpoint
        if endpoint is None:
            self.counters["no_endpoint"] += 1
            return
        index = self._new_index()
        created = create_initiation(
            self._identity,
            peer.public_key,
            peer.static_static,
            self._entropy(32),
            index,
            tai64n(self._wallclock()),
        )
        if created is None:
            self.counters["handshake_invalid"] += 1
            return
        body, state = created
        peer.last_sent_handshake = now
        if peer.initiation is not None:
            self._handshakes.pop(peer.initiation.local_index, None)
        peer.initiation = state
        self._handshakes[index] = peer
        message = peer.cookies.add_macs(body, now)
        self._datagrams.append((message, endpoint))
        peer.tx_bytes += len(message)
        peer.on_authenticated_traversal(now)
        peer.on_authenticated_sent()
        peer.on_handshake_initiated(now, self._rng)

    def _new_index(self) -> int:
        """A fresh random receiver index, unique among sessions and handshakes in flight."""
        while True:
            index: int = _INDEX.unpack(self._entropy(4))[0]
            if index not in self._keypairs and index not in self._handshakes:
                return index

    def _erase_sessions(self, peer: Peer) -> bool:
        """Forget every session and handshake with ``peer``; whether there was any."""
        had_any = False
        for keypair in peer.keypairs():
            self._keypairs.pop(keypair.local_index, None)
            had_any = True
        peer.current = peer.previous = peer.next = None
        if peer.initiation is not None:
            self._handshakes.pop(peer.initiation.local_index, None)
            peer.initiation = None
            had_any = True
        return had_any

    def _peer(self, public_key: bytes) -> Peer:
        peer = self._peers.get(public_key)
        if peer is None:
            raise LocalProtocolError("unknown peer")
        return peer


def _usable(keypair: Keypair, now: float) -> bool:
    return now < keypair.reject_at and keypair.send_counter < REJECT_AFTER_MESSAGES


def _networks(allowed_ips: Sequence[Network]) -> list[Network]:
    """Check that every allowed IP is an ``ipaddress`` network object."""
    networks: list[Network] = []
    for item in allowed_ips:
        if not isinstance(item, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise LocalProtocolError(f"allowed IP {item!r} is not an IPv4 or IPv6 network")
        networks.append(item)
    return networks
