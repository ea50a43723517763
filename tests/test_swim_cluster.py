"""Clusters of 5–20 membership cores on the in-memory network: convergence, detection, loss."""

from __future__ import annotations

from meshguard.sansio.swim import MemberDead, MemberLeft, MemberState, MemberSuspected
from tests.swim_cluster import Cluster


def test_twenty_nodes_joining_at_once_converge_within_a_few_periods() -> None:
    cluster = Cluster(20, seed=21)
    cluster.start_all()
    took = cluster.run_until_converged(60)
    assert took < 10


def test_twenty_nodes_joining_one_by_one_converge() -> None:
    cluster = Cluster(20, seed=22)
    cluster.start_all(spread=1.0)
    took = cluster.run_until_converged(60)
    assert took < 10


def test_steady_state_traffic_is_about_two_datagrams_per_node_per_period() -> None:
    cluster = Cluster(20, seed=23)
    cluster.start_all()
    cluster.run_until_converged(60)
    cluster.run_for(60)
    sent = sum(cluster.sent)
    cluster.run_for(300)
    per_node_per_second = (sum(cluster.sent) - sent) / 20 / 300
    assert 2.0 <= per_node_per_second < 2.6


def test_a_crash_in_twenty_nodes_is_detected_and_spread_to_everyone() -> None:
    cluster = Cluster(20, seed=24)
    cluster.start_all()
    cluster.run_until_converged(60)
    cluster.run_for(10)
    crashed_at = cluster.now
    cluster.crash(7)
    _, longest = cluster.config.suspicion_timeouts(20)
    cluster.run_for(longest + 20)
    survivors = cluster.running()
    assert all(cluster.state(i, 7) is MemberState.DEAD for i in survivors)
    first_suspicion = min(
        t for i in survivors for t, e in cluster.events[i] if isinstance(e, MemberSuspected)
    )
    everyone_knows = max(
        t for i in survivors for t, e in cluster.events[i] if isinstance(e, MemberDead)
    )
    assert first_suspicion - crashed_at < 5
    assert everyone_knows - crashed_at < longest
    assert all(
        not isinstance(e, MemberDead) or e.public_key == cluster.keys[7]
        for i in survivors
        for _, e in cluster.events[i]
    )


def test_five_percent_loss_for_five_minutes_kills_nobody() -> None:
    cluster = Cluster(20, seed=25, loss=0.05)
    cluster.start_all()
    cluster.run_until_converged(60)
    cluster.run_for(300)
    assert all(not cluster.events_of(i, MemberDead) for i in range(20))
    cluster.run_until_converged(30)  # a suspicion caused by loss may be in the middle of refuting


def test_churn_of_leaves_crashes_and_restarts_settles() -> None:
    cluster = Cluster(10, seed=26, loss=0.01)
    cluster.start_all()
    cluster.run_until_converged(60)
    cluster.node(9).leave(cluster.now)
    cluster.run_for(5)
    cluster.crash(9)
    cluster.crash(8)
    cluster.run_for(60)
    assert all(cluster.state(i, 9) is MemberState.LEFT for i in range(8))
    assert all(cluster.state(i, 8) is MemberState.DEAD for i in range(8))
    assert all(not cluster.events_of(i, MemberDead)[1:] for i in range(8))
    assert all(len(cluster.events_of(i, MemberLeft)) == 1 for i in range(8))
    for index in (8, 9):
        cluster.start(index)
        cluster.join(index, [index - 5])
    cluster.run_until_converged(30)
