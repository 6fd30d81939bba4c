"""agent.daemon.gcstats: collections counted by generation, with their time; a freeze
takes what is alive out of the collector's passes."""

from __future__ import annotations

import gc

from agent.daemon.gcstats import GcPauses, freeze_now


def test_collections_are_counted_and_timed_by_generation() -> None:
    ticks = iter([1.0, 1.5, 2.0, 2.25])
    p = GcPauses(clock=lambda: next(ticks))
    p("start", {"generation": 2})
    p("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    p("start", {"generation": 0})
    p("stop", {"generation": 0, "collected": 3, "uncollectable": 0})
    s = p.status()
    assert s["collections"] == [1, 0, 1]
    assert s["total_ms"] == [250.0, 0.0, 500.0] and s["longest_ms"] == [250.0, 0.0, 500.0]


def test_real_collections_reach_the_callback_and_a_freeze_shows() -> None:
    p = GcPauses()
    p.install()
    p.install()  # once only
    try:
        assert gc.callbacks.count(p) == 1
        gc.collect()
        assert p.status()["collections"][2] >= 1 and p.status()["total_ms"][2] >= 0.0
        before = gc.get_freeze_count()
        kept = [[i] for i in range(1000)]
        freeze_now()
        assert gc.get_freeze_count() >= before + len(kept)
        assert p.status()["frozen"] == gc.get_freeze_count()
    finally:
        p.remove()
        gc.unfreeze()
    assert p not in gc.callbacks
