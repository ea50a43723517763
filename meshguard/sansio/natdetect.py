"""NAT behaviour discovery (RFC 5780 ideas) as a sans-IO machine driven by ``StunClient``.

``NatProber`` runs once, from one UDP port, and ends with a ``NatDetected`` event:

1. **Test I** to every configured responder: the mapped address each one sees, and each
   responder's OTHER-ADDRESS if it supports RFC 5780.
2. **Filtering** (needs an RFC 5780 server F, RFC 5780 §4.4): a Binding request with
   CHANGE-REQUEST(ip+port); an answer from F's other address means endpoint-independent
   filtering. Otherwise CHANGE-REQUEST(port): an answer from F's address but other port means
   address-dependent filtering; silence again means address-and-port-dependent. This runs
   before the mapping tests below, because those open the very NAT pinholes the answers come
   through; a server whose answer addresses were already contacted is not used.
3. **Hairpinning**, alongside 2: a Binding request to our own mapped address. It counts if it
   comes back to us (as a request, or answered by a mesh node's responder on our port).
4. **Mapping** (RFC 5780 §4.3): with F, a request to (other IP, primary port), and only if
   that saw a different mapping than test I, one to (other IP, other port). All mapped
   addresses seen are then compared: the same for every destination →
   endpoint-independent; different across addresses but equal across ports of one address →
   address-dependent; different across ports → address-and-port-dependent. With only plain
   responders on distinct addresses, a difference cannot be attributed to address or port and
   is reported as the stricter address-and-port-dependent. Mapped equal to one of our local
   addresses → no NAT.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, auto

from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.messages import Endpoint, NatFiltering, NatInfo, NatMapping
from meshguard.sansio.stun import (
    MappedAddress,
    MessageClass,
    PublicAddressChanged,
    StunClient,
    StunErrorResponse,
    StunTimeout,
    StunTiming,
    decode,
    transaction_id_of,
)
from meshguard.sansio.types import Address, Entropy


@dataclass(frozen=True, slots=True)
class MappingObservation:
    """A request to ``destination`` left the NAT as ``mapped``."""

    destination: Address
    mapped: Address


@dataclass(frozen=True, slots=True)
class NatReport:
    """Everything one probe run learned.

    ``nat.allows_relay`` is left False: it is configuration, not a measurement.
    ``hairpinning_tested`` is False when no mapped address was learned to test it with;
    ``filtering_server`` is the RFC 5780 server the filtering tests used, if any.
    """

    nat: NatInfo
    public_endpoints: tuple[Endpoint, ...]
    observations: tuple[MappingObservation, ...]
    unanswered: tuple[Address, ...]
    filtering_server: Address | None
    hairpinning_tested: bool


@dataclass(frozen=True, slots=True)
class NatDetected:
    """The probe run is over."""

    report: NatReport


def classify_mapping(
    observations: Sequence[MappingObservation], local_addresses: Sequence[Address]
) -> NatMapping:
    """Mapping behaviour from what different destinations saw (see the module docstring).

    With servers of both families the IPv4 observations decide: NAT is an IPv4 matter, and an
    IPv6 address seen by one server cannot be compared with an IPv4 one seen by another.
    """
    ipv4 = [o for o in observations if ":" not in o.mapped[0]]
    observations = ipv4 or observations
    if not observations:
        return NatMapping.UNKNOWN
    if all(o.mapped in local_addresses for o in observations):
        return NatMapping.NONE
    mapped = {o.mapped for o in observations}
    if len(mapped) == 1:
        if len({o.destination[0] for o in observations}) >= 2:
            return NatMapping.ENDPOINT_INDEPENDENT
        return NatMapping.UNKNOWN
    same_address_pairs = [
        (a, b)
        for a, b in itertools.combinations(observations, 2)
        if a.destination[0] == b.destination[0] and a.destination[1] != b.destination[1]
    ]
    if any(a.mapped != b.mapped for a, b in same_address_pairs):
        return NatMapping.ADDRESS_AND_PORT_DEPENDENT
    if same_address_pairs:
        return NatMapping.ADDRESS_DEPENDENT
    return NatMapping.ADDRESS_AND_PORT_DEPENDENT


class _Phase(Enum):
    IDLE = auto()
    DISCOVER = auto()
    FILTER_CHANGE_IP_AND_PORT = auto()
    FILTER_CHANGE_PORT = auto()
    MAPPING = auto()
    DONE = auto()


class NatProber:
    """One NAT discovery run over ``servers`` from one local UDP port.

    ``local_addresses`` are the (IP, port) pairs our socket may be seen as without NAT. The
    driver passes every datagram whose ``matches`` is true to ``receive_datagram``.
    """

    def __init__(
        self,
        servers: Sequence[Address],
        local_addresses: Sequence[Address],
        entropy: Entropy,
        timing: StunTiming | None = None,
        software: str | None = None,
    ) -> None:
        if not servers:
            raise LocalProtocolError("NAT detection needs at least one STUN server")
        if len(set(servers)) != len(servers):
            raise LocalProtocolError("STUN servers listed twice")
        self.servers = tuple(servers)
        self.local_addresses = tuple(local_addresses)
        self.client = StunClient(entropy, timing, software)
        self.report: NatReport | None = None
        self._phase = _Phase.IDLE
        self._pending: dict[bytes, Address] = {}
        self._contacted: list[Address] = []
        self._observations: list[MappingObservation] = []
        self._other_address: dict[Address, Address] = {}
        self._unanswered: list[Address] = []
        self._filtering_server: Address | None = None
        self._mapping_server: Address | None = None
        self._filtering = NatFiltering.UNKNOWN
        self._hairpin_id: bytes | None = None
        self._hairpinning: bool | None = None
        self._events: list[NatDetected] = []

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    def start(self, now: float) -> None:
        """Send test I to every server."""
        if self._phase is not _Phase.IDLE:
            raise LocalProtocolError("a NatProber runs once")
        self._phase = _Phase.DISCOVER
        for server in self.servers:
            self._query(server, now)

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` belongs to this run (a response, or our own hairpin request)."""
        transaction_id = transaction_id_of(data)
        return transaction_id is not None and (
            transaction_id in self._pending or transaction_id == self._hairpin_id
        )

    # ---- sans-IO interface

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        return self.client.datagrams_to_send()

    def events(self) -> list[NatDetected]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        return self.client.next_deadline()

    def on_timer(self, now: float) -> None:
        self.client.on_timer(now)
        self._process(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        if self._hairpin_id is not None and transaction_id_of(data) == self._hairpin_id:
            try:
                message = decode(data)
            except DecodeError:
                self.client.dropped_malformed += 1
                return
            if message.message_class is MessageClass.REQUEST:
                self.client.cancel(self._hairpin_id)
                self._pending.pop(self._hairpin_id, None)
                self._hairpin_id = None
                self._hairpinning = True
                self._advance(now)
                return
        self.client.receive_datagram(data, addr, now)
        self._process(now)

    # ---- transitions

    def _query(
        self, server: Address, now: float, *, change_ip: bool = False, change_port: bool = False
    ) -> bytes:
        transaction_id = self.client.query(
            server, now, change_ip=change_ip, change_port=change_port
        )
        self._pending[transaction_id] = server
        if server not in self._contacted:
            self._contacted.append(server)
        return transaction_id

    def _process(self, now: float) -> None:
        for event in self.client.events():
            if isinstance(event, PublicAddressChanged):
                continue
            server = self._pending.pop(event.transaction_id, None)
            if server is None:
                continue
            if event.transaction_id == self._hairpin_id:
                self._hairpin_id = None
                self._hairpinning = isinstance(event, MappedAddress)
            elif self._phase is _Phase.DISCOVER or self._phase is _Phase.MAPPING:
                self._record_mapping(event, now)
            else:
                self._record_filtering(event, now)
        self._advance(now)

    def _record_mapping(
        self, event: MappedAddress | StunTimeout | StunErrorResponse, now: float
    ) -> None:
        if not isinstance(event, MappedAddress):
            if self._phase is _Phase.DISCOVER:
                self._unanswered.append(event.server)
            return
        self._observations.append(MappingObservation(event.server, event.mapped))
        other = event.other_address
        if self._phase is _Phase.DISCOVER:
            if other is not None and other[0] != event.server[0] and other[1] != event.server[1]:
                self._other_address[event.server] = other
            return
        server = self._mapping_server
        if server is None:
            raise LocalProtocolError("mapping result without a mapping server")
        other = self._other_address[server]
        first = next(o.mapped for o in self._observations if o.destination == server)
        if event.server == (other[0], server[1]) and event.mapped != first:
            self._query(other, now)

    def _record_filtering(
        self, event: MappedAddress | StunTimeout | StunErrorResponse, now: float
    ) -> None:
        server = self._filtering_server
        if server is None:
            raise LocalProtocolError("filtering result without a filtering server")
        other = self._other_address[server]
        if self._phase is _Phase.FILTER_CHANGE_IP_AND_PORT:
            if isinstance(event, StunTimeout):
                self._phase = _Phase.FILTER_CHANGE_PORT
                self._query(server, now, change_port=True)
                return
            if isinstance(event, MappedAddress) and event.source == other:
                self._filtering = NatFiltering.ENDPOINT_INDEPENDENT
        elif isinstance(event, StunTimeout):
            self._filtering = NatFiltering.ADDRESS_AND_PORT_DEPENDENT
        elif isinstance(event, MappedAddress) and event.source == (server[0], other[1]):
            self._filtering = NatFiltering.ADDRESS_DEPENDENT
        self._start_mapping_tests(now)

    def _advance(self, now: float) -> None:
        if self._phase is _Phase.DISCOVER and not self._pending:
            self._start_filtering(now)
        if self._phase is _Phase.MAPPING and not self._pending and self._hairpin_id is None:
            self._finish()

    def _start_filtering(self, now: float) -> None:
        if self._observations:
            first = min(self._observations, key=lambda o: self.servers.index(o.destination))
            self._hairpin_id = self._query(first.mapped, now)
        contacted_hosts = {host for host, _ in self._contacted}
        for server in self.servers:
            other = self._other_address.get(server)
            if other is None:
                continue
            if other[0] not in contacted_hosts and (server[0], other[1]) not in self._contacted:
                self._filtering_server = server
                self._phase = _Phase.FILTER_CHANGE_IP_AND_PORT
                self._query(server, now, change_ip=True, change_port=True)
                return
        self._start_mapping_tests(now)

    def _start_mapping_tests(self, now: float) -> None:
        """RFC 5780 §4.3 test II, and test III only if test II saw another mapping.

        Test III goes to the address a filtering answer may already have come from. Linux
        conntrack remembers such a dropped unsolicited datagram and gives the next outbound
        flow to that endpoint another port, so an unneeded test III would make an
        endpoint-independent NAT look port-dependent.
        """
        self._phase = _Phase.MAPPING
        self._mapping_server = self._filtering_server or next(
            (server for server in self.servers if server in self._other_address), None
        )
        if self._mapping_server is not None:
            other = self._other_address[self._mapping_server]
            self._query((other[0], self._mapping_server[1]), now)

    def _finish(self) -> None:
        self._phase = _Phase.DONE
        # Configured servers first, in the order given, then the mapping tests as sent.
        observations = sorted(
            self._observations, key=lambda o: self._contacted.index(o.destination)
        )
        public: list[Endpoint] = []
        for observation in observations:
            endpoint = Endpoint(*observation.mapped)
            if endpoint not in public:
                public.append(endpoint)
        self.report = NatReport(
            nat=NatInfo(
                mapping=classify_mapping(observations, self.local_addresses),
                filtering=self._filtering,
                hairpinning=bool(self._hairpinning),
            ),
            public_endpoints=tuple(public),
            observations=tuple(observations),
            unanswered=tuple(s for s in self.servers if s in self._unanswered),
            filtering_server=self._filtering_server,
            hairpinning_tested=self._hairpinning is not None,
        )
        self._events.append(NatDetected(self.report))
