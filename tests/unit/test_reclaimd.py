"""The reclaim loop service against a fake cgroupfs and a fake object scan.

Shown here: budget return after a settled lowering (and the admission it allows),
orphan collection after the grace period and only of unjournaled objects, the
escalation ladder's writes, cpu.weight by priority, events and journal records.
The real scan and teardown (netlink, netns, cgroups) are shown in the box:
tests/guest/test_reclaim_box.py.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
from test_tunerd import Clock, Host, MiB, make_cell, manifest, read

from agent.core.budget import AdmissionRefused, Amount, Budget, Request
from agent.core.reclaim import CollectOrphan, ReclaimConfig
from agent.core.tunerstate import PressureTriggered, TunerConfig
from agent.daemon.reclaim import Reclaimer
from agent.daemon.tuner import Tuner
from agent.kernel.cgroupv2 import CgroupV2
from agent.kernel.orphans import KernelObjects
from agent.kernel.psi import BoxMemoryPressure


class FakeObjects(KernelObjects):
    def __init__(self, backend: CgroupV2) -> None:
        super().__init__(backend, "agbr0")
        self.found: list[tuple[str, str, str | None]] = []
        self.collected: list[tuple[str, str]] = []

    def scan(self, vlan_owner: Any) -> list[tuple[str, str, str | None]]:
        return list(self.found)

    def collect(self, a: CollectOrphan) -> None:
        self.collected.append((a.object_kind, a.name))
        self.found = [f for f in self.found if f[:2] != (a.object_kind, a.name)]


@pytest.fixture
def env(tmp_path: Path) -> Any:
    loop = asyncio.new_event_loop()
    root = tmp_path / "agent"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("cpu memory pids\n")
    host = Host(Budget.new(Amount(2000, 128 * MiB, 1000), Amount()))
    clock = Clock()
    backend = CgroupV2(root)
    cfg = TunerConfig(idle_samples=2, watch_s=10.0, start="low")
    tuner = Tuner(host, backend, loop, config=cfg,
                  clock=clock, triggers=False)
    pressure: list[float | None] = [None]
    objs = FakeObjects(backend)
    rec = Reclaimer(host, tuner, backend, loop, objs, ReclaimConfig(), clock=clock,
                    box_pressure=lambda: pressure[0])
    yield root, host, tuner, rec, clock, pressure, objs
    loop.run_until_complete(rec.close())
    tuner.close()
    loop.close()


def run(rec: Reclaimer) -> list[Any]:
    return rec.loop.run_until_complete(rec.run_pass())


def names(actions: list[Any]) -> list[str]:
    return [type(a).__name__ for a in actions]


def test_settled_lowering_returns_budget_and_admits_a_refused_cell(env: Any) -> None:
    root, host, tuner, rec, clock, _, _ = env
    leaf = make_cell(root, host, manifest("a", mem=("8M", "96M")))
    tuner.attach()
    while int(read(leaf, "memory.max")) < 96 * MiB:
        tuner.observe("a", PressureTriggered("memory", clock.now))
    big = Request("b", Amount(0, 64 * MiB, 0))
    with pytest.raises(AdmissionRefused):
        host.budget.admit(big)
    for _ in range(40):  # idle samples: lower in steps; each watch lasts 10 s
        clock.now += 5
        tuner.sample_all()
        run(rec)
    assert int(read(leaf, "memory.max")) < 64 * MiB
    returned = [e for e in host.bus.recent(None, channel="reclaim")
                if e.kind == "returnbudget"]
    assert returned and host.budget.get("a") == tuner.cells["a"].state.held
    assert host.budget.get("a").memory == int(read(leaf, "memory.max"))
    host.budget.admit(big)  # refused before, fits now
    assert any(r[0] == "reclaim" and r[1]["kind"] == "returnbudget"
               for r in host.journal.records)


def test_orphans_are_collected_after_the_grace_period_only(env: Any) -> None:
    root, host, tuner, rec, clock, _, objs = env
    make_cell(root, host, manifest("a"))
    tuner.attach()
    objs.found = [("cgroup", "a", "a"), ("cgroup", "ghost", "ghost"), ("veth", "vc-1", None),
                  ("netns", "ghost", "ghost"), ("vlan", "101", None)]
    assert "CollectOrphan" not in names(run(rec))  # first seen now
    clock.now += 31
    done = run(rec)
    assert [(a.object_kind, a.name) for a in done if isinstance(a, CollectOrphan)] == [
        ("vlan", "101"), ("veth", "vc-1"), ("netns", "ghost"), ("cgroup", "ghost")]
    assert objs.collected == [("vlan", "101"), ("veth", "vc-1"), ("netns", "ghost"),
                              ("cgroup", "ghost")]
    (summary,) = [e for e in host.bus.recent(None, channel="reclaim") if e.kind == "pass"
                  and e.attrs["orphans"]]
    assert dict(summary.attrs["orphans"]) == {"cgroup": 1, "netns": 1, "veth": 1, "vlan": 1}


def test_scan_only_every_scan_period(env: Any) -> None:
    _, _, _, rec, clock, _, objs = env
    objs.found = [("cgroup", "ghost", "ghost")]
    run(rec)
    objs.found = [("cgroup", "other", "other")]
    clock.now += 40  # "other" is new at this scan: not yet collected
    assert names(run(rec)) == []
    clock.now += 10  # no scan this pass
    assert names(run(rec)) == []
    clock.now += 25
    assert names(run(rec)) == ["CollectOrphan"]


def test_weights_follow_priority(env: Any) -> None:
    root, host, tuner, rec, _, _, _ = env
    a = make_cell(root, host, manifest("a", priority="high"))
    b = make_cell(root, host, manifest("b", priority="low"))
    tuner.attach()
    assert names(run(rec)) == ["SetCpuWeight", "SetCpuWeight"]
    assert (read(a, "cpu.weight"), read(b, "cpu.weight")) == ("400", "25")
    assert names(run(rec)) == []


def test_box_pressure_throttles_lowest_priority_then_relieves(env: Any) -> None:
    root, host, tuner, rec, clock, pressure, _ = env
    hi = make_cell(root, host, manifest("hi", priority="high"))
    lo = make_cell(root, host, manifest("lo", priority="low"))
    (lo / "memory.current").write_text(f"{4 * MiB}\n")
    tuner.attach()
    run(rec)
    pressure[0] = 50.0
    assert "Throttle" in names(run(rec))
    assert read(lo, "cpu.max") == "10000 100000" and read(hi, "cpu.max") == "10000 100000"
    assert int(read(lo, "memory.high")) == 8 * MiB  # 3/4 of use, not below the floor
    assert host.cells["lo"].rung.level == "throttled"
    assert tuner.observe("lo", PressureTriggered("cpu", clock.now)) == []  # hands off
    (ev,) = [e for e in host.bus.recent(None, channel="reclaim") if e.kind == "throttle"]
    assert ev.severity == "notice" and ev.attrs["avg10"] == 50.0
    pressure[0] = 1.0
    assert names(run(rec)) == ["Unthrottle"]
    assert host.cells["lo"].rung.level == "none"
    assert tuner.observe("lo", PressureTriggered("cpu", clock.now)) != []


def test_stop_rung_posts_a_stop_request(env: Any) -> None:
    root, host, tuner, rec, clock, pressure, _ = env
    lo = make_cell(root, host, manifest("lo", priority="low"))
    (lo / "cgroup.events").write_text("populated 1\nfrozen 1\n")  # the fake freezes at once
    tuner.attach()
    pressure[0] = 50.0
    seen = []
    for _ in range(4):
        seen += names(run(rec))
        clock.now += 11
    assert [n for n in seen if n in ("Throttle", "Freeze", "Stop")] == [
        "Throttle", "Freeze", "Stop"]
    assert [p[0] for p in host.posted] == ["lo"]


def test_a_failing_action_is_an_event_and_the_pass_goes_on(env: Any) -> None:
    root, host, tuner, rec, _, _, _ = env
    a = make_cell(root, host, manifest("a", priority="high"))
    make_cell(root, host, manifest("b", priority="low"))
    tuner.attach()
    (a / "cpu.weight").unlink()
    done = run(rec)
    assert names(done) == ["SetCpuWeight"] and done[0].cell == "b"
    assert [e.cell for e in host.bus.recent(None, channel="reclaim") if e.kind == "error"] == [
        "a"]


def test_passes_come_from_events_and_stop_when_nothing_is_pending(env: Any) -> None:
    """No clock drives the loop: after its first pass (weights), it sleeps until a
    lifecycle event or a tuner resize pokes it; an orphan in its grace period, a
    lowering still settling or an escalated cell each set the one timer that is due."""
    root, host, tuner, rec, clock, pressure, objs = env
    make_cell(root, host, manifest("a", priority="high"))
    tuner.attach()
    rec.attach()
    assert names(run(rec)) == ["SetCpuWeight"]
    assert rec.next_pass() is None
    objs.found = [("cgroup", "ghost", "ghost")]
    host.bus.emit("lifecycle", "state", cell="a", severity="info")  # a scan is wanted
    assert rec._timer is not None and rec._timer_at == clock.now + 0.5
    assert names(run(rec)) == []             # no scan yet: one was done < scan_s ago
    assert rec.next_pass() == clock.now + rec.scan_s
    clock.now += rec.scan_s
    assert names(run(rec)) == []             # ghost first seen now
    assert rec.next_pass() == clock.now + ReclaimConfig().orphan_grace_s
    clock.now += ReclaimConfig().orphan_grace_s
    assert names(run(rec)) == ["CollectOrphan"]
    assert rec.next_pass() is None
    pressure[0] = 30.0                       # box pressure: one rung per period
    assert names(run(rec)) == ["Throttle"]
    assert rec.next_pass() == clock.now + rec.period_s


def test_without_a_box_trigger_the_loop_degrades_to_a_period(env: Any) -> None:
    _, _, _, rec, clock, _, _ = env
    rec.pressure_path = "/nonexistent/pressure/memory"
    rec.start()
    assert rec.polled
    run(rec)
    assert rec.next_pass() == clock.now + rec.period_s


def test_only_a_lowering_pokes_the_loop(env: Any) -> None:
    _, host, _, rec, clock, _, _ = env
    rec.attach()
    host.bus.emit("tuner", "resize", cell="a", severity="info", action="SetCpuMax",
                  old=100, new=200, reason="pressure")
    assert rec._timer_at == math.inf  # a raise frees nothing
    host.bus.emit("tuner", "resize", cell="a", severity="info", action="SetCpuMax",
                  old=200, new=100, reason="idle")
    assert rec._timer_at == clock.now + 1.0


def test_box_pressure_reader_rereads_one_fd(tmp_path: Path) -> None:
    path = tmp_path / "memory"
    path.write_text("some avg10=12.50 avg60=1.00 avg300=0.00 total=5\n"
                    "full avg10=3.00 avg60=0.00 avg300=0.00 total=1\n")
    box = BoxMemoryPressure(str(path))
    try:
        assert box() == 12.5
        with path.open("r+") as f:  # same inode: the kept fd sees the new text
            f.write("some avg10=02.25")
        assert box() == 2.25
    finally:
        box.close()
    assert BoxMemoryPressure(str(tmp_path / "absent"))() is None
