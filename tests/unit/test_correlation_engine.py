"""The correlation engine, feature by feature (the property tests compare it with the
reference matcher on random input; these pin down each rule on a small example)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.monitor.correlation.engine import Engine, Limits
from agent.monitor.correlation.event import Record
from agent.monitor.correlation.language import parse
from agent.monitor.correlation.match import Match
from agent.monitor.correlation.partial import (
    TRANSITIONS,
    Input,
    Partial,
    PartialError,
    Phase,
    render_mermaid,
)
from agent.monitor.correlation.reference import reference_matches

REPO = Path(__file__).resolve().parents[2]


class Stream:
    """Events with increasing seq; ``at`` sets the monotonic time."""

    def __init__(self) -> None:
        self.seq = 0
        self.events: list[Record] = []

    def __call__(self, at: float, cell: str | None, what: str, **attrs: Any) -> Record:
        self.seq += 1
        channel, kind = what.split("/")
        e = Record(self.seq, at, 1_700_000_000.0 + at, cell, channel, kind, attrs)
        self.events.append(e)
        return e


def run(text: str, build: Any, limits: Limits | None = None) -> tuple[Engine, list[Match]]:
    """Feed the stream ``build`` makes; check the reference agrees (when nothing is
    evicted) and return the engine and its matches."""
    pats = parse(text)
    s = Stream()
    build(s)
    eng = Engine(pats, limits)
    got = [m for e in s.events for m in eng.feed(e)]
    if not any(p.evicted for p in eng.stats().patterns):
        assert got == reference_matches(pats, s.events)
    return eng, got


def chains(ms: list[Match]) -> list[list[int]]:
    return [[lk.seq for lk in m.chain] for m in ms]


DROP = """
pattern drop
  within 60s
  cells distinct
  step w: exec/file-written
  step x: exec/exec-denied same hash
end
"""


def test_a_key_joins_the_steps() -> None:
    def build(s: Stream) -> None:
        s(0, "a", "exec/file-written", hash="h1", path="/d/x")  # 1
        s(1, "b", "exec/exec-denied", hash="h2", path="/d/y")  # 2: another file
        s(2, "b", "exec/exec-denied", hash="h1", path="/d/x")  # 3: the same file
        s(3, "c", "exec/exec-denied", hash="h1", path="/d/x")  # 4: the partial is done
    eng, ms = run(DROP, build)
    assert chains(ms) == [[1, 3]]
    (m,) = ms
    assert [lk.cell for lk in m.chain] == ["a", "b"] and m.cells == ("a", "b")
    assert m.chain[0].keys == (("hash", "h1"),) and m.chain[1].keys == (("hash", "h1"),)
    assert m.chain[1].ts == 1_700_000_002.0 and m.chain[1].mono == 2
    assert m.pattern == "drop" and m.severity == "alert" and m.response == "record"
    wire = m.attrs()
    assert cbor2.loads(cbor2.dumps(wire)) == wire  # an event attribute map
    assert wire["chain"][1] == {"step": "x", "seq": 3, "mono": 2, "ts": 1_700_000_002.0,
                                "cell": "b", "channel": "exec", "kind": "exec-denied",
                                "keys": {"hash": "h1"}}
    st = eng.stats()
    assert (st.events, st.partials, st.matches) == (4, 0, 1)


def test_cells_distinct_and_same() -> None:
    def build(s: Stream) -> None:
        s(0, "a", "exec/file-written", hash="h")
        s(1, "a", "exec/exec-denied", hash="h")  # the same cell
        s(2, None, "exec/exec-denied", hash="h")  # the host is a cell of its own
    assert chains(run(DROP, build)[1]) == [[1, 3]]
    assert chains(run(DROP.replace("distinct", "same"), build)[1]) == [[1, 2]]


def test_the_span_is_inclusive_and_uses_monotonic_time() -> None:
    def build(s: Stream) -> None:
        s(0, "a", "exec/file-written", hash="h")
        s(60.0, "b", "exec/exec-denied", hash="h")  # exactly the span: in
        s(100, "a", "exec/file-written", hash="g")
        s(160.001, "b", "exec/exec-denied", hash="g")  # just past it: out
    eng, ms = run(DROP, build)
    assert chains(ms) == [[1, 2]] and eng.live == 0  # the second one expired
    assert eng.stats().patterns[0].expired == 1


def test_the_wall_clock_does_not_count() -> None:
    eng = Engine(parse(DROP))
    eng.feed(Record(1, 0.0, 5e9, "a", "exec", "file-written", {"hash": "h"}))
    ms = eng.feed(Record(2, 1.0, 0.0, "b", "exec", "exec-denied", {"hash": "h"}))
    assert len(ms) == 1 and ms[0].chain[1].ts == 0.0


SCAN = """
pattern reach
  within 10m
  step scan: net/scan
  step open: net/listen cell != scan.cell
  step reach: net/flow cell == scan.cell and peer_cell == open.cell and dport == open.port
  until lifecycle/destroyed cell == open.cell
end
"""


def test_until_cancels_only_what_it_names() -> None:
    def build(s: Stream) -> None:
        s(0, "a", "net/scan")  # 1
        s(1, "b", "net/listen", port=4444)  # 2
        s(2, "c", "lifecycle/destroyed")  # 3: another cell: nothing
        s(3, "a", "net/flow", dport=4444, peer_cell="b")  # 4: match
        s(10, "a", "net/scan")  # 5
        s(11, "b", "lifecycle/destroyed")  # 6: open.cell is unbound: not cancelled
        s(12, "b", "net/listen", port=5555)  # 7
        s(13, "b", "lifecycle/destroyed")  # 8: cancels 5-7
        s(14, "a", "net/flow", dport=5555, peer_cell="b")  # 9: nothing
    eng, ms = run(SCAN, build)
    assert chains(ms) == [[1, 2, 4]]
    assert eng.stats().patterns[0].cancelled == 1
    assert ms[0].chain[1].keys == (("port", 4444),)
    assert dict(ms[0].chain[2].keys) == {"dport": 4444, "peer_cell": "b"}


def test_an_until_event_that_would_complete_cancels_instead() -> None:
    text = """
pattern p
  within 1m
  step a: x/start
  step b: x/end
  until x/end k == 1
end
"""
    def build(s: Stream) -> None:
        s(0, "a", "x/start")
        s(1, "a", "x/end", k=1)  # cancels (until first), does not complete
        s(2, "a", "x/start")
        s(3, "a", "x/end", k=2)
    assert chains(run(text, build)[1]) == [[3, 4]]


def test_the_latest_start_is_reported_the_others_are_shadowed() -> None:
    text = """
pattern p
  within 1m
  step a: x/start
  step b: x/end k == a.k
end
"""
    def build(s: Stream) -> None:
        s(0, "a", "x/start", k=1)  # 1
        s(1, "b", "x/start", k=1)  # 2: same keys, a later start: 1 is merged
        s(2, "c", "x/start", k=2, j=5)  # 3
        s(3, "c", "x/end", k=1)  # 4: completes 2
    eng, ms = run(text, build)
    assert chains(ms) == [[2, 4]]
    ps = eng.stats().patterns[0]
    assert (ps.started, ps.merged, ps.matches, ps.partials) == (3, 1, 1, 1)


def test_several_partials_completed_at_once_make_one_match() -> None:
    text = """
pattern p
  within 1m
  step a: x/start
  step b: x/end
  until x/stop k == a.k
end
"""
    def build(s: Stream) -> None:
        s(0, "a", "x/start", k=1)  # the until looks at k: not merged
        s(1, "b", "x/start", k=2)
        s(2, "c", "x/end")
    eng, ms = run(text, build)
    assert chains(ms) == [[2, 3]]
    assert eng.stats().patterns[0].shadowed == 1


COUNT = """
pattern many
  step d: syscall/denied
  count 3 distinct cell within 10s per syscall
end
"""


def test_count_distinct_within_a_window_per_group() -> None:
    def build(s: Stream) -> None:
        s(0, "a", "syscall/denied", syscall="mount")  # 1
        s(1, "a", "syscall/denied", syscall="mount")  # 2: not a new cell
        s(2, "b", "syscall/denied", syscall="ptrace")  # 3: another group
        s(3, "b", "syscall/denied", syscall="mount")  # 4
        s(4, "c", "syscall/denied")  # 5: no syscall: not counted
        s(12, "c", "syscall/denied", syscall="mount")  # 6: a@1 is 11 s old: out
        s(13, "d", "syscall/denied", syscall="mount")  # 7: b@3, c@12, d@13: three
        s(14, "e", "syscall/denied", syscall="mount")  # 8: counting anew
    eng, ms = run(COUNT, build)
    assert chains(ms) == [[7]]
    (lk,) = ms[0].chain
    assert (lk.count, lk.first_mono, lk.values) == (3, 3.0, ("b", "c", "d"))
    assert lk.keys == (("syscall", "mount"),)
    assert eng.live == 1  # mount's new window (e); ptrace's (b@2) emptied: swept at 14


def test_count_window_is_inclusive() -> None:
    text = "pattern n\n  step d: a/b\n  count 2 within 10s\nend\n"

    def build(s: Stream) -> None:
        s(0, "a", "a/b")
        s(10.5, "a", "a/b")  # 10.5 s apart: a window of one
        s(20.5, "a", "a/b")  # exactly 10 s: two
    ms = run(text, build)[1]
    assert chains(ms) == [[3]] and ms[0].chain[0].first_mono == 10.5


def test_count_at_a_later_step_and_then_a_step() -> None:
    text = """
pattern sweep-then-in
  within 1m
  step scan: net/flow-denied
  step more: net/flow-denied cell == scan.cell
  count 3 distinct dport within 10s
  step in: net/flow cell == scan.cell and dport == more.dport
end
"""
    def build(s: Stream) -> None:
        s(0, "a", "net/flow-denied", dport=1)  # 1 scan
        s(1, "b", "net/flow-denied", dport=2)  # 2 another cell
        s(2, "a", "net/flow-denied", dport=2)  # 3
        s(3, "a", "net/flow-denied", dport=3)  # 4
        s(4, "a", "net/flow-denied", dport=4)  # 5: three distinct after the first
        s(5, "a", "net/flow", dport=3)  # 6: not the completing event's port
        s(6, "a", "net/flow", dport=4)  # 7
    ms = run(text, build)[1]
    assert chains(ms)[0] == [1, 5, 7]
    assert ms[0].chain[1].count == 3 and ms[0].chain[1].values == (2, 3, 4)


def test_conditions_need_a_single_present_value() -> None:
    text = """
pattern c
  step a: x/y k != 1 and j not in {2}
end
"""
    def build(s: Stream) -> None:
        s(0, "a", "x/y")  # both missing: false
        s(1, "a", "x/y", k=[1], j=3)  # a list is not a value
        s(2, "a", "x/y", k=True, j=3)  # true is not 1
        s(3, "a", "x/y", k=1.0, j=3)  # 1.0 is 1
        s(4, "a", "x/y", k=None, j=2.0)  # 2.0 is 2
        s(5, "a", "x/y", k=None, j=None)
    assert chains(run(text, build)[1]) == [[3], [6]]


def test_kind_alternatives_and_wildcards() -> None:
    text = """
pattern w
  within 1m
  step a: agent/*
  step b: exec/exec-denied|exec-unverified
end
"""
    def build(s: Stream) -> None:
        s(0, None, "agent/signal", sig=9)
        s(1, "a", "exec/file-written")
        s(2, "a", "exec/exec-unverified")
    assert chains(run(text, build)[1]) == [[1, 3]]


def test_bounds_evict_the_oldest_and_count_it() -> None:
    text = """
pattern p
  within 1h
  step a: x/start
  step b: x/end k == a.k
end
"""
    def build(s: Stream) -> None:
        for i in range(5):
            s(i, "a", "x/start", k=i)  # 1-5: three per cell: a's k=0 and k=1 go
        for i in range(3):
            s(10 + i, "b", "x/start", k=10 + i)  # 6-8: five per pattern: a's k=2 goes
        s(20, "a", "x/end", k=0)  # 9: evicted: no match
        s(21, "a", "x/end", k=4)  # 10
    eng, ms = run(text, build, Limits(per_cell=3, per_pattern=5))
    assert chains(ms) == [[5, 10]]
    ps = eng.stats().patterns[0]
    assert ps.evicted == {"a": 3} and ps.partials == 4
    assert eng.stats().to_wire()["patterns"][0]["evicted"] == {"a": 3}
    assert [(p.cell, p.binds[0].attrs["k"]) for p in eng.partials("p")] == [
        ("a", 3), ("b", 10), ("b", 11), ("b", 12)]


def test_expire_frees_what_is_past_its_span() -> None:
    eng = Engine(parse(DROP + COUNT), sweep_every=1e9)
    s = Stream()
    for e in [s(0, "a", "exec/file-written", hash="h"), s(1, "a", "syscall/denied",
                                                         syscall="mount")]:
        eng.feed(e)
    assert eng.live == 2
    assert eng.expire(11.0) == 0 and eng.live == 2
    assert eng.expire(30.0) == 1  # the count's window (10 s) emptied
    assert eng.expire(62.0) == 1 and eng.live == 0  # the drop's span (60 s) passed
    assert eng.stats().patterns[0].expired == 1


def test_later_start_with_earlier_time_keeps_both() -> None:
    """A merge needs the survivor to start both later and no earlier in time (a count's
    window may begin before another's that completed first)."""
    text = """
pattern p
  within 10s
  step w: x/y
  count 2 within 10s per k
  step z: x/z
end
"""
    def build(s: Stream) -> None:
        s(0, "a", "x/y", k="A")  # 1
        s(5, "a", "x/y", k="B")  # 2
        s(8, "a", "x/y", k="B")  # 3: B completes: starts at 5
        s(9, "a", "x/y", k="A")  # 4: A completes later, but starts at 0
        s(12, "a", "x/z")  # 5: A (started at 0) is too old; B is not
    assert chains(run(text, build)[1]) == [[3, 5]]


def test_swap_keeps_unchanged_patterns_partials() -> None:
    s = Stream()
    eng = Engine(parse(DROP + SCAN))
    eng.feed(s(0, "a", "exec/file-written", hash="h"))
    eng.feed(s(1, "a", "net/scan"))
    changed = SCAN.replace("10m", "20m")
    report = eng.swap(parse(DROP + changed + COUNT))
    assert (report.kept, report.changed, report.added, report.removed, report.retired) == (
        ("drop",), ("reach",), ("many",), (), 1)
    assert [m.pattern for m in eng.feed(s(2, "b", "exec/exec-denied", hash="h"))] == ["drop"]
    report = eng.swap(parse(COUNT))
    assert report.removed == ("drop", "reach") and [p.name for p in eng.patterns] == ["many"]
    for i, c in enumerate("abc"):  # the new pattern sees events at once
        ms = eng.feed(s(3 + i, c, "syscall/denied", syscall="mount"))
    assert [m.pattern for m in ms] == ["many"]
    with pytest.raises(ValueError):
        eng.swap(parse(COUNT) * 2)


# -- the partial match's state machine --------------------------------------------------------

def test_an_illegal_input_is_refused_and_the_phase_kept() -> None:
    p = Partial("x", 1, 2, "a")
    p.to(Input.START)
    assert p.phase is Phase.WAITING
    with pytest.raises(PartialError) as exc:
        p.to(Input.COUNTED)
    assert exc.value.code == "E_STATE" and p.phase is Phase.WAITING
    assert "counted" in exc.value.message and exc.value.hint and "step" in exc.value.hint
    assert p.to(Input.STEP, counting=True) is Phase.COUNTING
    assert p.to(Input.LAST) is Phase.MATCHED
    with pytest.raises(PartialError):
        p.to(Input.SPAN)  # terminal


def test_every_live_phase_can_end() -> None:
    for phase in (Phase.WAITING, Phase.COUNTING):
        for inp in (Input.SPAN, Input.UNTIL, Input.CAP, Input.SWAP, Input.LAST):
            assert (phase, inp) in TRANSITIONS


def test_the_docs_diagram_is_the_table() -> None:
    doc = (REPO / "docs/patterns.md").read_text()
    m = re.search(r"```mermaid\n(stateDiagram-v2\n.*?)```", doc, re.S)
    assert m, "docs/patterns.md has no state diagram"
    assert m.group(1) == render_mermaid(), (
        "docs/patterns.md is stale: paste `python -m agent.monitor.correlation.partial`")
