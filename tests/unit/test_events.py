from __future__ import annotations

import asyncio
import logging
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import ProtocolError
from agent.core.events import Event
from agent.daemon.bus import EventBus


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def ev(kind: str = "tick", severity: Any = "info", cell: str | None = None,
       channel: str = "tuner", ts: float = 1.0) -> Event:
    return Event(ts, cell, channel, kind, {"n": 1}, severity)


def test_emit_uses_injected_clock() -> None:
    bus = EventBus(clock=FakeClock(50.0))
    a = bus.emit("master", "started", pid=7)
    b = bus.emit("master", "tick")
    assert (a.ts, b.ts) == (51.0, 52.0)
    assert a.attrs == {"pid": 7} and a.severity == "info" and a.cell is None
    assert bus.published == 2 and len(bus) == 2


def test_rings_are_bounded_per_cell_and_recent_filters() -> None:
    bus = EventBus(ring_size=10, cell_ring_size=3, clock=FakeClock())
    for i in range(25):
        bus.emit("tuner" if i % 2 else "reclaim", f"k{i}", cell="tv" if i % 3 == 0 else None,
                 severity="alert" if i == 24 else "info")
    # host ring: the last 10 of 16 host events; tv's ring: the last 3 of its 9
    assert len(bus) == 13 and bus.published == 25
    host = [i for i in range(25) if i % 3][-10:]
    kinds = [e.kind for e in bus.recent()]
    assert kinds == [f"k{i}" for i in sorted([*host, 18, 21, 24])]
    assert [e.seq for e in bus.recent()] == sorted(e.seq for e in bus.recent())
    assert [e.kind for e in bus.recent(3)] == ["k22", "k23", "k24"]
    assert bus.recent(0) == []
    assert all(e.channel == "tuner" for e in bus.recent(channel="tuner"))
    assert [e.kind for e in bus.recent(cell="tv")] == ["k18", "k21", "k24"]
    assert [e.kind for e in bus.recent(kind="k2?")] == ["k20", "k21", "k22", "k23", "k24"]
    assert [e.kind for e in bus.recent(min_severity="notice")] == ["k24"]
    assert [e.kind for e in bus.recent(since=bus.recent(2)[0].ts)] == ["k23", "k24"]


def test_events_are_numbered_and_stamped_per_instance() -> None:
    mono = iter(range(100, 200))
    bus = EventBus(clock=FakeClock(), mono=lambda: float(next(mono)), boot="b1")
    a, b = bus.emit("master", "one"), bus.emit("master", "two", cell="web")
    assert (a.seq, b.seq) == (1, 2) and (a.mono, b.mono) == (100.0, 101.0)
    assert a.boot == b.boot == "b1" and a.to_wire()["seq"] == 1
    assert Event.from_wire(b.to_wire()) == b
    assert EventBus().boot != EventBus().boot


def test_a_noisy_cell_neither_evicts_nor_hides_the_others() -> None:
    """10,000 traps from one cell: its own kind is coalesced into a summary, its other
    kinds and every other cell's events are all kept and delivered."""
    mono = [0.0]
    bus = EventBus(clock=FakeClock(), mono=lambda: mono[0])
    sub = bus.subscribe(maxsize=100)
    raw: list[Event] = []
    bus.add_sink(raw.append, raw=True)
    for i in range(10_000):
        bus.emit("syscall", "trap", cell="noisy", severity="notice", nr=i)
        if i % 1000 == 0:
            bus.emit("lifecycle", "started", cell=f"quiet{i // 1000}")
            bus.emit("syscall", "denied", cell="noisy", syscall="bpf")
    assert len(raw) == bus.published == 10_000 + 20  # the correlation engine sees all
    quiet = [e for e in bus.recent() if e.cell and e.cell.startswith("quiet")]
    assert len(quiet) == 10
    assert len(bus.recent(cell="noisy", kind="denied")) == 10
    traps = bus.recent(cell="noisy", kind="trap")
    assert len(traps) == 20  # the burst
    assert sub.queue.qsize() == 20 + 10 + 10 and sub.dropped == 0
    mono[0] = 1.5  # the window closed: one summary with the count
    bus.emit("master", "tick")
    (summary,) = bus.recent(cell="noisy", kind="suppressed")
    assert summary.channel == "syscall" and summary.attrs["kind"] == "trap"
    assert summary.attrs["count"] == 10_000 - 20
    assert summary.seq > traps[-1].seq  # numbered after what it summarises


def test_a_flood_of_one_sub_kind_never_hides_the_first_of_another() -> None:
    """Coalesced per syscall (or reason): 1,000 trapped ``sethostname`` do not hide the
    first trapped ``mount``, nor 1,000 ``ip4`` drops the first ``ip6`` one."""
    mono = [0.0]
    bus = EventBus(clock=FakeClock(), mono=lambda: mono[0])
    for _ in range(1000):
        bus.emit("syscall", "trap", cell="c", syscall="sethostname")
        bus.emit("net", "l2-drop", cell="c", reason="ip4")
    bus.emit("syscall", "trap", cell="c", syscall="mount")
    bus.emit("net", "l2-drop", cell="c", reason="ip6")
    assert [e.attrs["syscall"] for e in bus.recent(cell="c", kind="trap")][-1] == "mount"
    assert [e.attrs["reason"] for e in bus.recent(cell="c", kind="l2-drop")][-1] == "ip6"
    mono[0] = 1.5
    bus.emit("master", "tick")
    got = {(e.attrs["kind"], e.attrs.get("syscall") or e.attrs.get("reason")): e.attrs["count"]
           for e in bus.recent(cell="c", kind="suppressed")}
    assert got == {("trap", "sethostname"): 980, ("l2-drop", "ip4"): 980}


def test_state_changes_are_never_limited() -> None:
    bus = EventBus(state_change_kinds=["started"])
    for _ in range(100):
        bus.emit("lifecycle", "started", cell="web")
    assert len(bus.recent(cell="web")) == 100


def test_a_queued_sink_is_drained_by_the_loop_and_bounded() -> None:
    async def scenario() -> None:
        bus = EventBus()
        got: list[int] = []
        bus.add_sink(lambda e: got.append(e.seq), all_events=True, queue=50, batch=10,
                     name="slow")
        for i in range(200):
            bus.emit("master", f"k{i}")
        assert got == []  # nothing ran inside publish
        for _ in range(10):
            await asyncio.sleep(0)
        assert got == list(range(151, 201))  # the newest 50: the oldest were dropped
        assert bus.sink_stats() == [
            {"name": "slow", "queued": 0, "dropped": 150, "errors": 0}]

    asyncio.run(scenario())


def test_sinks_get_only_persistent_events_unless_all() -> None:
    bus = EventBus(state_change_kinds=["created"])
    persistent: list[str] = []
    everything: list[str] = []
    bus.add_sink(lambda e: persistent.append(e.kind))
    bus.add_sink(lambda e: everything.append(e.kind), all_events=True)
    bus.publish(ev("tick"))
    bus.publish(ev("warn", "notice"))
    bus.publish(ev("attack", "alert"))
    bus.publish(ev("created"))
    bus.mark_state_change("destroyed")
    bus.publish(ev("destroyed"))
    assert persistent == ["warn", "attack", "created", "destroyed"]
    assert everything == ["tick", "warn", "attack", "created", "destroyed"]


def test_failing_sink_is_logged_and_does_not_break_publish(
        caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(e: Event) -> None:
        raise OSError("disk full")

    bus.add_sink(broken)
    bus.add_sink(lambda e: seen.append(e.kind))
    with caplog.at_level(logging.ERROR, logger="agent.daemon.bus"):
        bus.publish(ev("boom", "alert"))
    assert seen == ["boom"] and bus.sink_errors == 1 and len(bus) == 1
    assert "disk full" in caplog.text
    bus.remove_sink(broken)
    bus.publish(ev("again", "alert"))
    assert bus.sink_errors == 1 and seen == ["boom", "again"]


def test_subscriber_drops_oldest_and_counts() -> None:
    async def scenario() -> None:
        bus = EventBus()
        sub = bus.subscribe(maxsize=3, channel="tuner")
        for i in range(5):
            bus.publish(ev(f"k{i}"))
        bus.publish(ev("other", channel="master"))  # filtered out
        assert sub.dropped == 2
        got = [(await sub.get()).kind for _ in range(3)]
        assert got == ["k2", "k3", "k4"] and sub.queue.empty()
        waiter = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0)
        bus.publish(ev("live"))
        assert (await asyncio.wait_for(waiter, 1)).kind == "live"
        assert bus.subscribers == 1
        sub.close()
        assert bus.subscribers == 0
        bus.publish(ev("after"))
        assert sub.queue.empty()

    asyncio.run(scenario())


@pytest.mark.parametrize("kwargs", [
    {"severity": "critical"}, {"channel": "Bad Channel"}, {"kind": ""}, {"ts": float("nan")},
    {"cell": ""}, {"attrs": {1: 2}},
])
def test_event_validation(kwargs: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"ts": 1.0, "cell": None, "channel": "master", "kind": "x",
                              "attrs": {}, "severity": "info"}
    fields.update(kwargs)
    with pytest.raises(ProtocolError):
        Event(**fields)


@pytest.mark.parametrize("wire", [
    None, [], {"ts": 1.0, "channel": "master"}, {"ts": "x", "channel": "m", "kind": "k"},
    {"ts": 1.0, "channel": "m", "kind": "k", "extra": 1},
    {"ts": 1.0, "channel": "m", "kind": "k", "attrs": 5},
])
def test_from_wire_rejects_malformed(wire: Any) -> None:
    with pytest.raises(ProtocolError):
        Event.from_wire(wire)


names = st.from_regex(r"[a-z][a-z0-9_.-]{0,10}", fullmatch=True)
values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63)
                      | st.text(max_size=10) | st.floats(allow_nan=False),
                      lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                           k, max_size=3),
                      max_leaves=10)


@given(st.floats(0, 2e9), st.none() | names, names, names,
       st.dictionaries(st.text(max_size=8), values, max_size=4),
       st.sampled_from(["info", "notice", "alert"]))
def test_wire_round_trip_through_cbor(ts: float, cell: str | None, channel: str, kind: str,
                                      attrs: dict[str, Any], severity: Any) -> None:
    e = Event(ts, cell, channel, kind, attrs, severity)
    assert Event.from_wire(cbor2.loads(cbor2.dumps(e.to_wire()))) == e
