from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent.core.plan import (
    DataOp,
    Executor,
    Plan,
    PlanError,
    PlanEvent,
    op_from_wire,
    op_to_wire,
    recover,
    register_op,
)
from agent.kernel.journal import Journal, read_journal


@dataclass
class World:
    """What the fake operations act on: named resources and a log of what was done."""

    state: dict[str, Any] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    fail_apply: set[str] = field(default_factory=set)
    fail_undo: set[str] = field(default_factory=set)
    crash_mid_apply: set[str] = field(default_factory=set)


class Crash(BaseException):
    """Stands for kill -9 of the agent at this point."""


@register_op
@dataclass(frozen=True)
class Make(DataOp):
    """Creates ``name`` and ``name/sub``: two steps, so a crash can fall between them."""

    kind: ClassVar[str] = "test-make"
    name: str
    size: int = 1
    tags: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"make {self.name} (size {self.size})"

    def apply(self, ctx: Any) -> Mapping[str, Any]:
        w: World = ctx
        if self.name in w.fail_apply:
            raise OSError(17, f"cannot make {self.name}")
        w.log.append(("apply", self.name))
        w.state[self.name] = self.size
        if self.name in w.crash_mid_apply:
            raise Crash
        w.state[self.name + "/sub"] = self.size
        return {"made": [self.name, self.name + "/sub"]}

    def undo(self, ctx: Any, undo_data: Mapping[str, Any]) -> None:
        w: World = ctx
        w.log.append(("undo", self.name))
        if self.name in w.fail_undo:
            raise RuntimeError(f"{self.name} is busy")
        # tolerate partial application: with empty undo data, remove what may exist
        for key in undo_data.get("made", [self.name, self.name + "/sub"]):
            w.state.pop(key, None)


def make_plan(n: int, pid: str = "p1") -> Plan:
    return Plan(pid, "web", "create", tuple(Make(f"r{i}", i) for i in range(n)))


def kinds(path: Path) -> list[str]:
    return [r.t for r in read_journal(path).records]


def test_run_applies_every_op_and_journals_it(tmp_path: Path) -> None:
    w = World()
    events: list[PlanEvent] = []
    with Journal(tmp_path / "j") as j:
        ex = Executor(j, w, on_op_applied=events.append, on_plan_done=events.append)
        undo = ex.run(make_plan(3))
        assert ex.snapshot_records() == []
        assert ex.recover() == []
    assert undo == tuple({"made": [f"r{i}", f"r{i}/sub"]} for i in range(3))
    assert w.state == {"r0": 0, "r0/sub": 0, "r1": 1, "r1/sub": 1, "r2": 2, "r2/sub": 2}
    assert kinds(tmp_path / "j") == ["plan-begin", "op-done", "op-done", "op-done",
                                     "plan-commit"]
    begin = read_journal(tmp_path / "j").records[0]
    assert begin.data["ops"][1] == {"kind": "test-make",
                                    "args": {"name": "r1", "size": 1, "tags": []}}
    assert [(e.kind, e.index) for e in events] == [("op-applied", 0), ("op-applied", 1),
                                                   ("op-applied", 2), ("plan-commit", -1)]
    assert events[1].attrs() == {"plan": "p1", "purpose": "create", "i": 1,
                                 "op": "make r1 (size 1)", "step": "test-make"}


@pytest.mark.parametrize("k", range(5))
def test_failure_at_each_position_undoes_the_prefix_in_reverse(tmp_path: Path, k: int) -> None:
    w = World(fail_apply={f"r{k}"})
    with Journal(tmp_path / "j") as j:
        ex = Executor(j, w)
        with pytest.raises(PlanError) as ei:
            ex.run(make_plan(5))
        assert ex.snapshot_records() == []
    err = ei.value
    assert err.code == "E_PLAN" and err.index == k and err.undo_errors == ()
    assert f"step {k + 1}/5 `make r{k} (size {k})` failed" in err.message
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == 17
    assert w.log == ([("apply", f"r{i}") for i in range(k)]
                     + [("undo", f"r{i}") for i in reversed(range(k))])
    assert w.state == {}
    recs = read_journal(tmp_path / "j").records
    assert [r.t for r in recs] == (["plan-begin"] + ["op-done"] * k + ["op-undone"] * k
                                   + ["plan-abort"])
    assert [r.data["i"] for r in recs if r.t == "op-undone"] == list(reversed(range(k)))
    assert recs[-1].data["failed"] == k and recs[-1].data["reason"] == "error"
    assert recover(recs) == []


def test_undo_failure_is_reported_but_does_not_mask_the_cause(tmp_path: Path) -> None:
    w = World(fail_apply={"r3"}, fail_undo={"r1"})
    seen: list[PlanEvent] = []
    with Journal(tmp_path / "j") as j:
        with pytest.raises(PlanError) as ei:
            Executor(j, w, on_op_undone=seen.append).run(make_plan(5))
    err = ei.value
    assert isinstance(err.__cause__, OSError)
    assert "cannot make r3" in err.message and "1 undo(s) failed" in err.message
    assert len(err.undo_errors) == 1 and "`make r1 (size 1)`: r1 is busy" in err.undo_errors[0]
    assert w.log[-3:] == [("undo", "r2"), ("undo", "r1"), ("undo", "r0")]  # kept going
    assert w.state == {"r1": 1, "r1/sub": 1}  # the leftover, for the reclaim loop
    assert [(e.kind, e.index) for e in seen] == [("op-undone", 2), ("op-undo-failed", 1),
                                                 ("op-undone", 0)]
    abort = read_journal(tmp_path / "j").records[-1]
    assert abort.t == "plan-abort" and abort.data["undo_errors"] == list(err.undo_errors)


def test_a_failing_hook_aborts_like_a_failing_op(tmp_path: Path) -> None:
    w = World()

    def hook(ev: PlanEvent) -> None:
        if ev.index == 1:
            raise ValueError("bus is gone")
    with Journal(tmp_path / "j") as j, pytest.raises(PlanError) as ei:
        Executor(j, w, on_op_applied=hook).run(make_plan(3))
    assert ei.value.index == 1 and isinstance(ei.value.__cause__, ValueError)
    assert w.state == {}
    assert w.log[-2:] == [("undo", "r1"), ("undo", "r0")]


def crash_after(k: int) -> Any:
    def hook(ev: PlanEvent) -> None:
        if ev.index == k:
            raise Crash
    return hook


@pytest.mark.parametrize("k", range(4))
def test_kill_after_op_k_is_repaired_by_a_new_executor(tmp_path: Path, k: int) -> None:
    w = World()
    path = tmp_path / "j"
    j = Journal(path)
    with pytest.raises(Crash):
        Executor(j, w, on_op_applied=crash_after(k)).run(make_plan(4))
    j.abandon()
    assert len(w.state) == 2 * (k + 1)

    # the restarted agent: a new journal object and executor over the same file
    done: list[PlanEvent] = []
    with Journal(path) as j2:
        ex = Executor(j2, w, on_plan_done=done.append)
        (inc,) = ex.recover()
        assert (inc.plan_id, inc.target, sorted(inc.done)) == ("p1", "web", list(range(k + 1)))
        assert inc.in_flight == (k + 1 if k < 3 else None)
        w.log.clear()
        (report,) = ex.repair([inc])
        assert ex.recover() == []
    assert w.state == {}
    # the op in flight (not started here) is undone with empty data, then the done ones
    expect = ([f"r{k + 1}"] if k < 3 else []) + [f"r{i}" for i in reversed(range(k + 1))]
    assert w.log == [("undo", name) for name in expect]
    assert report.errors == () and report.plan_id == "p1"
    assert [(e.kind, e.error) for e in done] == [("plan-abort", "recovered")]
    last = read_journal(path).records[-1]
    assert last.t == "plan-abort" and last.data["reason"] == "recovered"


def test_kill_mid_apply_undoes_the_half_applied_op(tmp_path: Path) -> None:
    w = World(crash_mid_apply={"r2"})
    path = tmp_path / "j"
    j = Journal(path)
    with pytest.raises(Crash):
        Executor(j, w).run(make_plan(4))
    j.abandon()
    assert "r2" in w.state and "r2/sub" not in w.state  # half made
    with Journal(path) as j2:
        ex = Executor(j2, w)
        (inc,) = ex.recover()
        assert inc.in_flight == 2
        ex.repair([inc])
    assert w.state == {}


def test_kill_during_repair_then_repair_again(tmp_path: Path) -> None:
    w = World()
    path = tmp_path / "j"
    j = Journal(path)
    with pytest.raises(Crash):
        Executor(j, w, on_op_applied=crash_after(2)).run(make_plan(4))
    j.abandon()
    j2 = Journal(path)
    with pytest.raises(Crash):  # killed again after the first undo
        Executor(j2, w, on_op_undone=crash_after(2)).repair(recover(j2.replay()))
    j2.abandon()
    with Journal(path) as j3:
        ex = Executor(j3, w)
        (inc,) = ex.recover()
        # op-undone records are not synced: the lost progress is simply undone again
        assert inc.undone == set() and sorted(inc.done) == [0, 1, 2]
        w.log.clear()
        ex.repair([inc])
    assert w.log == [("undo", "r3"), ("undo", "r2"), ("undo", "r1"), ("undo", "r0")]
    assert w.state == {}


def test_undo_progress_written_before_a_kill_is_not_repeated(tmp_path: Path) -> None:
    w = World()
    path = tmp_path / "j"
    j = Journal(path)
    with pytest.raises(Crash):
        Executor(j, w, on_op_applied=crash_after(2)).run(make_plan(4))
    j.abandon()
    j2 = Journal(path, buffer_bytes=0)  # every record reaches the file at once
    with pytest.raises(Crash):
        Executor(j2, w, on_op_undone=crash_after(2)).repair(recover(j2.replay()))
    j2.abandon()
    with Journal(path) as j3:
        ex = Executor(j3, w)
        (inc,) = ex.recover()
        assert inc.undone == {3, 2} and inc.undo_order() == [(1, inc.done[1]), (0, inc.done[0])]
        w.log.clear()
        ex.repair([inc])
    assert w.log == [("undo", "r1"), ("undo", "r0")]
    assert w.state == {}


def test_in_flight_plan_survives_compaction(tmp_path: Path) -> None:
    w = World()
    path = tmp_path / "j"
    j = Journal(path, max_bytes=12288)  # the plan's own records fit; the old ones do not
    ex = Executor(j, w, on_op_applied=crash_after(59))
    j.snapshot = ex.snapshot_records
    for n in range(25):  # committed plans are dropped by compaction
        ex.run(Plan(f"old{n}", "db", "create", (Make(f"db{n}"),)))
    with pytest.raises(Crash):
        ex.run(Plan("big", "web", "create", tuple(Make(f"r{i}", tags=("x" * 40,))
                                                  for i in range(80))))
    j.abandon()
    assert j.stats.compactions >= 1
    assert "old0" not in str(read_journal(path).records)
    (inc,) = recover(read_journal(path).records)
    assert inc.plan_id == "big" and sorted(inc.done) == list(range(60))
    assert inc.ops[5] == Make("r5", 1, ("x" * 40,))
    with Journal(path) as j2:
        Executor(j2, w).repair([inc])
    assert set(w.state) == {f"db{n}" for n in range(25)} | {f"db{n}/sub" for n in range(25)}


def test_unknown_kind_is_reported_not_raised(tmp_path: Path) -> None:
    w = World()
    path = tmp_path / "j"
    with Journal(path) as j:
        j.append("plan-begin", {"plan": "p9", "target": "web", "purpose": "create",
                                "ops": [op_to_wire(Make("a")),
                                        {"kind": "gone-op", "args": {}}]}, sync=True)
        j.append("op-done", {"plan": "p9", "i": 0, "undo": {"made": ["a"]}}, sync=True)
        j.append("op-done", {"plan": "p9", "i": 1, "undo": {}}, sync=True)
    w.state["a"] = 1
    with Journal(path) as j2:
        ex = Executor(j2, w)
        (inc,) = ex.recover()
        assert inc.ops[1] is None and "unknown operation kind 'gone-op'" in inc.errors[0]
        (report,) = ex.repair([inc])
        assert ex.recover() == []
    assert w.state == {}
    assert len(report.errors) == 2 and "cannot rebuild" in report.errors[1]


def test_explain() -> None:
    plan = Plan("p7", "web", "create", tuple(Make(f"r{i}", i) for i in range(10)))
    lines = plan.explain()
    assert lines[0] == "plan p7: create web, 10 operations"
    assert lines[1] == " 1. make r0 (size 0)"
    assert lines[10] == "10. make r9 (size 9)"
    assert Plan("q", "db", "destroy", (Make("x"),)).explain() == [
        "plan q: destroy db, 1 operation", "1. make x (size 1)"]


def test_wire_round_trip_and_registry() -> None:
    op = Make("r", 3, ("a", "b"))
    assert op_from_wire(op_to_wire(op)) == op
    assert op_from_wire({"kind": "test-make", "args": {"name": "r", "size": 3,
                                                       "tags": ["a", "b"]}}) == op
    with pytest.raises(PlanError):
        op_from_wire({"kind": "test-make", "args": {"name": "r"}})
    with pytest.raises(PlanError):
        op_from_wire(["test-make"])

    @dataclass(frozen=True)
    class Other(DataOp):
        kind: ClassVar[str] = "test-make"
    with pytest.raises(ValueError, match="already registered"):
        register_op(Other)


def test_plan_validation() -> None:
    plan = make_plan(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.target = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        Plan("p", "web", "Create!", ())
    with pytest.raises(TypeError):
        Plan("p", "web", "create", [Make("a")])  # type: ignore[arg-type]
    p = Plan.new("web", "destroy", [Make("a")])
    assert p.id.startswith("destroy-web-") and p.ops == (Make("a"),)
