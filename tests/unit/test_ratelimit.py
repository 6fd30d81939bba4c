"""agent.core.ratelimit: the token bucket behind back-pressure and the per-key coalescer
of events (a noisy cell cannot evict the events of others)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.core.ratelimit import Coalescer, TokenBucket


def test_bucket_starts_full_and_asks_to_wait_once_overdrawn() -> None:
    b = TokenBucket(rate=100.0, burst=10.0)
    assert all(b.take(0.0) == 0.0 for _ in range(10))
    assert b.take(0.0) == 0.01  # one token short at 100/s
    assert b.wait(0.0) == 0.01 and b.wait(0.01) == 0.0
    assert b.take(0.0, 1000) > 0  # a big read overdraws: what was done is done


@given(st.lists(st.tuples(st.floats(0, 0.5), st.floats(0.5, 5000)), min_size=1, max_size=200))
def test_bucket_never_lets_more_than_burst_plus_rate_times_time(
        steps: list[tuple[float, float]]) -> None:
    """A caller that waits as told takes at most burst + rate * elapsed (plus the last
    overdraft, which it has already spent)."""
    b = TokenBucket(rate=1000.0, burst=2000.0)
    now, taken, last = 0.0, 0.0, 0.0
    for gap, amount in steps:
        now += gap
        now += b.wait(now)
        taken += amount
        last = amount
        b.take(now, amount)
    assert taken <= 2000.0 + 1000.0 * now + last + 1e-6


def test_coalescer_passes_a_burst_then_counts_and_summarises() -> None:
    c = Coalescer(rate=10.0, burst=5.0, window=1.0)
    key = ("web", "syscall", "trap")
    passed = sum(c.admit(key, 0.0) for _ in range(2000))
    assert passed == 5 and c.pending() == 1995 and c.next_due() == 1.0
    assert c.due(0.5) == []
    (s,) = c.due(1.0)
    assert (s.key, s.count, s.first, s.last) == (key, 1995, 0.0, 0.0)
    assert c.pending() == 0 and c.next_due() is None
    assert c.admit(key, 1.0)  # refilled: 10 tokens in the second


def test_one_noisy_key_does_not_limit_another() -> None:
    c = Coalescer(rate=1.0, burst=2.0)
    for _ in range(10_000):
        c.admit(("noisy", "syscall", "trap"), 0.0)
    assert c.admit(("quiet", "lifecycle", "started"), 0.0)
    assert c.admit(("noisy", "syscall", "exec-denied"), 0.0)


def test_key_table_is_bounded_and_an_evicted_key_keeps_its_count() -> None:
    c = Coalescer(rate=1.0, burst=1.0, max_keys=3)
    for _ in range(4):
        c.admit("a", 0.0)
    for k in "bcd":
        c.admit(k, 0.0)
    assert len(c._keys) == 3 and c.next_due() == 0.0
    (s,) = c.due(0.0)
    assert s.key == "a" and s.count == 3


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 0.3)), max_size=300))
def test_nothing_is_lost(events: list[tuple[str, float]]) -> None:
    """Every event is passed or counted in exactly one summary."""
    c = Coalescer(rate=5.0, burst=3.0, window=0.5)
    now, passed, summarised = 0.0, 0, 0
    for key, gap in events:
        now += gap
        summarised += sum(s.count for s in c.due(now))
        passed += c.admit(key, now)
    summarised += sum(s.count for s in c.due(now + 10))
    assert passed + summarised == len(events)
    assert c.suppressed_total == summarised
