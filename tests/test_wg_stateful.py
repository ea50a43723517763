"""Two devices over a hostile link, driven by Hypothesis: loss, duplication, reordering,
corruption and time jumps never break the invariants, and a healed link always recovers."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from wg_helpers import A_ADDR, A_IP, B_ADDR, B_IP, Pair, ipv4_packet

EXPECTED_DROPS = {
    "replay",
    "decrypt",
    "unknown_index",
    "expired_session",
    "malformed",
    "mac1",
    "handshake_invalid",
    "handshake_replay",
    "handshake_flood",
    "handshake_collision",
    "cookie_invalid",
    "queue_full",
}


class HostileLink(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pair = Pair(seed=4)
        self.now = 0.0
        self.sequence = 0
        self.in_flight: list[tuple[str, bytes]] = []
        self.sent: dict[str, set[bytes]] = {"a": set(), "b": set()}
        self.delivered: dict[str, list[bytes]] = {"a": [], "b": []}

    def _collect(self) -> None:
        for side, device in (("a", self.pair.a), ("b", self.pair.b)):
            self.in_flight += [(side, data) for data, _ in device.datagrams_to_send()]
            self.delivered[side] += device.tun_packets()
            device.events()

    @rule(side=st.sampled_from(["a", "b"]), count=st.integers(1, 4))
    def send(self, side: str, count: int) -> None:
        device, src, dst = (
            (self.pair.a, A_IP, B_IP) if side == "a" else (self.pair.b, B_IP, A_IP)
        )
        packets = []
        for _ in range(count):
            self.sequence += 1
            packets.append(ipv4_packet(src, dst, self.sequence.to_bytes(4, "big")))
        self.sent["b" if side == "a" else "a"].update(packets)
        device.send_packets(packets, self.now)
        self._collect()

    @rule(data=st.data())
    def deliver_some(self, data: st.DataObject) -> None:
        if not self.in_flight:
            return
        picks = data.draw(
            st.lists(st.integers(0, len(self.in_flight) - 1), min_size=1, max_size=6)
        )
        chosen = [self.in_flight[i] for i in picks]  # in any order, maybe twice
        if not data.draw(st.booleans(), label="keep a copy in flight"):
            self.in_flight = [x for i, x in enumerate(self.in_flight) if i not in set(picks)]
        for side, datagram in chosen:
            receiver, source = (self.pair.b, A_ADDR) if side == "a" else (self.pair.a, B_ADDR)
            receiver.receive_datagrams([datagram], source, self.now)
        self._collect()

    @rule(data=st.data())
    def corrupt_one(self, data: st.DataObject) -> None:
        if not self.in_flight:
            return
        side, datagram = self.in_flight[data.draw(st.integers(0, len(self.in_flight) - 1))]
        position = data.draw(st.integers(0, len(datagram) - 1))
        corrupted = bytearray(datagram)
        corrupted[position] ^= data.draw(st.integers(1, 255))
        receiver, source = (self.pair.b, A_ADDR) if side == "a" else (self.pair.a, B_ADDR)
        receiver.receive_datagram(bytes(corrupted), source, self.now)
        self._collect()

    @rule()
    def lose_everything_in_flight(self) -> None:
        self.in_flight = []

    @rule(seconds=st.sampled_from([0.01, 1.0, 5.5, 11.0, 30.0, 130.0, 200.0]))
    def advance(self, seconds: float) -> None:
        target = self.now + seconds
        while True:
            due = [
                d for d in (self.pair.a.next_deadline(), self.pair.b.next_deadline())
                if d is not None and d <= target
            ]
            if not due:
                break
            self.now = max(self.now, min(due))
            self.pair.a.on_timer(self.now)
            self.pair.b.on_timer(self.now)
            self._collect()
        self.now = target

    @invariant()
    def only_sent_packets_arrive_and_at_most_once(self) -> None:
        for side in ("a", "b"):
            delivered = self.delivered[side]
            assert len(delivered) == len(set(delivered)), "a packet arrived twice"
            assert set(delivered) <= self.sent[side], "a packet nobody sent arrived"

    @invariant()
    def drops_are_only_the_expected_kinds(self) -> None:
        for device in (self.pair.a, self.pair.b):
            assert set(device.counters) <= EXPECTED_DROPS, device.counters

    @invariant()
    def deadlines_are_not_in_the_past(self) -> None:
        for device in (self.pair.a, self.pair.b):
            deadline = device.next_deadline()
            assert deadline is None or deadline >= self.now

    def teardown(self) -> None:
        """With the link healed, traffic flows again within a few handshake attempts."""
        self.in_flight = []
        self.pair.deliver(self.now)
        for _ in range(40):
            self.now += 1.0
            probe = ipv4_packet(A_IP, B_IP, b"probe" + self.now.hex().encode())
            self.pair.a.send_packets([probe], self.now)
            self.pair.a.on_timer(self.now)
            self.pair.b.on_timer(self.now)
            self.pair.deliver(self.now)
            if probe in self.pair.b.tun_packets():
                return
        raise AssertionError("the healed link never carried a packet again")


HostileLink.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_hostile_link = HostileLink.TestCase
