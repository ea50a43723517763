"""Hypothesis drives a 5-node cluster through delivery, loss, duplication, reordering, time,
crashes and restarts, checking the membership invariants after every step:

- a member's incarnation never goes backwards in any node's view (during one lifetime);
- a running member that never lost a datagram is never declared dead;
- once the network heals, every running member knows every other one as alive.
"""

from __future__ import annotations

import heapq

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshguard.sansio.swim import MemberDead
from tests.swim_cluster import Cluster

SIZE = 5
HEAL_TIME = 400.0


class MembershipMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cluster = Cluster(SIZE, seed=5)
        self.cluster.start_all()
        self.cluster.run_until_converged(30)
        self.lives = [0] * SIZE
        self.lossy: dict[int, None] = {}
        self.incarnations: dict[tuple[int, int, bytes], int] = {}
        self.checked_events = [0] * SIZE

    def _pick_in_flight(self, choice: int) -> int | None:
        flight = self.cluster._flight
        return choice % len(flight) if flight else None

    @rule(seconds=st.floats(min_value=0.005, max_value=3.0))
    def advance_time(self, seconds: float) -> None:
        self.cluster.run_for(seconds)

    @rule(choice=st.integers(min_value=0))
    def deliver_now(self, choice: int) -> None:
        """Deliver one datagram in flight at once, ahead of those sent before it."""
        index = self._pick_in_flight(choice)
        if index is None:
            return
        self.cluster._flight[index].arrives = self.cluster.now
        heapq.heapify(self.cluster._flight)
        self.cluster.run_for(0.0)

    @rule(choice=st.integers(min_value=0))
    def drop(self, choice: int) -> None:
        index = self._pick_in_flight(choice)
        if index is None:
            return
        flight = self.cluster._flight
        item = flight.pop(index)
        heapq.heapify(flight)
        self.lossy[self.cluster.index_of[item.source]] = None
        self.lossy[self.cluster.index_of[item.destination]] = None

    @rule(choice=st.integers(min_value=0), lag=st.floats(min_value=0.0, max_value=0.01))
    def duplicate(self, choice: int, lag: float) -> None:
        index = self._pick_in_flight(choice)
        if index is None:
            return
        item = self.cluster._flight[index]
        self.cluster._order += 1
        copy = type(item)(
            item.arrives + lag, self.cluster._order, item.data, item.source, item.destination
        )
        heapq.heappush(self.cluster._flight, copy)

    @rule(choice=st.integers(min_value=0), lag=st.floats(min_value=0.0, max_value=0.01))
    def reorder(self, choice: int, lag: float) -> None:
        """Hold one datagram back a little, so later ones overtake it."""
        index = self._pick_in_flight(choice)
        if index is None:
            return
        self.cluster._flight[index].arrives += lag
        heapq.heapify(self.cluster._flight)

    @rule(node=st.integers(min_value=0, max_value=SIZE - 1))
    def crash(self, node: int) -> None:
        if self.cluster.nodes[node] is not None:
            self.cluster.crash(node)
            self.lossy[node] = None

    @rule(node=st.integers(min_value=0, max_value=SIZE - 1))
    def restart(self, node: int) -> None:
        if self.cluster.nodes[node] is not None:
            return
        seeds = self.cluster.running()
        self.cluster.start(node)
        self.lives[node] += 1
        self.checked_events[node] = len(self.cluster.events[node])
        if seeds:
            self.cluster.join(node, seeds)

    @invariant()
    def incarnations_never_go_backwards(self) -> None:
        for observer in self.cluster.running():
            node = self.cluster.node(observer)
            life = self.lives[observer]
            for view in node.members():
                key = (observer, life, view.public_key)
                previous = self.incarnations.get(key, -1)
                assert view.incarnation >= previous, "an incarnation went backwards"
                self.incarnations[key] = view.incarnation

    @invariant()
    def members_that_lost_nothing_are_never_declared_dead(self) -> None:
        clean = {self.cluster.keys[i] for i in range(SIZE) if i not in self.lossy}
        for observer in range(SIZE):
            events = self.cluster.events[observer]
            for _, event in events[self.checked_events[observer] :]:
                assert not (isinstance(event, MemberDead) and event.public_key in clean), (
                    "a member that lost nothing was declared dead"
                )
            self.checked_events[observer] = len(events)

    def teardown(self) -> None:
        running = self.cluster.running()
        if len(running) > 1:
            self.cluster.heal()
            self.cluster.run_for(HEAL_TIME)
            assert self.cluster.converged(), "the healed cluster did not converge"


MembershipMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None
)
TestMembershipMachine = MembershipMachine.TestCase
