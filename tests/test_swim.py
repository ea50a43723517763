"""Unit tests of the membership machine with explicit time: small clusters and forged input."""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshguard.identity.keys import Identity, ed25519_public_to_x25519
from meshguard.sansio import codec
from meshguard.sansio.errors import DecodeError, LocalProtocolError
from meshguard.sansio.messages import (
    Ack,
    Alive,
    Dead,
    Endpoint,
    MemberRecord,
    Message,
    NatInfo,
    Ping,
    RecordStatus,
    StateDigest,
    StateEntry,
    StateSync,
    Suspect,
    Update,
)
from meshguard.sansio.swim import (
    JOIN_REPLY_PERIODS,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    Membership,
    MemberState,
    MemberSuspected,
    MemberUntrusted,
    MemberUpdated,
    SwimConfig,
)
from tests.swim_cluster import Cluster, identity

STRANGER = identity("stranger")


def sealed(sender: Identity, receiver: bytes, message: Message) -> bytes:
    key = codec.pair_key(
        sender.x25519_private,
        ed25519_public_to_x25519(receiver),
        sender.public_key,
        receiver,
    )
    return codec.seal(message, codec.key_id(sender.public_key), key, bytes(12))


def opened(receiver: Identity, sender: bytes, datagram: bytes) -> Message:
    key = codec.pair_key(
        receiver.x25519_private,
        ed25519_public_to_x25519(sender),
        receiver.public_key,
        sender,
    )
    return codec.open_datagram(datagram, key)


def record_of(
    who: Identity, incarnation: int, host: str = "10.9.9.9", port: int = 1
) -> MemberRecord:
    return codec.make_record(
        who.public_key, incarnation, RecordStatus.ALIVE, [Endpoint(host, port)], NatInfo(), who.sign
    )


def deliver(cluster: Cluster, sender: int, receiver: int, message: Message) -> None:
    """Deliver ``message`` to ``receiver`` now, sealed by ``sender`` and from its address."""
    datagram = sealed(cluster.identities[sender], cluster.keys[receiver], message)
    cluster.inject(datagram, cluster.addresses[sender], receiver)


def gossip(cluster: Cluster, sender: int, receiver: int, *updates: Update) -> None:
    """Deliver updates to ``receiver`` in an authentic gossip datagram from ``sender``."""
    deliver(cluster, sender, receiver, Ack(0, updates))


def converged_cluster(size: int, config: SwimConfig | None = None, seed: int = 1) -> Cluster:
    cluster = Cluster(size, config=config, seed=seed)
    cluster.start_all()
    cluster.run_until_converged(30)
    for index in range(size):
        cluster.events[index].clear()
    return cluster


def snapshot(node: Membership) -> list[tuple[bytes, MemberState, int, tuple[Endpoint, ...]]]:
    return [(m.public_key, m.state, m.incarnation, m.endpoints) for m in node.members()]


# -- probing -------------------------------------------------------------------------------


def test_probes_are_acked_and_nobody_is_suspected() -> None:
    cluster = converged_cluster(3)
    before = cluster.node(0).counters["ping_sent"]
    cluster.run_for(30)
    counters = cluster.node(0).counters
    assert 25 <= counters["ping_sent"] - before <= 31
    assert counters["ack_received"] >= counters["ping_sent"] - 1
    assert counters["probe_failed"] == 0
    assert all(not cluster.events_of(i, MemberSuspected) for i in range(3))
    assert cluster.node(0).local_health == 0


def test_every_member_is_probed_within_two_rounds() -> None:
    cluster = converged_cluster(8)
    probed: dict[tuple[str, int], None] = {}

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == 0:
            message = opened(
                cluster.identities[cluster.index_of[destination]], cluster.keys[0], datagram
            )
            if isinstance(message, Ping):
                probed[destination] = None

    cluster.taps.append(tap)
    cluster.run_for(2 * 7 * cluster.config.protocol_period)
    assert sorted(probed) == sorted(cluster.addresses[1:])


def test_indirect_probe_reaches_a_member_behind_a_broken_direct_link() -> None:
    cluster = converged_cluster(3)
    cluster.block(0, 1)
    cluster.run_for(60)
    assert cluster.node(0).counters["ping_req_sent"] > 0
    assert cluster.node(2).counters["indirect_ack_sent"] > 0
    assert cluster.node(0).counters["indirect_ack_received"] > 0
    assert cluster.state(0, 1) is MemberState.ALIVE
    assert cluster.state(1, 0) is MemberState.ALIVE
    assert not cluster.events_of(0, MemberSuspected)
    assert not cluster.events_of(1, MemberSuspected)


def test_helpers_nack_when_the_target_does_not_answer() -> None:
    cluster = converged_cluster(4)
    cluster.crash(3)
    cluster.run_for(10)
    nacks_sent = sum(cluster.node(i).counters["nack_sent"] for i in range(3))
    nacks_received = sum(cluster.node(i).counters["nack_received"] for i in range(3))
    assert nacks_sent > 0
    assert nacks_received == nacks_sent
    assert all(cluster.node(i).local_health == 0 for i in range(3))


def test_a_crashed_member_is_suspected_then_declared_dead_after_the_suspicion_timeout() -> None:
    cluster = converged_cluster(3)
    cluster.crash(2)
    cluster.run_for(20)
    shortest, _ = cluster.config.suspicion_timeouts(3)
    for observer in (0, 1):
        assert cluster.state(observer, 2) is MemberState.DEAD
    suspected = {
        i: [t for t, e in cluster.events[i] if isinstance(e, MemberSuspected)] for i in (0, 1)
    }
    died = {i: [t for t, e in cluster.events[i] if isinstance(e, MemberDead)] for i in (0, 1)}
    first = min((0, 1), key=lambda i: suspected[i][0])
    last_chance = 2 * cluster.config.probe_timeout
    assert died[first][0] - suspected[first][0] == pytest.approx(shortest + last_chance)
    assert all(len(died[i]) == 1 for i in (0, 1))


def test_a_suspected_member_refutes_and_is_alive_again() -> None:
    cluster = converged_cluster(3)
    accused = cluster.node(1).incarnation
    gossip(cluster, 2, 0, Suspect(cluster.keys[1], accused, cluster.keys[2]))
    assert cluster.state(0, 1) is MemberState.SUSPECT
    cluster.run_for(5)
    assert cluster.node(1).incarnation == accused + 1
    assert cluster.node(1).counters["refuted"] == 1
    assert cluster.state(0, 1) is MemberState.ALIVE
    kinds = [type(e) for _, e in cluster.events[0] if e.public_key == cluster.keys[1]]
    assert kinds == [MemberSuspected, MemberAlive]
    assert not cluster.events_of(2, MemberDead)


def test_the_next_ping_to_a_suspected_member_tells_it_first() -> None:
    cluster = converged_cluster(3)
    pings: list[Ping] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == 0 and destination == cluster.addresses[1]:
            message = opened(cluster.identities[1], cluster.keys[0], datagram)
            if isinstance(message, Ping):
                pings.append(message)

    cluster.taps.append(tap)
    accusation = Suspect(cluster.keys[1], cluster.node(1).incarnation, cluster.keys[2])
    gossip(cluster, 2, 0, accusation)
    cluster.crash(1)
    cluster.run_for(10)
    assert pings
    assert pings[0].updates[0] == accusation


def test_dead_members_are_told_when_they_speak_so_they_refute() -> None:
    cluster = converged_cluster(3)
    old = cluster.node(1).incarnation
    gossip(cluster, 2, 0, Dead(cluster.keys[1], old, cluster.keys[2]))
    assert cluster.state(0, 1) is MemberState.DEAD
    cluster.run_for(10)
    assert cluster.node(1).incarnation > old
    assert cluster.state(0, 1) is MemberState.ALIVE
    assert cluster.events_of(0, MemberJoined)


# -- Lifeguard -----------------------------------------------------------------------------


def lone_node_knowing(cluster: Cluster, members: range) -> Membership:
    """Node 0 alone, after a state sync from node 1 listing ``members``."""
    cluster.start(0)
    entries = tuple(StateEntry(record_of(cluster.identities[i], 0)) for i in members)
    sync = StateSync(1, 0, 1, False, entries)
    cluster.inject(sealed(cluster.identities[1], cluster.keys[0], sync), ("10.9.9.9", 1), 0)
    node = cluster.node(0)
    assert node.live_count == len(members) + 1
    return node


def time_to_death(confirmers: tuple[int, ...]) -> float:
    """Seconds from a suspicion of node 7 to its death, with these nodes confirming it.

    The probe period is so long that node 0's own probes decide nothing meanwhile; the
    suspicion spans 4 s (shortest) to 24 s (longest) for these 8 members, and the
    last-chance probe that node 7 does not answer adds 2 s (two probe timeouts).
    """
    slow = SwimConfig(protocol_period=100.0, probe_timeout=1.0, suspicion_min_multiplier=0.04)
    cluster = Cluster(8, config=slow)
    lone_node_knowing(cluster, range(1, 8))
    start = cluster.now
    gossip(cluster, 1, 0, Suspect(cluster.keys[7], 0, cluster.keys[1]))
    for confirmer in confirmers:
        gossip(cluster, confirmer, 0, Suspect(cluster.keys[7], 0, cluster.keys[confirmer]))
    cluster.run_for(30)
    deaths = [t for t, e in cluster.events[0] if isinstance(e, MemberDead)]
    assert len(deaths) == 1
    return deaths[0] - start


def test_independent_confirmations_shorten_the_suspicion() -> None:
    shortest, longest = 4.0 + 2.0, 24.0 + 2.0
    alone = time_to_death(())
    one = time_to_death((2,))
    two = time_to_death((2, 3))
    repeated = time_to_death((1, 1, 1))
    assert alone == pytest.approx(longest)
    assert repeated == pytest.approx(longest)
    assert one == pytest.approx(longest - (longest - shortest) * math.log(2) / math.log(3))
    assert two == pytest.approx(shortest)


def slow_pair_with_node_7_refuted() -> Cluster:
    """Node 0 knows nodes 1..7 (at node 7's real address) and suspects node 7 at
    incarnation 0 on node 1's word; node 7 runs at incarnation 1: its refutation missed node 0.
    """
    slow = SwimConfig(protocol_period=100.0, probe_timeout=1.0, suspicion_min_multiplier=0.04)
    cluster = Cluster(8, config=slow)
    cluster.start(0)
    entries = tuple(
        StateEntry(record_of(cluster.identities[i], 0, *cluster.addresses[i])) for i in range(1, 8)
    )
    sync = StateSync(1, 0, 1, False, entries)
    cluster.inject(sealed(cluster.identities[1], cluster.keys[0], sync), ("10.9.9.9", 1), 0)
    cluster.start(7, incarnation=1)
    gossip(cluster, 1, 0, Suspect(cluster.keys[7], 0, cluster.keys[1]))
    assert cluster.state(0, 7) is MemberState.SUSPECT
    return cluster


def test_a_live_member_whose_refutation_was_missed_answers_the_last_chance_probe() -> None:
    cluster = slow_pair_with_node_7_refuted()
    cluster.run_for(30)
    assert cluster.node(0).counters["last_chance_probes"] == 1
    assert not cluster.events_of(0, MemberDead)
    assert cluster.state(0, 7) is MemberState.ALIVE
    assert cluster.node(0).member(cluster.keys[7]).incarnation == 1  # type: ignore[union-attr]


def test_a_member_that_misses_the_last_chance_probe_dies_two_probe_timeouts_later() -> None:
    cluster = slow_pair_with_node_7_refuted()
    start = cluster.now
    cluster.crash(7)
    cluster.run_for(30)
    deaths = [t for t, e in cluster.events[0] if isinstance(e, MemberDead)]
    assert deaths == [pytest.approx(start + 24.0 + 2.0)]


def test_a_stale_death_about_ourselves_gossips_our_record_again() -> None:
    cluster = converged_cluster(3)
    old = cluster.node(1).incarnation
    gossip(cluster, 2, 1, Suspect(cluster.keys[1], old, cluster.keys[2]))
    cluster.run_for(30)
    record = cluster.node(1).members()[0]
    assert record.incarnation == old + 1
    carried: list[Update] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == 1:
            receiver = cluster.index_of[destination]
            message = opened(cluster.identities[receiver], cluster.keys[1], datagram)
            carried.extend(getattr(message, "updates", ()))

    cluster.taps.append(tap)
    gossip(cluster, 2, 1, Dead(cluster.keys[1], old, cluster.keys[2]))
    cluster.run_for(2)
    assert cluster.node(1).incarnation == old + 1
    assert any(
        isinstance(u, Alive) and u.record.public_key == cluster.keys[1] and u.record.incarnation
        == old + 1 for u in carried
    )


def time_to_death_after_syncs(senders: tuple[int, ...]) -> float:
    """Like ``time_to_death``, with node 1's suspicion of node 7 also in these nodes' full
    states: holding a suspicion someone else raised is not an independent confirmation."""
    slow = SwimConfig(protocol_period=100.0, probe_timeout=1.0, suspicion_min_multiplier=0.04)
    cluster = Cluster(8, config=slow)
    lone_node_knowing(cluster, range(1, 8))
    start = cluster.now
    accusation = Suspect(cluster.keys[7], 0, cluster.keys[1])
    gossip(cluster, 1, 0, accusation)
    for sender in senders:
        entry = StateEntry(record_of(cluster.identities[7], 0), accusation)
        sync = StateSync(sender, 0, 1, False, (entry,))
        datagram = sealed(cluster.identities[sender], cluster.keys[0], sync)
        cluster.inject(datagram, ("10.9.9.9", 1), 0)
    cluster.run_for(30)
    deaths = [t for t, e in cluster.events[0] if isinstance(e, MemberDead)]
    assert len(deaths) == 1
    return deaths[0] - start


def test_a_suspicion_in_a_full_state_counts_its_accuser_not_the_sender() -> None:
    assert time_to_death_after_syncs((2, 3)) == pytest.approx(24.0 + 2.0)


def test_a_node_that_misses_acks_and_nacks_stretches_its_own_probe_period() -> None:
    cluster = converged_cluster(4)
    for other in (1, 2, 3):
        cluster.block(0, other, both_ways=False)
    cluster.run_for(30)
    node = cluster.node(0)
    assert node.local_health == cluster.config.awareness_max - 1
    before = node.counters["ping_sent"]
    cluster.run_for(40)
    assert node.counters["ping_sent"] - before <= 6
    cluster.heal()
    cluster.run_for(120)
    assert node.local_health == 0


def test_refuting_raises_local_health() -> None:
    cluster = converged_cluster(3)
    gossip(cluster, 2, 1, Suspect(cluster.keys[1], cluster.node(1).incarnation, cluster.keys[2]))
    assert cluster.node(1).local_health == 1


# -- leaving, joining, reaping -------------------------------------------------------------


def test_graceful_leave_is_seen_as_left_never_as_dead() -> None:
    cluster = converged_cluster(4)
    cluster.node(3).leave(cluster.now)
    cluster._flush(3)
    cluster.run_for(2)
    cluster.crash(3)
    cluster.run_for(60)
    for observer in range(3):
        assert cluster.state(observer, 3) is MemberState.LEFT
        assert [type(e) for _, e in cluster.events[observer]] == [MemberLeft]


def test_a_left_node_can_join_again() -> None:
    cluster = converged_cluster(3)
    cluster.node(2).leave(cluster.now)
    cluster.run_for(5)
    assert cluster.state(0, 2) is MemberState.LEFT
    cluster.join(2, [0])
    cluster.run_until_converged(10)


def test_join_through_a_seed_address_alone() -> None:
    cluster = Cluster(3)
    cluster.start_all(join_via=None)
    cluster.join(1, [0], with_keys=False)
    cluster.join(2, [0], with_keys=False)
    cluster.run_until_converged(20)
    assert cluster.node(0).counters["auth_failed"] == 2


def test_join_with_seed_keys_seals_for_each_seed_only_its_own_key() -> None:
    cluster = Cluster(4)
    cluster.start_all(join_via=None)
    cluster.join(3, [0, 1, 2])
    cluster.run_for(1)
    assert all(cluster.node(i).counters["auth_failed"] == 0 for i in range(3))
    assert cluster.converged([0, 3]) and cluster.converged([1, 3]) and cluster.converged([2, 3])


def test_a_node_whose_join_was_lost_retries_its_seeds() -> None:
    cluster = Cluster(2)
    cluster.start_all(join_via=None)
    cluster.block(1, 0)
    cluster.join(1, [0])
    cluster.run_for(1)
    assert cluster.node(1).live_count == 1
    cluster.heal()
    cluster.run_until_converged(2 * cluster.config.reconnect_interval)
    assert cluster.node(1).counters["seed_attempts"] >= 1


def test_seeds_of_every_join_are_remembered_for_rejoining() -> None:
    cluster = Cluster(3)
    cluster.start(0)
    contacted: dict[tuple[str, int], None] = {}
    cluster.taps.append(lambda sender, destination, data: contacted.setdefault(destination))
    cluster.join(0, [1])
    cluster.join(0, [2])
    contacted.clear()
    cluster.run_for(3 * cluster.config.reconnect_interval)
    assert sorted(contacted) == sorted(cluster.addresses[1:])


def seeds_and_joiner(members: int) -> Cluster:
    """Nodes 0..members-1 converged through node 0; the last node is started, not joined."""
    cluster = Cluster(members + 1)
    for index in range(members):
        cluster.start(index)
    for index in range(1, members):
        cluster.join(index, [0])
    cluster.run_until_converged(60, among=range(members))
    cluster.start(members)
    return cluster


def sync_replies_to(cluster: Cluster, joiner: int) -> list[tuple[int, StateSync]]:
    """(sender, message) of every full-state reply sent to ``joiner`` from now on."""
    replies: list[tuple[int, StateSync]] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if destination == cluster.addresses[joiner]:
            message = opened(cluster.identities[joiner], cluster.keys[sender], datagram)
            if isinstance(message, StateSync) and not message.want_reply:
                replies.append((sender, message))

    cluster.taps.append(tap)
    return replies


def test_only_one_seed_answers_a_join_with_its_full_state() -> None:
    cluster = seeds_and_joiner(3)
    replies = sync_replies_to(cluster, 3)
    cluster.join(3, [0, 1, 2])
    cluster.run_for(1)
    assert len({sender for sender, _ in replies}) == 1
    assert cluster.node(3).live_count == 4
    assert all(cluster.state(seed, 3) is MemberState.ALIVE for seed in range(3))


def test_a_join_whose_seed_does_not_answer_asks_the_next_seed() -> None:
    cluster = seeds_and_joiner(3)
    replies = sync_replies_to(cluster, 3)
    for seed in range(3):
        cluster.block(3, seed, both_ways=False)
    cluster.join(3, [0, 1, 2])
    cluster.heal()
    cluster.run_for(JOIN_REPLY_PERIODS * cluster.config.protocol_period + 0.5)
    assert len({sender for sender, _ in replies}) == 1
    assert cluster.node(3).live_count == 4


def test_a_join_reply_with_a_lost_chunk_is_asked_for_again() -> None:
    cluster = seeds_and_joiner(30)
    dropped: list[int] = []

    def drop_first_chunk(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        cluster.blocked.pop((0, 30), None)
        if sender == 0 and destination == cluster.addresses[30] and not dropped:
            message = opened(cluster.identities[30], cluster.keys[0], datagram)
            if isinstance(message, StateSync) and not message.want_reply:
                assert message.parts > 1
                dropped.append(message.part)
                cluster.blocked[(0, 30)] = None

    cluster.taps.append(drop_first_chunk)
    cluster.join(30, [0])
    cluster.run_for(1)
    assert dropped
    assert cluster.node(30).live_count < 31
    cluster.run_for(JOIN_REPLY_PERIODS * cluster.config.protocol_period)
    assert cluster.node(30).live_count == 31


def test_chunks_of_two_answers_of_the_same_seed_add_up() -> None:
    cluster = seeds_and_joiner(30)
    requests: list[int] = []
    answers: list[int] = []

    def lose_one_chunk_of_each_answer(
        sender: int, destination: tuple[str, int], datagram: bytes
    ) -> None:
        cluster.blocked.pop((0, 30), None)
        if sender == 30 and destination == cluster.addresses[0]:
            message = opened(cluster.identities[0], cluster.keys[30], datagram)
            if isinstance(message, StateSync) and message.want_reply:
                requests.append(message.exchange)
        if sender == 0 and destination == cluster.addresses[30]:
            message = opened(cluster.identities[30], cluster.keys[0], datagram)
            if (
                isinstance(message, StateSync)
                and not message.want_reply
                and message.part == len(answers)
                and message.exchange not in answers
            ):
                answers.append(message.exchange)
                cluster.blocked[(0, 30)] = None

    cluster.taps.append(lose_one_chunk_of_each_answer)
    cluster.join(30, [0])
    cluster.run_for(3 * JOIN_REPLY_PERIODS * cluster.config.protocol_period)
    assert len(answers) == 2
    assert len(set(requests)) == 2
    assert cluster.node(30).live_count == 31


def test_a_joiner_does_not_gossip_the_members_its_seed_told_it_about() -> None:
    cluster = seeds_and_joiner(5)
    gossiped: list[bytes] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == 5:
            receiver = cluster.index_of[destination]
            message = opened(cluster.identities[receiver], cluster.keys[5], datagram)
            for update in getattr(message, "updates", ()):
                if isinstance(update, Alive):
                    gossiped.append(update.record.public_key)

    cluster.taps.append(tap)
    cluster.join(5, [0])
    cluster.run_for(5)
    assert cluster.node(5).live_count == 6
    assert gossiped
    assert set(gossiped) == {cluster.keys[5]}


def test_gossip_to_a_member_that_does_not_know_us_carries_our_record() -> None:
    slow = SwimConfig(protocol_period=100.0, probe_timeout=1.0)
    cluster = Cluster(8, config=slow)
    node = lone_node_knowing(cluster, range(1, 8))
    gossip(cluster, 1, 0, Alive(record_of(cluster.identities[7], 1)))
    carried: list[tuple[Update, ...]] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        for receiver in range(2, 8):
            try:
                message = opened(cluster.identities[receiver], cluster.keys[0], datagram)
            except DecodeError:
                continue
            if isinstance(message, Ack) and message.seq == 0:
                carried.append(message.updates)

    cluster.taps.append(tap)
    cluster.run_for(1)
    assert node.counters["gossip_sent"] > 0
    assert carried
    own = node.members()[0]
    for updates in carried:
        first = updates[0]
        assert isinstance(first, Alive)
        assert first.record.public_key == own.public_key


def test_a_seed_tells_a_joiner_it_answered_about_members_that_joined_since() -> None:
    quiet = SwimConfig(protocol_period=5.0, probe_timeout=1.0, gossip_interval=0)
    cluster = Cluster(5, config=quiet)
    for index in range(3):
        cluster.start(index)
    cluster.join(1, [0])
    cluster.join(2, [0])
    cluster.run_until_converged(60, among=range(3))
    told: list[tuple[float, tuple[Update, ...]]] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == 0 and destination == cluster.addresses[3]:
            message = opened(cluster.identities[3], cluster.keys[0], datagram)
            if isinstance(message, Ack) and message.seq == 0:
                told.append((cluster.now, message.updates))

    cluster.taps.append(tap)
    for index in (3, 4):
        cluster.start(index)
        for other in (1, 2):
            cluster.block(index, other)
    cluster.block(3, 4)
    answered = cluster.now
    cluster.join(3, [0])
    cluster.run_for(0.1)
    cluster.join(4, [0])
    cluster.run_for(JOIN_REPLY_PERIODS * quiet.protocol_period)
    assert cluster.node(0).counters["newcomer_updates_sent"] >= 1
    [(when, updates)] = told
    assert when == pytest.approx(answered + 0.01 + JOIN_REPLY_PERIODS * quiet.protocol_period)
    assert [u.record.public_key for u in updates if isinstance(u, Alive)] == [cluster.keys[4]]
    assert cluster.state(3, 4) is MemberState.ALIVE


def test_a_joiners_first_exchange_is_a_digest_to_its_seed_within_one_push_pull_interval() -> None:
    cluster = seeds_and_joiner(5)
    requests: list[tuple[float, int, StateSync | StateDigest]] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == 5:
            receiver = cluster.index_of[destination]
            message = opened(cluster.identities[receiver], cluster.keys[5], datagram)
            if isinstance(message, StateSync | StateDigest) and message.want_reply:
                requests.append((cluster.now, receiver, message))

    cluster.taps.append(tap)
    joined = cluster.now
    cluster.join(5, [0])
    cluster.run_for(cluster.config.push_pull_interval + 1)
    (_, _, join), (when, seed, pull) = requests
    assert isinstance(join, StateSync) and len(join.entries) == 1
    assert isinstance(pull, StateDigest) and seed == 0
    interval = cluster.config.push_pull_interval
    assert 0.5 * interval <= when - joined <= interval + 0.1


def digest_answers(cluster: Cluster, receiver: int) -> list[Message]:
    """Every state digest or state sync ``receiver`` sends to node 1 from now on."""
    answers: list[Message] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == receiver and destination == cluster.addresses[1]:
            message = opened(cluster.identities[1], cluster.keys[receiver], datagram)
            if isinstance(message, StateDigest | StateSync):
                answers.append(message)

    cluster.taps.append(tap)
    return answers


def test_a_digest_is_answered_with_ours_and_the_members_of_the_buckets_that_differ() -> None:
    cluster = Cluster(30)
    node = lone_node_knowing(cluster, range(1, 30))
    answers = digest_answers(cluster, 0)
    deliver(cluster, 1, 0, StateDigest(7, True, (0,) * 8))
    own, *everything = answers
    assert isinstance(own, StateDigest) and own.exchange == 7 and not own.want_reply
    assert {e.record.public_key for s in everything for e in s.entries} == set(cluster.keys)

    answers.clear()
    cluster.run_for(cluster.config.sync_reply_min_interval)
    bucket = codec.digest_bucket(cluster.keys[5], 8)
    one_differs = tuple(b ^ (i == bucket) for i, b in enumerate(own.buckets))
    deliver(cluster, 1, 0, StateDigest(8, True, one_differs))
    again, sync = answers
    assert again == dataclasses.replace(own, exchange=8)
    assert isinstance(sync, StateSync) and sync.exchange == 8 and not sync.want_reply
    assert {e.record.public_key for e in sync.entries} == {
        key for key in cluster.keys if codec.digest_bucket(key, 8) == bucket
    }
    assert node.counters["state_digest_received"] == 2


def test_our_digest_follows_a_members_state_in_its_bucket_only() -> None:
    cluster = Cluster(30)
    lone_node_knowing(cluster, range(1, 30))
    answers = digest_answers(cluster, 0)
    digests: list[tuple[int, ...]] = []
    for exchange in (7, 8):
        deliver(cluster, 1, 0, StateDigest(exchange, True, (0,) * 8))
        [ours] = [a for a in answers if isinstance(a, StateDigest) and a.exchange == exchange]
        digests.append(ours.buckets)
        gossip(cluster, 2, 0, Suspect(cluster.keys[5], 0, cluster.keys[2]))
        cluster.run_for(cluster.config.sync_reply_min_interval)
    before, after = digests
    changed = [b for b in range(8) if before[b] != after[b]]
    assert changed == [codec.digest_bucket(cluster.keys[5], 8)]


def test_a_digest_answering_no_exchange_of_ours_is_ignored() -> None:
    cluster = Cluster(10)
    node = lone_node_knowing(cluster, range(1, 10))
    answers = digest_answers(cluster, 0)
    deliver(cluster, 1, 0, StateDigest(7, False, (0,) * 4))
    assert answers == []
    assert node.counters["unexpected_digest"] == 1


def test_a_replayed_digest_is_answered_once() -> None:
    cluster = Cluster(10)
    lone_node_knowing(cluster, range(1, 10))
    answers = digest_answers(cluster, 0)
    for _ in range(3):
        deliver(cluster, 1, 0, StateDigest(7, True, (0,) * 4))
        cluster.run_for(2 * cluster.config.sync_reply_min_interval)
    assert len([a for a in answers if isinstance(a, StateDigest)]) == 1


def test_members_that_agree_exchange_two_digests_and_nothing_more() -> None:
    often = SwimConfig(push_pull_interval=2.0)
    cluster = converged_cluster(8, config=often)
    sent: list[type] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        receiver = cluster.index_of[destination]
        message = opened(cluster.identities[receiver], cluster.keys[sender], datagram)
        if isinstance(message, StateDigest | StateSync):
            sent.append(type(message))

    cluster.taps.append(tap)
    cluster.run_for(60)
    assert sent.count(StateDigest) >= 2 * 8 * 60 / 3
    assert sent.count(StateSync) == 0
    assert cluster.converged()


def test_a_follow_up_pull_whose_answer_was_lost_is_asked_again_until_the_views_match() -> None:
    cluster = seeds_and_joiner(5)
    pulls: list[tuple[float, int]] = []
    lost: list[int] = []

    def tap(sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        cluster.blocked.pop((0, 5), None)
        receiver = cluster.index_of[destination]
        if {sender, receiver} != {0, 5}:
            return
        message = opened(cluster.identities[receiver], cluster.keys[sender], datagram)
        if not isinstance(message, StateDigest):
            return
        if sender == 5 and message.want_reply:
            pulls.append((cluster.now, message.exchange))
        elif sender == 0 and pulls and not lost and message.exchange == pulls[0][1]:
            lost.append(message.exchange)
            cluster.blocked[(0, 5)] = None

    cluster.taps.append(tap)
    cluster.join(5, [0])
    cluster.run_for(cluster.config.push_pull_interval + 5 * JOIN_REPLY_PERIODS)
    assert lost
    assert len(pulls) == 2
    assert pulls[1][0] - pulls[0][0] == pytest.approx(
        JOIN_REPLY_PERIODS * cluster.config.protocol_period
    )


class PullingJoiner:
    """Node 0 joined through node 1, which exists only as forged answers: the test plays the
    seed, and ``pulls`` are node 0's follow-up digests to it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.sent: list[tuple[float, Message]] = []
        cluster.start(0)
        cluster.taps.append(self._tap)
        cluster.join(0, [1])
        [(_, join)] = self.sent
        assert isinstance(join, StateSync)
        seed_entry = StateEntry(record_of(cluster.identities[1], 0))
        self.answer(StateSync(join.exchange, 0, 1, False, (seed_entry,)))
        while not self.pulls():
            cluster.run_for(0.05)

    def _tap(self, sender: int, destination: tuple[str, int], datagram: bytes) -> None:
        if sender == 0 and destination == self.cluster.addresses[1]:
            message = opened(self.cluster.identities[1], self.cluster.keys[0], datagram)
            self.sent.append((self.cluster.now, message))

    def answer(self, message: Message) -> None:
        deliver(self.cluster, 1, 0, message)

    def pulls(self) -> list[tuple[float, StateDigest]]:
        return [(t, m) for t, m in self.sent if isinstance(m, StateDigest) and m.want_reply]


def test_a_follow_up_pull_is_asked_again_until_every_chunk_of_an_answer_came() -> None:
    cluster = Cluster(12)
    joiner = PullingJoiner(cluster)
    entries = tuple(StateEntry(record_of(cluster.identities[i], 0)) for i in range(2, 12))
    [(first_at, first)] = joiner.pulls()
    joiner.answer(StateDigest(first.exchange, False, (1,) * len(first.buckets)))
    joiner.answer(StateSync(first.exchange, 0, 2, False, entries[:5]))
    retry = JOIN_REPLY_PERIODS * cluster.config.protocol_period
    cluster.run_for(retry + 0.1)
    [_, (second_at, second)] = joiner.pulls()
    assert second_at - first_at == pytest.approx(retry)
    joiner.answer(StateSync(second.exchange, 0, 2, False, entries[:5]))
    joiner.answer(StateSync(second.exchange, 1, 2, False, entries[5:]))
    cluster.run_for(3 * retry)
    assert len(joiner.pulls()) == 2
    assert all(cluster.node(0).member(cluster.keys[i]) is not None for i in range(2, 12))


def test_a_follow_up_pull_ends_when_the_seed_found_nothing_to_send() -> None:
    cluster = Cluster(12)
    joiner = PullingJoiner(cluster)
    [(_, first)] = joiner.pulls()
    gossip(cluster, 1, 0, Alive(record_of(cluster.identities[2], 0)))
    joiner.answer(StateDigest(first.exchange, False, first.buckets))
    cluster.run_for(3 * JOIN_REPLY_PERIODS * cluster.config.protocol_period)
    assert len(joiner.pulls()) == 1


def test_a_dead_member_we_never_knew_is_not_taken_from_a_periodic_exchange() -> None:
    cluster = Cluster(8)
    node = lone_node_knowing(cluster, range(1, 7))
    accusation = Dead(cluster.keys[7], 0, cluster.keys[1])
    entry = StateEntry(record_of(cluster.identities[7], 0), accusation)
    sync = StateSync(2, 0, 1, False, (entry,))
    cluster.inject(sealed(cluster.identities[1], cluster.keys[0], sync), ("10.9.9.9", 1), 0)
    assert node.member(cluster.keys[7]) is None


def test_seed_keys_must_match_the_seeds() -> None:
    cluster = Cluster(3)
    cluster.start(0)
    node = cluster.node(0)
    with pytest.raises(LocalProtocolError):
        node.join([cluster.addresses[1], cluster.addresses[2]], 0.0, seed_keys=[cluster.keys[1]])
    with pytest.raises(LocalProtocolError):
        node.join([cluster.addresses[1]], 0.0, seed_keys=[STRANGER.public_key])


def test_a_node_restarted_with_the_same_key_supersedes_its_old_records() -> None:
    cluster = converged_cluster(4)
    cluster.node(3).set_advertised_endpoints([Endpoint(*cluster.addresses[3])], cluster.now)
    cluster.run_for(5)
    old = cluster.node(0).member(cluster.keys[3]).incarnation  # type: ignore[union-attr]
    cluster.crash(3)
    cluster.start(3)
    cluster.join(3, [0])
    cluster.run_for(5)
    assert cluster.converged()
    assert cluster.node(3).incarnation > old
    assert cluster.node(0).member(cluster.keys[3]).incarnation > old  # type: ignore[union-attr]


def test_a_new_address_or_nat_reaches_everyone_as_an_update() -> None:
    cluster = converged_cluster(4)
    moved = [Endpoint("10.0.0.4", 51821), Endpoint("fd00::4", 51821)]
    cluster.node(3).set_advertised_endpoints(moved, cluster.now)
    cluster.node(3).set_nat_info(NatInfo(allows_relay=True), cluster.now)
    cluster.run_for(5)
    for observer in range(3):
        view = cluster.node(observer).member(cluster.keys[3])
        assert view is not None
        assert view.endpoints == tuple(moved)
        assert view.nat.allows_relay
        assert cluster.events_of(observer, MemberUpdated)
        assert not cluster.events_of(observer, MemberSuspected)


def test_invalid_own_endpoints_are_refused_and_change_nothing() -> None:
    cluster = converged_cluster(2)
    node = cluster.node(0)
    before = node.incarnation
    with pytest.raises(LocalProtocolError):
        node.set_advertised_endpoints([Endpoint("not an address", 1)], cluster.now)
    assert node.incarnation == before
    assert node.members()[0].endpoints == (Endpoint(*cluster.addresses[0]),)


def test_dead_members_are_reaped_after_the_configured_time() -> None:
    cluster = converged_cluster(3, SwimConfig(dead_reap_after=60.0))
    cluster.crash(2)
    cluster.run_for(20)
    assert cluster.state(0, 2) is MemberState.DEAD
    cluster.run_for(61)
    assert cluster.state(0, 2) is None
    assert len(cluster.node(0).members()) == 2
    assert cluster.events_of(0, MemberReaped) == [MemberReaped(cluster.keys[2])]


def test_a_stale_record_cannot_resurrect_a_dead_member() -> None:
    cluster = converged_cluster(3)
    host, port = cluster.addresses[2]
    genuine = record_of(cluster.identities[2], 0, host, port)
    assert cluster.node(0).member(cluster.keys[2]).endpoints == genuine.endpoints  # type: ignore[union-attr]
    cluster.crash(2)
    cluster.run_for(20)
    assert cluster.state(0, 2) is MemberState.DEAD
    gossip(cluster, 1, 0, Alive(genuine))
    gossip(cluster, 1, 0, Alive(record_of(cluster.identities[2], 0, "10.7.7.7", 7)))
    assert cluster.state(0, 2) is MemberState.DEAD
    assert len(cluster.events_of(0, MemberDead)) == 1
    assert not cluster.events_of(0, MemberJoined)


def test_two_sides_heal_after_declaring_each_other_dead() -> None:
    cluster = converged_cluster(10)
    left, right = range(5), range(5, 10)
    cluster.partition(left, right)
    cluster.run_for(300)
    assert all(cluster.state(a, b) is MemberState.DEAD for a in left for b in right)
    assert all(cluster.state(b, a) is MemberState.DEAD for a in left for b in right)
    cluster.heal()
    took = cluster.run_until_converged(120)
    assert took < 90
    assert sum(cluster.node(i).counters["reconnect_attempts"] for i in range(10)) > 0


def test_two_sides_heal_through_seeds_after_forgetting_each_other() -> None:
    cluster = converged_cluster(10, SwimConfig(dead_reap_after=120.0))
    left, right = range(5), range(5, 10)
    cluster.partition(left, right)
    cluster.run_for(400)
    assert all(cluster.state(a, b) is None for a in left for b in right)
    cluster.heal()
    cluster.run_until_converged(300)
    assert sum(cluster.node(i).counters["seed_attempts"] for i in right) > 0


# -- the datagram budget -------------------------------------------------------------------


def test_every_datagram_fits_1280_bytes_even_with_large_records() -> None:
    endpoints = [Endpoint(f"fd00:{n:x}::{n:x}", 40000 + n) for n in range(15)]
    cluster = Cluster(30, seed=7)
    for index in range(30):
        cluster.start(index)
        node = cluster.node(index)
        own = Endpoint(*cluster.addresses[index])
        node.set_advertised_endpoints([own, *endpoints], cluster.now)
    for index in range(1, 30):
        cluster.join(index, [0])
    cluster.run_until_converged(120)
    cluster.crash(29)
    cluster.run_for(60)
    assert 1000 < cluster.largest_datagram <= codec.MAX_DATAGRAM


# -- trust ---------------------------------------------------------------------------------


def test_a_datagram_from_an_untrusted_key_changes_nothing() -> None:
    cluster = converged_cluster(3)
    node = cluster.node(0)
    before = snapshot(node)
    message = Ack(0, (Alive(record_of(STRANGER, 5)),))
    cluster.inject(sealed(STRANGER, cluster.keys[0], message), ("10.9.9.9", 1), 0)
    assert node.counters["untrusted_sender"] == 1
    assert snapshot(node) == before
    assert cluster.events[0] == []


def test_a_forged_record_changes_nothing() -> None:
    cluster = converged_cluster(3)
    node = cluster.node(0)
    before = snapshot(node)
    genuine = record_of(cluster.identities[2], 9)
    forged = dataclasses.replace(genuine, endpoints=(Endpoint("192.0.2.66", 666),))
    gossip(cluster, 1, 0, Alive(forged))
    assert node.counters["bad_signature"] == 1
    signed_by_other = dataclasses.replace(
        genuine, signature=record_of(cluster.identities[1], 9).signature
    )
    gossip(cluster, 1, 0, Alive(signed_by_other))
    assert node.counters["bad_signature"] == 2
    assert snapshot(node) == before


def test_a_record_about_an_untrusted_key_is_not_admitted() -> None:
    cluster = converged_cluster(3)
    gossip(cluster, 1, 0, Alive(record_of(STRANGER, 0)))
    assert cluster.node(0).counters["untrusted_member"] == 1
    assert cluster.node(0).member(STRANGER.public_key) is None


def test_accusations_by_or_about_untrusted_keys_change_nothing() -> None:
    cluster = converged_cluster(3)
    node = cluster.node(0)
    before = snapshot(node)
    gossip(cluster, 1, 0, Suspect(cluster.keys[2], 5, STRANGER.public_key))
    gossip(cluster, 1, 0, Dead(cluster.keys[2], 5, STRANGER.public_key))
    assert node.counters["forged_claim"] == 2
    gossip(cluster, 1, 0, Dead(STRANGER.public_key, 5, cluster.keys[1]))
    assert node.counters["untrusted_member"] == 1
    assert snapshot(node) == before
    assert cluster.events[0] == []


def test_a_tampered_or_reflected_datagram_is_dropped() -> None:
    cluster = converged_cluster(3)
    node = cluster.node(0)
    before = snapshot(node)
    datagram = bytearray(sealed(cluster.identities[1], cluster.keys[0], Ack(0, ())))
    datagram[-1] ^= 1
    cluster.inject(bytes(datagram), cluster.addresses[1], 0)
    assert node.counters["auth_failed"] == 1
    own = sealed(cluster.identities[0], cluster.keys[1], Ping(1, cluster.keys[0]))
    cluster.inject(own, cluster.addresses[1], 0)
    assert node.counters["from_self"] == 1
    assert snapshot(node) == before


def test_an_ack_from_someone_other_than_the_target_does_not_count() -> None:
    cluster = converged_cluster(3)
    forged: list[bytes] = []

    def answer_in_the_name_of_node_1(
        sender: int, destination: tuple[str, int], data: bytes
    ) -> None:
        if sender == 0 and destination == cluster.addresses[2]:
            message = opened(cluster.identities[2], cluster.keys[0], data)
            if isinstance(message, Ping):
                forged.append(sealed(cluster.identities[1], cluster.keys[0], Ack(message.seq)))

    cluster.taps.append(answer_in_the_name_of_node_1)
    cluster.crash(2)
    while cluster.state(0, 2) is MemberState.ALIVE:
        cluster.run_for(0.05)
        while forged:
            cluster.inject(forged.pop(), cluster.addresses[1], 0)
    assert cluster.node(0).counters["unexpected_ack"] > 0
    assert cluster.state(0, 2) is MemberState.SUSPECT


def test_untrusting_a_member_removes_it_and_trusting_it_again_readmits_it() -> None:
    cluster = converged_cluster(3)
    node = cluster.node(0)
    node.set_trusted_keys(cluster.keys[:2], cluster.now)
    assert node.member(cluster.keys[2]) is None
    assert node.events() == [MemberUntrusted(cluster.keys[2])]
    cluster.run_for(10)
    assert node.member(cluster.keys[2]) is None
    assert node.counters["untrusted_sender"] > 0
    node.set_trusted_keys(cluster.keys, cluster.now)
    cluster.run_until_converged(60)


def test_trusted_keys_must_be_valid_keys() -> None:
    cluster = Cluster(1)
    cluster.start(0)
    with pytest.raises(LocalProtocolError):
        cluster.node(0).set_trusted_keys([b"\x00" * 31], 0.0)


@functools.cache
def fuzz_target() -> Cluster:
    return converged_cluster(2)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=1400))
def test_arbitrary_bytes_are_dropped_cleanly(data: bytes) -> None:
    cluster = fuzz_target()
    node = cluster.node(0)
    before = snapshot(node)
    trusted_header = b"mg\x01\x01\x00\x00\x00\x00" + codec.key_id(cluster.keys[1])
    node.receive_datagram(data, ("192.0.2.1", 9), cluster.now)
    node.receive_datagram(trusted_header + data, ("192.0.2.1", 9), cluster.now)
    assert snapshot(node) == before
    assert node.datagrams_to_send() == []
    assert node.events() == []


# -- determinism ---------------------------------------------------------------------------


def run_trace(seed: int) -> list[tuple[int, tuple[str, int], bytes]]:
    cluster = Cluster(6, seed=seed, loss=0.05)
    trace: list[tuple[int, tuple[str, int], bytes]] = []
    cluster.taps.append(lambda sender, destination, data: trace.append((sender, destination, data)))
    cluster.start_all()
    cluster.run_for(30)
    cluster.crash(5)
    cluster.run_for(30)
    return trace


def test_the_same_seed_gives_the_same_datagrams() -> None:
    assert run_trace(11) == run_trace(11)
    assert run_trace(11) != run_trace(12)


def test_a_node_needs_an_identity() -> None:
    with pytest.raises(LocalProtocolError):
        Membership(
            "not an identity",  # type: ignore[arg-type]
            config=SwimConfig(),
            trusted_keys=[],
            advertised_endpoints=[],
            rng=random.Random(1),
            entropy=random.Random(1).randbytes,
            now=0.0,
        )
