"""The pure parts of the membership machine: parameters, Lifeguard timers, the gossip queue."""

from __future__ import annotations

import math

import pytest

from meshguard.sansio.codec_wire import ACCUSATION_SIZE
from meshguard.sansio.errors import LocalProtocolError
from meshguard.sansio.messages import Dead, Suspect
from meshguard.sansio.swim_broadcast import MAX_SKIPS, TransmitQueue
from meshguard.sansio.swim_config import SwimConfig
from meshguard.sansio.swim_lifeguard import Awareness, Suspicion, suspicion_timeout


def key(n: int) -> bytes:
    return bytes([n]) * 32


def suspect(n: int, incarnation: int = 0) -> Suspect:
    return Suspect(key(n), incarnation, key(200))


# -- parameters ----------------------------------------------------------------------------


def test_wan_defaults_are_the_documented_ones() -> None:
    config = SwimConfig.wan()
    assert config == SwimConfig()
    assert (config.protocol_period, config.probe_timeout, config.indirect_probes) == (1.0, 0.5, 3)
    assert (config.suspicion_min_multiplier, config.suspicion_max_multiplier) == (4.0, 6.0)
    assert (config.retransmit_multiplier, config.push_pull_interval) == (4, 30.0)
    assert (config.dead_reap_after, config.awareness_max) == (3600.0, 8)


def test_lan_profile_detects_faster() -> None:
    lan, wan = SwimConfig.lan(), SwimConfig.wan()
    assert lan.protocol_period < wan.protocol_period
    assert lan.probe_timeout < wan.probe_timeout
    assert lan.suspicion_timeouts(100)[0] < wan.suspicion_timeouts(100)[0]


def test_retransmit_limit_is_lambda_times_ceil_log10() -> None:
    config = SwimConfig()
    assert [config.retransmit_limit(n) for n in (1, 9, 10, 99, 100, 999, 1000)] == [
        4,
        4,
        8,
        8,
        12,
        12,
        16,
    ]


def test_suspicion_timeouts_scale_with_log10_of_cluster_size() -> None:
    config = SwimConfig()
    assert config.suspicion_timeouts(1) == (4.0, 24.0)
    assert config.suspicion_timeouts(10) == (4.0, 24.0)
    shortest, longest = config.suspicion_timeouts(1000)
    assert shortest == pytest.approx(12.0)
    assert longest == pytest.approx(72.0)


def test_confirmations_are_not_expected_from_a_cluster_too_small_to_give_them() -> None:
    config = SwimConfig()
    assert [config.confirmations_wanted(n) for n in (1, 2, 3, 4, 5, 100)] == [0, 0, 0, 2, 2, 2]


def test_push_pull_stretches_above_32_members() -> None:
    config = SwimConfig()
    assert config.push_pull_period(32) == 30.0
    assert config.push_pull_period(33) == 60.0
    assert config.push_pull_period(64) == 60.0
    assert config.push_pull_period(65) == 90.0
    assert config.push_pull_period(1000) == 180.0


@pytest.mark.parametrize(
    "changes",
    [
        {"protocol_period": 0.0},
        {"probe_timeout": 1.0},
        {"probe_timeout": -1.0},
        {"indirect_probes": -1},
        {"retransmit_multiplier": 0},
        {"awareness_max": 0},
        {"gossip_interval": -0.5},
        {"dead_reap_after": math.inf},
        {"suspicion_max_multiplier": 0.5},
        {"indirect_probes": 2.5},
    ],
)
def test_invalid_parameters_are_refused(changes: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError, match="SwimConfig"):
        SwimConfig(**changes)  # type: ignore[arg-type]


# -- Lifeguard -----------------------------------------------------------------------------


def test_awareness_scales_timeouts_and_stays_in_range() -> None:
    awareness = Awareness(8)
    assert awareness.scale(0.5) == 0.5
    awareness.apply(3)
    assert awareness.scale(0.5) == 2.0
    awareness.apply(100)
    assert awareness.score == 7
    assert awareness.scale(1.0) == 8.0
    awareness.apply(-100)
    assert awareness.score == 0


def test_suspicion_timeout_follows_memberlists_log_curve() -> None:
    assert suspicion_timeout(0, 3, 2.0, 30.0) == 30.0
    expected = 30.0 - 28.0 * math.log(2) / math.log(4)
    assert suspicion_timeout(1, 3, 2.0, 30.0) == pytest.approx(expected)
    assert suspicion_timeout(3, 3, 2.0, 30.0) == pytest.approx(2.0)
    assert suspicion_timeout(5, 3, 2.0, 30.0) == 2.0
    assert suspicion_timeout(0, 0, 2.0, 30.0) == 2.0


def test_suspicion_counts_each_independent_accuser_once() -> None:
    suspicion = Suspicion(key(1), 100.0, 4.0, 24.0, 2)
    assert suspicion.deadline == 124.0
    assert not suspicion.confirm(key(1))
    assert suspicion.confirm(key(2))
    first = suspicion.deadline
    assert 104.0 < first < 124.0
    assert not suspicion.confirm(key(2))
    assert suspicion.confirm(key(3))
    assert suspicion.deadline == pytest.approx(104.0)
    assert not suspicion.confirm(key(4))


# -- the gossip queue ----------------------------------------------------------------------


def test_queue_keeps_one_update_per_member_and_the_newest_wins() -> None:
    queue = TransmitQueue()
    queue.put(key(1), suspect(1, 0), ACCUSATION_SIZE)
    newer = Dead(key(1), 0, key(200))
    queue.put(key(1), newer, ACCUSATION_SIZE)
    assert len(queue) == 1
    assert queue.get(key(1)) == newer
    assert queue.take(1000, 10, ACCUSATION_SIZE) == [newer]


def test_queue_hands_out_least_sent_then_newest_first() -> None:
    queue = TransmitQueue()
    for n in range(3):
        queue.put(key(n), suspect(n), ACCUSATION_SIZE)
    assert queue.take(ACCUSATION_SIZE, 10, ACCUSATION_SIZE) == [suspect(2)]
    assert queue.take(2 * ACCUSATION_SIZE, 10, ACCUSATION_SIZE) == [suspect(1), suspect(0)]
    queue.put(key(3), suspect(3), ACCUSATION_SIZE)
    assert queue.take(ACCUSATION_SIZE, 10, ACCUSATION_SIZE) == [suspect(3)]


def test_queue_take_leaves_the_skipped_members_update_in_place() -> None:
    queue = TransmitQueue()
    for n in range(3):
        queue.put(key(n), suspect(n), ACCUSATION_SIZE)
    assert queue.take(2 * ACCUSATION_SIZE, 10, ACCUSATION_SIZE, key(2)) == [
        suspect(1),
        suspect(0),
    ]
    assert queue.take(ACCUSATION_SIZE, 10, ACCUSATION_SIZE) == [suspect(2)]


def test_queue_drops_an_update_after_the_retransmit_limit() -> None:
    queue = TransmitQueue()
    queue.put(key(1), suspect(1), ACCUSATION_SIZE)
    sent = 0
    while queue.take(1000, 4, ACCUSATION_SIZE):
        sent += 1
    assert sent == 4
    assert len(queue) == 0
    assert key(1) not in queue


def test_queue_never_exceeds_the_room_and_skips_what_does_not_fit() -> None:
    queue = TransmitQueue()
    queue.put(key(1), suspect(1), 100)
    queue.put(key(2), suspect(2), 500)
    queue.put(key(3), suspect(3), 80)
    assert queue.take(190, 10, 73) == [suspect(3), suspect(1)]
    assert queue.take(499, 10, 73) == [suspect(3), suspect(1)]
    assert queue.take(500, 10, 73) == [suspect(2)]


def test_queue_stops_looking_after_a_few_updates_that_do_not_fit() -> None:
    """Filling a datagram costs O(taken + MAX_SKIPS), not a scan of a long queue."""
    queue = TransmitQueue()
    queue.put(key(0), suspect(0), 80)
    for n in range(1, MAX_SKIPS + 2):
        queue.put(key(n), suspect(n), 1000)
    assert queue.take(100, 10, 73) == []
    queue.discard(key(1))
    assert queue.take(100, 10, 73) == [suspect(0)]

