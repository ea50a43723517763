"""NatProber against scripted STUN servers behind a scripted NAT, with explicit time.

``ScriptedNat`` implements the RFC 4787 behaviours the prober must tell apart (mapping and
filtering: endpoint-independent, address-dependent, address-and-port-dependent; hairpinning on
or off); ``Rfc5780Server`` answers on two addresses × two ports and honours CHANGE-REQUEST.
Every datagram takes ``HOP`` seconds; nothing sleeps.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshguard.sansio import stun
from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.messages import Endpoint, NatFiltering, NatMapping
from meshguard.sansio.natdetect import (
    MappingObservation,
    NatDetected,
    NatProber,
    NatReport,
    classify_mapping,
)
from meshguard.sansio.stun import MessageClass, StunMessage, StunResponder, StunTiming
from meshguard.sansio.types import Address

HOP = 0.01
TIMING = StunTiming(rto=0.1, transmissions=3, last_wait_factor=4)
CLIENT = ("192.168.1.2", 5000)
NAT_IP = "198.51.100.1"
PRIMARY = ("203.0.113.10", 3478)
ALTERNATE = ("203.0.113.11", 3479)
PLAIN_A = ("192.0.2.20", 3478)
PLAIN_B = ("192.0.2.30", 3478)

EI, AD, APD = "endpoint-independent", "address-dependent", "address-and-port-dependent"


def counting_entropy() -> stun.Entropy:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


class Rfc5780Server:
    """A STUN server on {primary, alternate IP} × {primary, alternate port} (RFC 5780 §6)."""

    def __init__(self, primary: Address, alternate: Address) -> None:
        self.primary, self.alternate = primary, alternate

    def addresses(self) -> list[Address]:
        return [
            (ip, port)
            for ip in (self.primary[0], self.alternate[0])
            for port in (self.primary[1], self.alternate[1])
        ]

    def answer(self, data: bytes, source: Address, local: Address) -> tuple[bytes, Address] | None:
        request = stun.decode(data)
        if request.message_class is not MessageClass.REQUEST:
            return None
        ip = local[0]
        if request.change_ip:
            ip = self.alternate[0] if ip == self.primary[0] else self.primary[0]
        port = local[1]
        if request.change_port:
            port = self.alternate[1] if port == self.primary[1] else self.primary[1]
        reply = StunMessage(
            MessageClass.SUCCESS,
            request.transaction_id,
            xor_mapped_address=source,
            mapped_address=source,
            other_address=self.alternate,
            response_origin=(ip, port),
        )
        return stun.encode(reply), (ip, port)


class PlainServer:
    """meshguard's own responder on one address."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.responder = StunResponder()

    def addresses(self) -> list[Address]:
        return [self.address]

    def answer(self, data: bytes, source: Address, local: Address) -> tuple[bytes, Address] | None:
        reply = self.responder.answer(data, source)
        return None if reply is None else (reply, local)


@dataclass
class ScriptedNat:
    """One internal host behind a NAT with the given behaviours; ``None`` mapping is no NAT."""

    mapping: str | None
    filtering: str = APD
    hairpinning: bool = False
    conntrack_clash: bool = False
    ports: dict[tuple[object, ...], int] = field(default_factory=dict)
    claimed: list[tuple[Address, int]] = field(default_factory=list)
    clash_ports: dict[Address, int] = field(default_factory=dict)
    contacted: dict[int, list[Address]] = field(default_factory=dict)
    next_port: int = 40000

    def outbound(self, destination: Address) -> Address:
        """The source the world sees for a datagram from the client to ``destination``."""
        if self.mapping is None:
            return CLIENT
        key: tuple[object, ...] = {EI: (), AD: (destination[0],), APD: destination}[self.mapping]
        if key not in self.ports:
            self.ports[key] = CLIENT[1] if self.mapping == EI else self.next_port
            self.next_port += 1
        port = self.ports[key]
        if (destination, port) in self.claimed:
            # Linux: the tuple is taken by the entry a dropped inbound datagram left behind.
            if destination not in self.clash_ports:
                self.clash_ports[destination] = self.next_port
                self.next_port += 1
            port = self.clash_ports[destination]
        self.contacted.setdefault(port, []).append(destination)
        return NAT_IP, port

    def inbound(self, source: Address, destination: Address) -> bool:
        """Whether a datagram from ``source`` to the public ``destination`` reaches the client."""
        if self.mapping is None:
            return destination == CLIENT
        contacted = self.contacted.get(destination[1], [])
        if destination[0] != NAT_IP or not contacted:
            return False
        if self.filtering == EI:
            allowed = True
        elif self.filtering == AD:
            allowed = any(source[0] == c[0] for c in contacted)
        else:
            allowed = source in contacted
        if not allowed and self.conntrack_clash:
            self.claimed.append((source, destination[1]))
        return allowed


def run(
    nat: ScriptedNat, servers: list[Rfc5780Server | PlainServer], order: list[Address]
) -> tuple[NatReport, float]:
    """Run a prober over ``order`` (the configured servers) to the end; report and duration."""
    by_address = {a: s for s in servers for a in s.addresses()}
    local = [CLIENT]
    prober = NatProber(order, local, counting_entropy(), TIMING, software="test")
    now = 0.0
    queue: list[tuple[float, int, bytes, Address, Address]] = []
    sequence = itertools.count()
    prober.start(now)
    while True:
        for data, destination in prober.datagrams_to_send():
            source = nat.outbound(destination)
            if destination[0] == NAT_IP or destination == CLIENT:
                if nat.mapping is None or nat.hairpinning:
                    heapq.heappush(queue, (now + HOP, next(sequence), data, source, destination))
                continue
            server = by_address.get(destination)
            answer = server.answer(data, source, destination) if server else None
            if answer is not None:
                reply, origin = answer
                heapq.heappush(queue, (now + 2 * HOP, next(sequence), reply, origin, source))
        events = prober.events()
        if events:
            assert events == [NatDetected(prober.report)] and prober.done
            assert prober.report is not None
            return prober.report, now
        deadline = prober.next_deadline()
        if queue and (deadline is None or queue[0][0] <= deadline):
            now, _, data, source, destination = heapq.heappop(queue)
            hairpin = source[0] == NAT_IP
            if hairpin or nat.inbound(source, destination):
                assert prober.matches(data)
                prober.receive_datagram(data, source, now)
        else:
            assert deadline is not None and deadline >= now, "a stalled prober"
            now = deadline
            prober.on_timer(now)


def rfc5780() -> Rfc5780Server:
    return Rfc5780Server(PRIMARY, ALTERNATE)


# ------------------------------------------------------------------ the behaviour matrix


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [
        (EI, NatMapping.ENDPOINT_INDEPENDENT),
        (AD, NatMapping.ADDRESS_DEPENDENT),
        (APD, NatMapping.ADDRESS_AND_PORT_DEPENDENT),
    ],
)
@pytest.mark.parametrize(
    ("filtering", "expected_filtering"),
    [
        (EI, NatFiltering.ENDPOINT_INDEPENDENT),
        (AD, NatFiltering.ADDRESS_DEPENDENT),
        (APD, NatFiltering.ADDRESS_AND_PORT_DEPENDENT),
    ],
)
def test_rfc5780_server_tells_every_mapping_and_filtering_apart(
    mapping: str, expected: NatMapping, filtering: str, expected_filtering: NatFiltering
) -> None:
    report, _ = run(ScriptedNat(mapping, filtering), [rfc5780()], [PRIMARY])
    assert report.nat.mapping is expected
    assert report.nat.filtering is expected_filtering
    assert report.filtering_server == PRIMARY
    assert report.unanswered == ()
    assert report.observations[0] == MappingObservation(PRIMARY, report.observations[0].mapped)
    # Test III (other address and port) only runs when test II saw a new mapping.
    destinations = {PRIMARY, (ALTERNATE[0], PRIMARY[1])}
    if mapping != EI:
        destinations.add(ALTERNATE)
    assert {o.destination for o in report.observations} == destinations


def test_port_preserving_nat_reports_the_public_endpoint_and_is_done_in_two_timeouts() -> None:
    report, duration = run(
        ScriptedNat(EI, APD), [rfc5780(), PlainServer(PLAIN_A)], [PRIMARY, PLAIN_A]
    )
    assert report.public_endpoints == (Endpoint(NAT_IP, CLIENT[1]),)
    assert report.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT
    assert report.nat.filtering is NatFiltering.ADDRESS_AND_PORT_DEPENDENT
    assert not report.nat.hairpinning and report.hairpinning_tested
    # Filtering waits out two timeouts (0.7 s each); everything else is round trips.
    assert 2 * TIMING.give_up_after() < duration < 2 * TIMING.give_up_after() + 0.2


def test_linux_conntrack_clash_does_not_make_an_independent_mapping_look_dependent() -> None:
    # The dropped CHANGE-REQUEST answer from the alternate address and port leaves a conntrack
    # entry behind; a later request to that endpoint would leave the NAT from another port.
    nat = ScriptedNat(EI, APD, conntrack_clash=True)
    report, _ = run(nat, [rfc5780()], [PRIMARY])
    assert set(nat.claimed) == {(ALTERNATE, CLIENT[1]), ((PRIMARY[0], ALTERNATE[1]), CLIENT[1])}
    assert report.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT
    assert report.nat.filtering is NatFiltering.ADDRESS_AND_PORT_DEPENDENT
    assert nat.outbound(ALTERNATE) != (NAT_IP, CLIENT[1])  # the trap the prober stepped around


@pytest.mark.parametrize(
    ("mapping", "expected"),
    [(EI, NatMapping.ENDPOINT_INDEPENDENT), (APD, NatMapping.ADDRESS_AND_PORT_DEPENDENT)],
)
def test_two_plain_responders_give_mapping_but_not_filtering(
    mapping: str, expected: NatMapping
) -> None:
    servers: list[Rfc5780Server | PlainServer] = [PlainServer(PLAIN_A), PlainServer(PLAIN_B)]
    report, _ = run(ScriptedNat(mapping), servers, [PLAIN_A, PLAIN_B])
    assert report.nat.mapping is expected
    assert report.nat.filtering is NatFiltering.UNKNOWN
    assert report.filtering_server is None
    assert len(report.public_endpoints) == (1 if mapping == EI else 2)


def test_address_dependent_mapping_with_plain_responders_is_reported_as_the_stricter_kind() -> None:
    servers: list[Rfc5780Server | PlainServer] = [PlainServer(PLAIN_A), PlainServer(PLAIN_B)]
    report, _ = run(ScriptedNat(AD), servers, [PLAIN_A, PLAIN_B])
    assert report.nat.mapping is NatMapping.ADDRESS_AND_PORT_DEPENDENT


def test_no_nat_is_mapping_none_and_filtering_open() -> None:
    report, _ = run(ScriptedNat(None), [rfc5780()], [PRIMARY])
    assert report.nat.mapping is NatMapping.NONE
    assert report.nat.filtering is NatFiltering.ENDPOINT_INDEPENDENT
    assert report.public_endpoints == (Endpoint(*CLIENT),)


@pytest.mark.parametrize("hairpinning", [True, False])
def test_hairpinning_is_detected_when_the_nat_loops_back(hairpinning: bool) -> None:
    servers: list[Rfc5780Server | PlainServer] = [PlainServer(PLAIN_A), PlainServer(PLAIN_B)]
    report, _ = run(ScriptedNat(EI, hairpinning=hairpinning), servers, [PLAIN_A, PLAIN_B])
    assert report.hairpinning_tested
    assert report.nat.hairpinning is hairpinning


def test_silent_servers_are_listed_and_the_rest_still_decide() -> None:
    report, _ = run(
        ScriptedNat(EI),
        [PlainServer(PLAIN_A), PlainServer(PLAIN_B)],
        [PLAIN_A, ("192.0.2.99", 3478), PLAIN_B],
    )
    assert report.unanswered == (("192.0.2.99", 3478),)
    assert report.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT


def test_nobody_answering_leaves_everything_unknown() -> None:
    report, duration = run(ScriptedNat(EI), [], [PLAIN_A, PLAIN_B])
    assert report.nat.mapping is NatMapping.UNKNOWN
    assert report.nat.filtering is NatFiltering.UNKNOWN
    assert not report.hairpinning_tested
    assert report.public_endpoints == ()
    assert duration == pytest.approx(TIMING.give_up_after())


def test_a_single_plain_responder_cannot_tell_the_mapping() -> None:
    report, _ = run(ScriptedNat(EI), [PlainServer(PLAIN_A)], [PLAIN_A])
    assert report.nat.mapping is NatMapping.UNKNOWN
    assert report.public_endpoints == (Endpoint(NAT_IP, CLIENT[1]),)


def test_filtering_is_not_tested_through_addresses_already_contacted() -> None:
    # Listing the server's alternate address too opens the pinhole its CHANGE-REQUEST answer
    # would come through, so an address-dependent filter would look endpoint-independent.
    servers: list[Rfc5780Server | PlainServer] = [rfc5780()]
    report, _ = run(ScriptedNat(EI, AD), servers, [PRIMARY, (ALTERNATE[0], PRIMARY[1])])
    assert report.filtering_server is None
    assert report.nat.filtering is NatFiltering.UNKNOWN
    assert report.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT


def test_a_responder_that_cannot_change_address_leaves_filtering_unknown() -> None:
    # A server that claims an OTHER-ADDRESS but answers CHANGE-REQUEST with 420.
    class Refusing(Rfc5780Server):
        def answer(
            self, data: bytes, source: Address, local: Address
        ) -> tuple[bytes, Address] | None:
            request = stun.decode(data)
            if request.change_request:
                return StunResponder().answer(data, source), local  # type: ignore[return-value]
            return super().answer(data, source, local)

    report, _ = run(ScriptedNat(EI, EI), [Refusing(PRIMARY, ALTERNATE)], [PRIMARY])
    assert report.filtering_server == PRIMARY
    assert report.nat.filtering is NatFiltering.UNKNOWN
    assert report.nat.mapping is NatMapping.ENDPOINT_INDEPENDENT


# ------------------------------------------------------------------ classification alone


def obs(destination: Address, mapped_port: int, mapped_ip: str = NAT_IP) -> MappingObservation:
    return MappingObservation(destination, (mapped_ip, mapped_port))


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        ([], NatMapping.UNKNOWN),
        ([obs(PLAIN_A, 5000, CLIENT[0])], NatMapping.NONE),
        ([obs(PLAIN_A, 1), obs(PLAIN_B, 1)], NatMapping.ENDPOINT_INDEPENDENT),
        ([obs(PLAIN_A, 1), obs((PLAIN_A[0], 9), 1)], NatMapping.UNKNOWN),
        ([obs(PLAIN_A, 1), obs(PLAIN_B, 2)], NatMapping.ADDRESS_AND_PORT_DEPENDENT),
        (
            [obs(PLAIN_A, 1), obs(PLAIN_B, 2), obs((PLAIN_B[0], 9), 2)],
            NatMapping.ADDRESS_DEPENDENT,
        ),
        (
            [obs(PLAIN_A, 1), obs(PLAIN_B, 2), obs((PLAIN_B[0], 9), 3)],
            NatMapping.ADDRESS_AND_PORT_DEPENDENT,
        ),
        ([obs(PLAIN_A, 1), obs(PLAIN_B, 1, "198.51.100.2")], NatMapping.ADDRESS_AND_PORT_DEPENDENT),
        (
            [obs(PLAIN_A, 1), obs(("2001:db8::20", 3478), 1, "2001:db8::2"), obs(PLAIN_B, 1)],
            NatMapping.ENDPOINT_INDEPENDENT,
        ),
        ([obs(("2001:db8::20", 3478), 5000, "2001:db8::2")], NatMapping.NONE),
    ],
)
def test_classify_mapping(observations: list[MappingObservation], expected: NatMapping) -> None:
    assert classify_mapping(observations, [CLIENT, ("2001:db8::2", 5000)]) is expected


# ------------------------------------------------------------------ misuse and bad bytes


def test_misuse_raises_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        NatProber([], [CLIENT], counting_entropy())
    with pytest.raises(LocalProtocolError):
        NatProber([PLAIN_A, PLAIN_A], [CLIENT], counting_entropy())
    prober = NatProber([PLAIN_A], [CLIENT], counting_entropy())
    prober.start(0.0)
    with pytest.raises(LocalProtocolError):
        prober.start(1.0)


@given(st.binary(max_size=100))
def test_network_bytes_never_raise(data: bytes) -> None:
    prober = NatProber([PLAIN_A, PLAIN_B], [CLIENT], counting_entropy(), TIMING)
    prober.start(0.0)
    assert len(prober.datagrams_to_send()) == 2
    aimed = data[:4] + stun.MAGIC_COOKIE_BYTES + (1).to_bytes(12, "big") + data[20:]
    for candidate in (data, aimed):
        prober.receive_datagram(candidate, PLAIN_A, 0.05)
    assert not prober.done
