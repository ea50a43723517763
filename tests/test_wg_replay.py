"""The anti-replay window: at most once per counter, generous reordering, bounded memory."""

from __future__ import annotations

import random

from meshguard.sansio.wireguard.constants import REJECT_AFTER_MESSAGES
from meshguard.sansio.wireguard.replay import WINDOW_SIZE, ReplayWindow


def test_window_is_at_least_2048_counters() -> None:
    assert WINDOW_SIZE >= 2048


def test_in_order_counters_are_accepted_once() -> None:
    window = ReplayWindow()
    assert all(window.accept(counter) for counter in range(5000))
    assert not any(window.accept(counter) for counter in range(5000 - 100, 5000))


def test_out_of_order_within_the_window_is_accepted_and_duplicates_are_not() -> None:
    window = ReplayWindow()
    counters = list(range(3000))
    random.Random(7).shuffle(counters)
    window.accept(3000)
    for counter in counters:
        assert window.accept(counter), counter
    for counter in counters[:200]:
        assert not window.accept(counter)


def test_counter_2048_behind_the_newest_is_still_accepted() -> None:
    window = ReplayWindow()
    window.accept(10_000)
    assert window.accept(10_000 - 2048)
    assert not window.accept(10_000 - 2048)


def test_too_old_counters_are_rejected() -> None:
    window = ReplayWindow()
    window.accept(WINDOW_SIZE + 500)
    assert not window.accept(499)
    assert not window.accept(0)
    assert window.accept(WINDOW_SIZE + 499)


def test_a_big_jump_forgets_everything_behind_it() -> None:
    window = ReplayWindow()
    for counter in range(64 * 130):
        window.accept(counter)
    window.accept(10**9)
    assert not window.accept(64 * 129)
    assert window.accept(10**9 - 1)
    assert window.accept(10**9 - 64 * 100)


def test_jump_by_less_than_the_ring_clears_only_blocks_it_passes() -> None:
    window = ReplayWindow()
    window.accept(100)
    window.accept(100 + 64 * 50)
    assert not window.accept(100)
    assert window.accept(101)


def test_counters_at_or_beyond_reject_after_messages_are_refused() -> None:
    window = ReplayWindow()
    assert not window.accept(REJECT_AFTER_MESSAGES)
    assert not window.accept(REJECT_AFTER_MESSAGES + 5)
    assert window.accept(REJECT_AFTER_MESSAGES - 1)


def test_matches_a_reference_set_model() -> None:
    rng = random.Random(3)
    window = ReplayWindow()
    seen: set[int] = set()
    highest = 0
    for _ in range(20_000):
        counter = max(0, highest + rng.randint(-9000, 300))
        expected = counter not in seen and highest - counter <= WINDOW_SIZE
        assert window.accept(counter) == expected, counter
        if expected:
            seen.add(counter)
            highest = max(highest, counter)
