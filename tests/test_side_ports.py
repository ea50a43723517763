"""Side ports: a STUN request sent from a new ephemeral port, on real loopback sockets.

A real STUN client asks a real STUN responder; each request must leave from its own new
port (that is what makes the NAT allocate a fresh mapping), its answer must reach the core,
and the port must close after its lifetime.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator

import pytest

from meshguard.drivers.side_ports import SIDE_PORT_LIFETIME, SidePorts
from meshguard.sansio import stun
from meshguard.sansio.types import Address


class StunAsker:
    """The side-port half of a core: queries queued by a StunClient, answers fed back."""

    def __init__(self, server: Address) -> None:
        self.client = stun.StunClient(lambda n: bytes(range(n)))
        self.server = server
        self.mapped: list[Address] = []

    def ask(self, now: float) -> None:
        self.client.query(self.server, now)

    def side_datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        return self.client.datagrams_to_send()

    def receive_side_datagram(self, data: bytes, addr: Address, now: float) -> None:
        self.client.receive_datagram(data, addr, now)
        self.mapped += [e.mapped for e in self.client.events() if isinstance(e, stun.MappedAddress)]


class Readers:
    """The event loop's reader table, polled for real."""

    def __init__(self) -> None:
        self.callbacks: dict[int, Callable[[], None]] = {}

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.callbacks[fd] = callback

    def remove_reader(self, fd: int) -> None:
        del self.callbacks[fd]

    def poll(self, timeout: float) -> None:
        ready, _, _ = select.select(list(self.callbacks), [], [], timeout)
        for fd in ready:
            self.callbacks[fd]()


@pytest.fixture
def responder() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def _answer(responder: socket.socket) -> Address:
    data, source = responder.recvfrom(2048)
    answer = stun.StunResponder().answer(data, source)
    assert answer is not None
    responder.sendto(answer, source)
    return (source[0], source[1])


def test_each_request_leaves_from_a_new_port_and_its_answer_reaches_the_core(
    responder: socket.socket,
) -> None:
    server = responder.getsockname()
    core, readers, now = StunAsker(server), Readers(), [100.0]
    side = SidePorts(core, readers, lambda: now[0])

    sources = []
    for _ in range(2):
        core.ask(now[0])
        side.flush()
        assert len(readers.callbacks) == len(sources) + 1
        sources.append(_answer(responder))
        readers.poll(2.0)
    assert sources[0][1] != sources[1][1]
    assert server[1] not in {port for _, port in sources}
    assert core.mapped == sources

    now[0] += SIDE_PORT_LIFETIME
    side.flush()
    assert readers.callbacks == {} and len(side) == 0


def test_an_unsendable_datagram_is_counted_and_opens_nothing() -> None:
    core, readers = StunAsker(("127.0.0.1", 3478)), Readers()
    side = SidePorts(core, readers, lambda: 0.0)
    side.send([(b"x" * 70000, ("127.0.0.1", 3478))], 0.0)
    assert side.send_errors == 1 and len(side) == 0 and readers.callbacks == {}
