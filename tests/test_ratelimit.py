"""chatd.ratelimit: token buckets per key in bounded memory, driven by a hand-moved clock."""

from __future__ import annotations

import pytest

from chatd.ratelimit import KeyedTokenBuckets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_let_through_then_refused_with_the_wait_until_the_next_token() -> None:
    clock = Clock()
    buckets = KeyedTokenBuckets(clock=clock)
    assert [buckets.take("a", rate=2, burst=3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a", rate=2, burst=3) == pytest.approx(0.5)
    clock.now += 0.25
    assert buckets.take("a", rate=2, burst=3) == pytest.approx(0.25)  # refusals spend nothing
    clock.now += 0.25
    assert buckets.take("a", rate=2, burst=3) == 0.0


def test_keys_are_independent() -> None:
    buckets = KeyedTokenBuckets(clock=Clock())
    assert buckets.take("a", rate=1, burst=1) == 0.0
    assert buckets.take("a", rate=1, burst=1) > 0
    assert buckets.take("b", rate=1, burst=1) == 0.0


def test_a_rate_of_zero_disables_the_limit_and_remembers_nothing() -> None:
    buckets = KeyedTokenBuckets(clock=Clock())
    assert all(buckets.take(f"k{i}", rate=0, burst=1) == 0.0 for i in range(1000))
    assert len(buckets) == 0


def test_buckets_that_refilled_are_forgotten() -> None:
    clock = Clock()
    buckets = KeyedTokenBuckets(clock=clock)
    for i in range(1000):
        buckets.take(f"10.0.{i // 256}.{i % 256}", rate=1, burst=20)
    assert len(buckets) == 1000
    clock.now += 0.5  # half of the one token spent is back: not full yet
    buckets.take("x", rate=1, burst=20)
    assert len(buckets) == 1001
    clock.now += 0.6  # full again: they carry no information
    buckets.take("x", rate=1, burst=20)
    assert len(buckets) == 1


def test_memory_is_bounded_by_max_keys_dropping_the_least_recently_used() -> None:
    clock = Clock()
    buckets = KeyedTokenBuckets(max_keys=100, clock=clock)
    buckets.take("old", rate=1, burst=1)
    for i in range(10_000):
        buckets.take(f"k{i}", rate=1, burst=1)
        assert len(buckets) <= 100
    # "old" was evicted: it gets a fresh bucket (the forgiving direction).
    assert buckets.take("old", rate=1, burst=1) == 0.0
    # A recently used key is kept and stays limited.
    assert buckets.take("k9999", rate=1, burst=1) > 0


def test_a_lowered_burst_applies_at_once_and_time_never_runs_backwards() -> None:
    clock = Clock()
    buckets = KeyedTokenBuckets(clock=clock)
    buckets.take("a", rate=1, burst=100)  # 99 tokens saved up
    # A reload lowers the burst to 2: two more handshakes, not 99.
    assert [buckets.take("a", rate=1, burst=2) for _ in range(3)][1:] == [0.0, 1.0]
    clock.now -= 50  # a clock stepping back never mints tokens
    assert buckets.take("a", rate=1, burst=2) > 0


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError):
        KeyedTokenBuckets(max_keys=0)
