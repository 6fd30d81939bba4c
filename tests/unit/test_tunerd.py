"""The tuner service against a fake cgroupfs (plain files in tmp_path).

What it shows: which files the tuner writes, in which order, what the budget holds, which
events and journal records come out, and that lifecycle events start and stop tuning.
The kernel side (PSI triggers, memory.events notifications, limits biting) is shown in the
box: tests/guest/test_tuner_box.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.budget import Amount, Budget, Ledger, Request
from agent.core.cell import State
from agent.core.manifest import Manifest, manifest_from_dict
from agent.core.tuner import PinRefused, initial_size
from agent.core.tunerstate import Bounds, MemoryEvents, PressureTriggered, TunerConfig
from agent.daemon.bus import EventBus
from agent.daemon.cells import Rung
from agent.daemon.tuner import Tuner
from agent.daemon.tunerapi import top_row, tuned_row
from agent.kernel.cgroupv2 import CgroupV2

MiB = 1 << 20
LEAF = {
    "cgroup.procs": "", "cgroup.events": "populated 1\nfrozen 0\n", "cgroup.freeze": "0\n",
    "cpu.max": "500000 100000\n", "cpu.weight": "10\n", "cpu.stat": "usage_usec 1000\n",
    "memory.high": "67108864\n", "memory.max": "67108864\n", "memory.current": "2097152\n",
    "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    "cpu.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n",
    "pids.current": "1\n",
}


def manifest(name: str, cpu: tuple[str, str] = ("100m", "500m"),
             mem: tuple[str, str] = ("8M", "64M"), priority: str = "normal") -> Manifest:
    return manifest_from_dict({
        "name": name, "service": {"command": "/bin/sh"}, "image": {"root": "/img"},
        "resources": {"cpu_min": cpu[0], "cpu_max": cpu[1], "memory_min": mem[0],
                      "memory_max": mem[1], "pids_max": 16, "priority": priority}})


@dataclass
class Entry:
    manifest: Manifest
    state: State = State.RUNNING
    pid: int | None = 42
    pin: dict[str, int] | None = None
    cpu_sample: tuple[int, float] | None = None
    tuned: Any = None  # the tuner's part (agent.daemon.cells.CellEntry)
    rung: Rung = field(default_factory=Rung)  # the reclaim loop's part


class Journal:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def append(self, t: str, data: Mapping[str, Any] | None = None, *, sync: bool) -> None:
        self.records.append((t, dict(data or {})))


@dataclass
class Host:
    """The cell manager as the tuner and the reclaim loop see it (CellsHost)."""

    initial: InitVar[Budget]
    bus: EventBus = field(default_factory=EventBus)
    cells: dict[str, Entry] = field(default_factory=dict)
    journal: Journal = field(default_factory=Journal)
    posted: list[tuple[str, Any]] = field(default_factory=list)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def __post_init__(self, initial: Budget) -> None:
        self.ledger = Ledger(initial)

    @property
    def budget(self) -> Budget:
        return self.ledger.budget

    def post(self, e: Entry, ev: Any) -> None:
        self.posted.append((e.manifest.name, ev))

    def keep_pin(self, cell: str, pin: Mapping[str, int] | None) -> None:
        self.cells[cell].pin = None if pin is None else dict(pin)

    def cell_lock(self, cell: str) -> asyncio.Lock:
        return self.locks.setdefault(cell, asyncio.Lock())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cell(root: Path, host: Host, m: Manifest) -> Path:
    leaf = root / m.name
    leaf.mkdir()
    for name, text in LEAF.items():
        (leaf / name).write_text(text)
    host.cells[m.name] = Entry(m)
    host.ledger.admit(Request.from_manifest(m))
    return leaf


def read(leaf: Path, name: str) -> str:
    return (leaf / name).read_text().strip()


@pytest.fixture
def env(tmp_path: Path) -> Any:
    loop = asyncio.new_event_loop()
    root = tmp_path / "agent"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    host = Host(Budget.new(Amount(2000, 256 * MiB, 1000), Amount()))
    clock = Clock()
    # Most tests follow a cell from its lower bounds up ("low"); the default start at
    # the maximum has its own test below.
    cfg = TunerConfig(idle_samples=2, watch_s=10.0, cooldown_s=30.0, start="low")
    tuner = Tuner(host, CgroupV2(root), loop, config=cfg, sample_s=5.0, clock=clock,
                  triggers=False)
    yield root, host, tuner, clock
    tuner.close()
    loop.close()


def tuner_events(host: Host, kind: str | None = None) -> list[Any]:
    return [e for e in host.bus.recent(None, channel="tuner") if kind in (None, e.kind)]


def test_start_brings_the_cell_to_its_lower_bounds_and_holds_that(env: Any) -> None:
    root, host, tuner, _ = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()  # reconciles: the cell is RUNNING
    assert "a" in tuner.cells
    # 2 MiB in use: the 8 MiB minimum; high = max - 1/8 (below the minimum: room above it,
    # so the kernel warns with `high` events before the hard limit bites)
    assert read(leaf, "memory.max") == str(8 * MiB)
    assert read(leaf, "memory.high") == str(7 * MiB)
    assert read(leaf, "cpu.max") == "10000 100000"
    assert host.budget.get("a") == Amount(100, 8 * MiB, 16)
    assert [e.kind for e in tuner_events(host)] == ["start"]
    assert host.journal.records[0][0] == "tuner"
    # a fake tree has no memory.events notification (epoll refuses a regular file)
    assert tuner.cells["a"].sources == []


def test_lifecycle_events_start_and_stop_tuning(env: Any) -> None:
    root, host, tuner, _ = env
    make_cell(root, host, manifest("a"))
    host.cells["a"].state = State.CREATING
    tuner.attach()
    assert tuner.cells == {}
    host.cells["a"].state = State.RUNNING
    host.bus.emit("lifecycle", "running", cell="a")
    assert "a" in tuner.cells
    host.cells["a"].state = State.STOPPING
    host.bus.emit("lifecycle", "stopping", cell="a")
    assert tuner.cells == {}
    assert [e.kind for e in tuner_events(host)] == ["start", "stop"]


def test_pressure_raises_max_before_high_and_commits_budget(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    written: list[str] = []
    orig = tuner.knobs.write

    def spy(path: Path, value: str) -> None:
        written.append(path.name)
        orig(path, value)

    tuner.knobs.write = spy
    actions = tuner.observe("a", PressureTriggered("memory", clock.now))
    # span 56 MiB: step max(14 MiB, 4 MiB) -> 22 MiB
    assert read(leaf, "memory.max") == str(22 * MiB)
    assert int(read(leaf, "memory.high")) == 22 * MiB - 22 * MiB // 8
    assert written == ["memory.max", "memory.high"]
    assert host.budget.get("a") == Amount(100, 22 * MiB, 16)
    assert [type(a).__name__ for a in actions] == ["Commit", "SetMemoryMax", "SetMemoryHigh"]
    kinds = [e.kind for e in tuner_events(host)]
    assert kinds == ["start", "commit", "resize", "resize"]
    assert [r[1]["kind"] for r in host.journal.records] == kinds
    tuner.observe("a", PressureTriggered("cpu", clock.now))
    assert read(leaf, "cpu.max") == "20000 100000"  # 10m -> +max(122m/4, 5m)... capped


def test_a_raise_the_budget_cannot_afford_is_refused_and_recorded(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    host.ledger.admit(Request("hog", host.budget.free))  # nothing left
    tuner.observe("a", PressureTriggered("memory", clock.now))
    assert read(leaf, "memory.max") == str(8 * MiB)
    (refusal,) = tuner_events(host, "refused")
    assert refusal.severity == "notice" and refusal.attrs["wanted"] == 22 * MiB
    assert host.budget.get("a") == Amount(100, 8 * MiB, 16)


def test_memory_events_text_raises_on_a_new_max_event(env: Any) -> None:
    root, host, tuner, _ = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    tuner._on_events_text("a", "low 0\nhigh 0\nmax 3\noom 0\noom_kill 0\n")
    assert int(read(leaf, "memory.max")) > 8 * MiB
    assert tuner_events(host, "resize")[0].attrs["reason"] == "events:max"


def test_idle_cell_is_lowered_in_two_phases_by_samples(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    while int(read(leaf, "memory.max")) < 64 * MiB:
        assert tuner.observe("a", PressureTriggered("memory", clock.now))
    raised = int(read(leaf, "memory.max"))
    assert raised == 64 * MiB and host.budget.get("a").memory == 64 * MiB
    steps: list[tuple[int, int]] = []
    for _ in range(8):
        clock.now += 5
        (leaf / "cpu.stat").write_text(f"usage_usec {int(clock.now * 10)}\n")
        tuner.sample_all()
        steps.append((int(read(leaf, "memory.high")), int(read(leaf, "memory.max"))))
    assert steps[0] == (56 * MiB, 64 * MiB)  # one idle sample: nothing yet
    high_first = next(i for i, (h, _) in enumerate(steps) if h < 56 * MiB)
    max_after = next(i for i, (_, m) in enumerate(steps) if m < 64 * MiB)
    assert max_after > high_first  # memory.high first, memory.max at a later sample
    assert all(h <= m for h, m in steps)
    assert steps[-1][1] >= 2 * MiB + 4 * MiB  # never below use + headroom
    # admission still holds the raised amount: the reclaim loop returns it once settled
    assert host.budget.get("a").memory == 64 * MiB


def test_pin_fixes_the_size_and_unpin_releases_it(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    size = tuner.pin("a", cpu=250, memory=32 * MiB)
    assert (read(leaf, "cpu.max"), read(leaf, "memory.max")) == ("25000 100000", str(32 * MiB))
    assert size.memory_high == 28 * MiB and host.budget.get("a") == Amount(250, 32 * MiB, 16)
    assert tuner.observe("a", PressureTriggered("memory", clock.now)) == []
    with pytest.raises(PinRefused):
        tuner.pin("a", memory=1 << 40)
    tuner.unpin("a")
    assert tuner.observe("a", PressureTriggered("memory", clock.now)) != []
    assert [e.kind for e in tuner_events(host)][-1] in ("resize", "commit")


def test_escalated_cell_gets_no_tuner_change(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    host.cells["a"].rung.level = "throttled"
    assert tuner.observe("a", PressureTriggered("memory", clock.now)) == []
    assert read(leaf, "memory.max") == str(8 * MiB)


def test_failed_write_is_an_event_and_tuning_restarts(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    (leaf / "memory.max").unlink()
    tuner.observe("a", PressureTriggered("memory", clock.now))
    assert tuner_events(host, "error")
    assert "a" not in tuner.cells  # restart failed too: the file is missing


def test_sample_timer_runs_only_while_cells_are_tuned(env: Any) -> None:
    root, host, tuner, _ = env
    make_cell(root, host, manifest("a"))
    tuner.sample_s = 0.01

    async def main() -> None:
        tuner.attach()
        await asyncio.sleep(0.1)
        assert tuner.samples >= 3
        tuner.stop("a")
        assert tuner._timer is None
        n = tuner.samples
        await asyncio.sleep(0.05)
        assert tuner.samples == n

    tuner.loop.run_until_complete(main())


def test_adopted_cell_keeps_room_for_its_use(env: Any) -> None:
    root, host, tuner, _ = env
    leaf = make_cell(root, host, manifest("a"))
    (leaf / "memory.current").write_text(f"{40 * MiB}\n")
    tuner.attach()
    assert int(read(leaf, "memory.max")) == 50 * MiB
    assert int(read(leaf, "memory.high")) >= 40 * MiB


@given(lo=st.integers(8, 64), span=st.integers(0, 512), use=st.integers(0, 1024))
def test_initial_size_is_within_bounds_and_fits_use(lo: int, span: int, use: int) -> None:
    cfg = TunerConfig(start="low")
    b = Bounds(10, 1000, lo * MiB, (lo + span) * MiB)
    s = initial_size(b, use * MiB, cfg)
    assert 0 < s.memory_high <= s.memory_max and b.memory_lo <= s.memory_max <= b.memory_hi
    assert s.memory_high < s.memory_max or s.memory_max == b.memory_hi  # a warning gap
    assert s.memory_max == b.memory_hi or s.memory_max >= use * MiB + 4 * MiB
    assert s.cpu == b.cpu_lo


def test_memory_events_baseline_ignores_old_counts(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    (leaf / "memory.events").write_text("low 0\nhigh 9\nmax 9\noom 1\noom_kill 1\n")
    tuner.attach()
    assert tuner.observe("a", MemoryEvents(9, 9, 1, 1, clock.now)) == []


def test_default_start_is_the_manifest_maximum() -> None:
    """A new cell is never started below its maximum: its start-up allocation would race
    the trigger window and could be OOM-killed below the maximum."""
    b = Bounds(100, 500, 8 * MiB, 48 * MiB)
    for use in (0, 3 * MiB, 40 * MiB):
        s = initial_size(b, use, TunerConfig())
        assert (s.cpu, s.memory_max) == (500, 48 * MiB)
        assert s.memory_high <= s.memory_max


def armed(tuner: Tuner) -> bool:
    return tuner._timer is not None


def test_a_settled_cell_is_not_sampled_until_a_trigger_raises_it(tmp_path: Path) -> None:
    """With triggers armed (``quiet=True`` stands in for them on a fake cgroupfs), a cell
    at its lower bounds gets no sample timer at all; a pressure raise makes it a
    candidate for lowering again, so it is sampled until it is back at its floor."""
    loop = asyncio.new_event_loop()
    root = tmp_path / "agent"
    root.mkdir()
    host = Host(Budget.new(Amount(2000, 256 * MiB, 1000), Amount()))
    clock = Clock()
    cfg = TunerConfig(idle_samples=1, watch_s=0.0, cooldown_s=0.0, start="low",
                      lower_span_fraction=1.0)
    tuner = Tuner(host, CgroupV2(root), loop, config=cfg, sample_s=5.0, clock=clock,
                  triggers=False, quiet=True)
    try:
        make_cell(root, host, manifest("a"))
        tuner.attach()
        t = tuner.cells["a"]
        assert t.due is None and not armed(tuner)
        tuner.observe("a", PressureTriggered("cpu", clock.now))
        assert tuner.cells["a"].due == clock.now + 5.0 and armed(tuner)
        for _ in range(10):  # idle samples lower it back to its floor
            clock.now += 5
            tuner.sample("a")
            if t.due is None:
                break
        assert t.state.size.cpu == t.bounds.cpu_lo and t.due is None
        tuner._schedule()
        assert not armed(tuner)
        assert tuned_row(tuner.cells["a"], "none")["sampled_every_s"] is None
        tuner.pin("a", cpu=200)  # pinned: no automatic change, no samples
        assert t.due is None
        tuner.unpin("a")         # unpinned above its floor: sampled again, soon
        assert tuner.cells["a"].due == clock.now + 5.0
    finally:
        tuner.close()
        loop.close()


def test_sample_reader_matches_the_backend_stats(env: Any) -> None:
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    (leaf / "memory.pressure").write_text(
        "some avg10=1.50 avg60=0.00 avg300=0.00 total=9\nfull avg10=0.00 avg60=0.00 "
        "avg300=0.00 total=0\n")
    (leaf / "cpu.stat").write_text("usage_usec 77\nuser_usec 70\nsystem_usec 7\n")
    reader = tuner.knobs.sample_reader("a")
    assert reader is not None
    try:
        smp = reader.read(clock.now)
        assert (smp.cpu_usage_usec, smp.memory_current, smp.memory_some_avg10,
                smp.cpu_some_avg10) == (77, 2 * MiB, 1.5, 0.0)
        (leaf / "memory.current").write_text(f"{5 * MiB}\n")  # re-read, same fd
        assert reader.read(clock.now).memory_current == 5 * MiB
    finally:
        reader.close()


def test_a_pin_is_kept_with_the_cell_and_restored_by_a_new_tuner(env: Any) -> None:
    """agentd restarts: a new Tuner finds the pin the manager journaled with the cell and
    starts the cell pinned at that size, not at its default start."""
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    tuner.pin("a", cpu=300, memory=40 * MiB)
    kept = host.cells["a"].pin
    assert kept is not None and kept["memory_max"] == 40 * MiB and kept["cpu"] == 300
    tuner.close()
    again = Tuner(host, CgroupV2(root), tuner.loop, config=tuner.config, clock=clock,
                  triggers=False)
    try:
        again.attach()
        t = again.cells["a"]
        assert t.state.pinned and t.state.size.memory_max == 40 * MiB
        assert read(leaf, "memory.max") == str(40 * MiB)
        assert read(leaf, "cpu.max") == "30000 100000"
        again.unpin("a")
        assert host.cells["a"].pin is None
    finally:
        again.close()


def test_a_kept_pin_that_no_longer_fits_is_dropped(env: Any) -> None:
    root, host, tuner, _ = env
    make_cell(root, host, manifest("a"))
    host.cells["a"].pin = {"cpu": 300, "memory_high": 500 * MiB, "memory_max": 600 * MiB}
    tuner.attach()
    assert not tuner.cells["a"].state.pinned and host.cells["a"].pin is None
    assert [e for e in tuner_events(host, "unpin") if "no longer fits" in e.attrs["reason"]]


def test_top_cpu_percent_is_since_the_latest_reading(env: Any) -> None:
    """A quiet cell's last tuner sample may be minutes old: top measures CPU % since the
    previous top row when that is more recent."""
    root, host, tuner, clock = env
    leaf = make_cell(root, host, manifest("a"))
    tuner.attach()
    tuner.sample("a")  # usage 1000 us at clock.now
    mgr: Any = SimpleNamespace(cells=host.cells, cgroup=tuner.backend)  # what top_row reads
    (leaf / "cpu.stat").write_text("usage_usec 1001000\n")   # 1 s of CPU ...
    first = top_row(mgr, tuner, "a", clock.now + 100)          # ... over 100 s since it
    assert first["cpu_pct"] == 1.0
    (leaf / "cpu.stat").write_text("usage_usec 2001000\n")   # 1 s more in 2 s
    assert top_row(mgr, tuner, "a", clock.now + 102)["cpu_pct"] == 50.0


def test_a_fired_trigger_is_a_pressure_event_with_its_avg10(env: Any) -> None:
    """The trigger's callback: the tuner's decision (a raise) and ``tuner/pressure`` with
    the cell's ``some avg10`` as the file says it (channel 4's pressure-from-many)."""
    root, host, tuner, _ = env
    leaf = make_cell(root, host, manifest("a"))
    (leaf / "cpu.pressure").write_text("some avg10=42.50 avg60=10.00 avg300=1.00 total=5\n"
                                       "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    tuner.attach()
    tuner._on_psi("a", "cpu")
    (e,) = tuner_events(host, "pressure")
    assert e.cell == "a" and e.attrs == {"resource": "cpu", "avg10": 42.5}
    assert read(leaf, "cpu.max") != "10000 100000"  # raised, as for any trigger
    (leaf / "memory.pressure").unlink()
    tuner._on_psi("a", "memory")  # no memory.pressure file: no figure, still said
    assert tuner_events(host, "pressure")[-1].attrs == {"resource": "memory", "avg10": None}
