"""The reclaim loop's decisions, and its hand-over with the tuner and admission."""

from __future__ import annotations

from dataclasses import replace
from typing import TypeVar

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.budget import AdmissionRefused, Amount, Budget, Request
from agent.core.reclaim import (
    ORPHAN_ORDER,
    Action,
    BoxView,
    CellView,
    CollectOrphan,
    Freeze,
    KernelObject,
    MemoryReclaim,
    ReclaimConfig,
    ReturnBudget,
    SetCpuWeight,
    Stop,
    Thaw,
    Throttle,
    Unthrottle,
    apply,
    next_pass_at,
    reclaim_pass,
    summarize,
    weight_for,
)
from agent.core.tuner import commitment, decide, settled, start
from agent.core.tunerstate import Bounds, BudgetGate, Commit, PressureTriggered, Sample

MiB = 1 << 20
CFG = ReclaimConfig()
QUIET = BoxView(0.0, False, frozenset())


def view(cell: str, priority: int = 50, **kw: object) -> CellView:
    base = CellView(cell, priority, cpu_min=0, cpu_lo=10, memory_lo=8 * MiB,
                    held=Amount(500, 64 * MiB, 32), grant=Amount(500, 64 * MiB, 32),
                    settled=True, idle=False, memory_current=30 * MiB, cpu_max=500,
                    memory_high=56 * MiB, cpu_weight=weight_for(priority, 0))
    return replace(base, **kw)  # type: ignore[arg-type]


T = TypeVar("T")


def only(actions: list[Action], kind: type[T]) -> list[T]:
    return [a for a in actions if isinstance(a, kind)]


# -- orphans --------------------------------------------------------------------------------

def test_orphans_are_objects_of_no_journaled_cell_past_the_grace_period() -> None:
    objs = (KernelObject("cgroup", "/agent/web", "web", 0.0),
            KernelObject("cgroup", "/agent/gone", "gone", 0.0),
            KernelObject("veth", "vc-gone", "gone", 0.0),
            KernelObject("mount", "/run/agent/cells/gone/root", "gone", 0.0),
            KernelObject("nftables", "cell_new", "new", 95.0),  # creation in flight
            KernelObject("netns", "/run/agent/netns/???", None, 10.0))
    box = BoxView(0.0, False, frozenset({"web"}), objs)
    got = only(reclaim_pass([], box, 100.0), CollectOrphan)
    assert [(a.object_kind, a.name) for a in got] == [
        ("mount", "/run/agent/cells/gone/root"), ("veth", "vc-gone"),
        ("netns", "/run/agent/netns/???"), ("cgroup", "/agent/gone")]
    assert got[0].age_s == 100.0 and "not in journal" in got[0].reason


kinds = st.sampled_from(ORPHAN_ORDER)
names = st.sampled_from(["a", "b", "c", "d"])


@settings(max_examples=200, deadline=None)
@given(st.frozensets(names), st.lists(st.tuples(kinds, st.text(min_size=1, max_size=4),
                                                st.none() | names, st.floats(0, 200))))
def test_orphan_set_logic(journaled: frozenset[str],
                          objs: list[tuple[str, str, str | None, float]]) -> None:
    objects = tuple(KernelObject(k, n, c, s) for k, n, c, s in objs)  # type: ignore[arg-type]
    got = only(reclaim_pass([], BoxView(None, False, journaled, objects), 200.0), CollectOrphan)
    expected = {(o.kind, o.name, o.cell) for o in objects
                if o.cell not in journaled and 200.0 - o.seen_since >= CFG.orphan_grace_s}
    assert {(a.object_kind, a.name, a.cell) for a in got} == expected
    order = [ORPHAN_ORDER.index(a.object_kind) for a in got]
    assert order == sorted(order)


# -- budget ---------------------------------------------------------------------------------

def test_budget_returned_only_when_settled_and_only_the_difference() -> None:
    low = Amount(300, 40 * MiB, 32)
    v = view("web", grant=low)
    (r,) = only(reclaim_pass([v], QUIET, 0.0), ReturnBudget)
    assert r == ReturnBudget("web", r.reason, Amount(500, 64 * MiB, 32), low)
    assert only(reclaim_pass([replace(v, settled=False)], QUIET, 0.0), ReturnBudget) == []
    assert only(reclaim_pass([view("web")], QUIET, 0.0), ReturnBudget) == []
    # a cell using more than admission holds is not "returned" anything
    over = view("web", grant=Amount(700, 32 * MiB, 32))
    (r,) = only(reclaim_pass([over], QUIET, 0.0), ReturnBudget)
    assert r.new == Amount(500, 32 * MiB, 32)
    assert apply(v, r, 1.0).held == r.new
    assert summarize([r]).returned == r.old - r.new


def test_freed_budget_admits_a_cell_refused_before() -> None:
    """Tuner raises A under pressure (committing budget), B is refused; A goes idle, the
    tuner lowers it, the reclaim loop returns the difference, and B is admitted."""
    b = Bounds(cpu_lo=100, cpu_hi=1000, memory_lo=16 * MiB, memory_hi=128 * MiB)
    budget = Budget.new(Amount(2000, 160 * MiB, 1000), Amount(0, 0, 0))
    a = start("a", b, 32)
    budget = budget.admit(Request("a", a.held))
    t = 0.0
    for _ in range(6):  # a burst: raise to the maximum
        t += 1
        a, acts = decide(a, PressureTriggered("memory", t), b, BudgetGate(budget), t)
        for act in acts:
            if isinstance(act, Commit):
                budget = budget.replace(Request("a", act.new))
    assert a.size.memory_max == 128 * MiB and budget.get("a") == a.held
    want_b = Request("b", Amount(100, 64 * MiB, 32))
    try:
        budget.admit(want_b)
        raise AssertionError("b should not fit yet")
    except AdmissionRefused as e:
        assert e.code == "E_ADMISSION_MEMORY"
    for _ in range(200):  # idle at 10 MiB: lowered step by step, two phases each
        t += 10
        a, _ = decide(a, Sample(0, 10 * MiB, 0.0, 0.0, t), b, BudgetGate(budget), t)
        v = view("a", held=a.held, grant=commitment(a.size, 32), settled=settled(a, t))
        for ret in only(reclaim_pass([v], QUIET, t), ReturnBudget):
            budget = budget.replace(Request("a", ret.new))
            a = replace(a, held=ret.new)
    assert a.size.memory_max < 64 * MiB and a.held == commitment(a.size, 32)
    budget = budget.admit(want_b)
    assert budget.get("b") == want_b.amount


# -- escalation -----------------------------------------------------------------------------

def run(cells: list[CellView], avg10: float, t: float) -> tuple[list[CellView], list[Action]]:
    acts = reclaim_pass(cells, BoxView(avg10, False, frozenset(c.cell for c in cells)), t)
    for a in acts:
        cells = [apply(c, a, t) for c in cells]
    return cells, acts


def ladder(acts: list[Action]) -> list[tuple[str | None, str]]:
    return [(a.cell, a.kind) for a in acts
            if isinstance(a, Throttle | Freeze | Stop | Thaw | Unthrottle)]


def test_escalation_ladder_lowest_priority_first_then_relief() -> None:
    cells = [view("tv", 80), view("ads", 20, memory_current=10 * MiB),
             view("logs", 20, memory_current=40 * MiB), view("sys", 95)]
    seen: list[tuple[str | None, str]] = []
    t = 0.0
    for _ in range(40):
        t += 5
        cells, acts = run(cells, 60.0, t)
        seen += ladder(acts)
        assert len(ladder(acts)) <= 1
    assert seen == [("logs", "throttle"), ("logs", "freeze"), ("logs", "stop"),
                    ("ads", "throttle"), ("ads", "freeze"), ("ads", "stop"),
                    ("tv", "throttle"), ("tv", "freeze"), ("tv", "stop")]
    cells = [view("tv", 80), view("ads", 20), view("logs", 20), view("sys", 95)]
    cells, acts = run(cells, 60.0, 0.0)
    (th,) = only(acts, Throttle)
    assert th == Throttle("ads", th.reason, 500, 10, 56 * MiB, 30 * MiB * 3 // 4, 60.0)
    assert "60.0%" in th.reason
    cells, _ = run(cells, 60.0, 20.0)  # frozen
    cells, acts = run(cells, 10.0, 30.0)  # between thresholds: hold
    assert ladder(acts) == []
    cells, acts = run(cells, 1.0, 40.0)
    assert only(acts, Thaw) == [Thaw("ads", acts[0].reason, 1.0)]
    cells, acts = run(cells, 1.0, 41.0)
    assert only(acts, Unthrottle) == [Unthrottle("ads", acts[0].reason, 500, 56 * MiB, 1.0)]
    assert all(c.level == "none" for c in cells)
    s = summarize([th, *acts])
    assert s.escalated == (("ads", "throttle"),) and s.relieved == (("ads", "unthrottle"),)


def test_no_psi_no_escalation() -> None:
    assert ladder(reclaim_pass([view("a", 1)], BoxView(None, False, frozenset("a")), 0)) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 99), min_size=1, max_size=6),
       st.lists(st.tuples(st.sampled_from([0.0, 3.0, 10.0, 30.0, 90.0]),
                          st.sampled_from([1.0, 5.0, 11.0])), max_size=60))
def test_escalation_properties(prios: list[int], series: list[tuple[float, float]]) -> None:
    cells = [view(f"c{i}", p, memory_current=(i + 1) * MiB) for i, p in enumerate(prios)]
    t = 0.0
    for avg10, dt in series:
        t += dt
        before = {c.cell: c for c in cells}
        cells, acts = run(cells, avg10, t)
        up = [a for a in acts if isinstance(a, Throttle | Freeze | Stop)]
        down = [a for a in acts if isinstance(a, Thaw | Unthrottle)]
        assert len(up) <= 1
        assert not up or avg10 > CFG.pressure_on_avg10
        assert not down or avg10 < CFG.pressure_off_avg10
        for a in up:
            v = before[a.cell or ""]
            assert v.priority < CFG.exempt_priority
            # nobody of lower priority is still on the ladder
            assert all(o.level == "stopped" or o.priority >= CFG.exempt_priority
                       or (o.priority, -o.memory_current, o.cell)
                       >= (v.priority, -v.memory_current, v.cell)
                       for o in before.values())
            if isinstance(a, Freeze | Stop):
                assert v.level == ("throttled" if isinstance(a, Freeze) else "frozen")
                assert t - v.level_since >= CFG.escalate_after_s
        for d in down:
            assert before[d.cell or ""].level in ("throttled", "frozen")


# -- memory.reclaim and weights -------------------------------------------------------------

def test_memory_reclaim_from_idle_cells_where_the_kernel_can() -> None:
    idle = view("a", idle=True, memory_current=40 * MiB)
    box = BoxView(0.0, True, frozenset({"a"}))
    (r,) = only(reclaim_pass([idle, view("b")], box, 100.0), MemoryReclaim)
    assert r == MemoryReclaim("a", r.reason, int((40 * MiB - 8 * MiB) * CFG.reclaim_fraction))
    assert only(reclaim_pass([idle], replace(box, has_memory_reclaim=False), 100.0),
                MemoryReclaim) == []
    again = apply(idle, r, 100.0)
    assert only(reclaim_pass([again], box, 100.0 + CFG.reclaim_interval_s - 1),
                MemoryReclaim) == []
    assert only(reclaim_pass([again], box, 100.0 + CFG.reclaim_interval_s), MemoryReclaim)
    tiny = view("a", idle=True, memory_current=8 * MiB + CFG.reclaim_min)
    assert only(reclaim_pass([tiny], box, 100.0), MemoryReclaim) == []
    assert summarize([r]).memory_reclaimed == r.bytes


def test_weight_by_priority() -> None:
    assert weight_for(50, 0) == 100  # normal priority gets the kernel's default weight
    ws = [weight_for(p, 0) for p in range(100)]
    assert ws == sorted(ws) and 1 <= ws[0] and ws[-1] <= 10_000
    for p in range(0, 85):
        assert abs(weight_for(p + 15, 0) - 2 * weight_for(p, 0)) <= 1
    assert weight_for(20, 2000) == 200  # a cpu_min guarantee is a floor
    v = view("a", 80, cpu_weight=100)
    (w,) = only(reclaim_pass([v], QUIET, 0.0), SetCpuWeight)
    assert w == SetCpuWeight("a", "priority 80", 100, weight_for(80, 0))
    assert only(reclaim_pass([apply(v, w, 0.0)], QUIET, 0.0), SetCpuWeight) == []


def test_actions_and_summary_encode() -> None:
    cells = [view("a", 10, grant=Amount(100, 10 * MiB, 32), idle=True, cpu_weight=3)]
    objs = (KernelObject("veth", "vc-x", "x", 0.0),)
    acts = reclaim_pass(cells, BoxView(50.0, True, frozenset({"a"}), objs), 100.0)
    assert {type(a) for a in acts} == {CollectOrphan, ReturnBudget, Throttle, SetCpuWeight,
                                       MemoryReclaim}
    for a in acts:
        assert cbor2.loads(cbor2.dumps(a.attrs()))["reason"] == a.reason
    s = summarize(acts)
    assert s.orphans == (("veth", 1),) and s.weights == 1
    assert cbor2.loads(cbor2.dumps(s.attrs()))["returned"]["memory"] == 54 * MiB


# -- when the next pass is due by itself ---------------------------------------------------

def test_nothing_pending_means_no_next_pass() -> None:
    assert next_pass_at([view("a"), view("b")], QUIET, 100.0, 10.0) is None
    assert next_pass_at([], BoxView(None, True, frozenset()), 100.0, 10.0) is None


def test_each_pending_thing_sets_its_own_due_time() -> None:
    unsettled = view("a", grant=Amount(500, 32 * MiB, 32), settled=False, settle_at=130.0)
    assert next_pass_at([unsettled], QUIET, 100.0, 10.0) == 130.0
    escalated = view("a", level="throttled", level_since=95.0)
    assert next_pass_at([escalated], QUIET, 100.0, 10.0) == 110.0
    pressed = BoxView(CFG.pressure_off_avg10, False, frozenset())
    assert next_pass_at([view("a")], pressed, 100.0, 10.0) == 110.0
    ghost = BoxView(0.0, False, frozenset({"a"}), (KernelObject("cgroup", "g", "g", 90.0),
                                                    KernelObject("cgroup", "a", "a", 0.0)))
    assert next_pass_at([view("a")], ghost, 100.0, 10.0) == 90.0 + CFG.orphan_grace_s
    idle = view("a", idle=True, memory_current=30 * MiB, last_reclaim_at=80.0)
    reclaiming = BoxView(0.0, True, frozenset())
    assert next_pass_at([idle], reclaiming, 100.0, 10.0) == 80.0 + CFG.reclaim_interval_s
    assert next_pass_at([idle], QUIET, 100.0, 10.0) is None  # no memory.reclaim
    at_floor = replace(idle, memory_current=8 * MiB)
    assert next_pass_at([at_floor], reclaiming, 100.0, 10.0) is None


@given(st.floats(0.0, 1000.0), st.floats(0.0, 100.0))
def test_a_due_pass_is_never_in_the_past(now: float, seen: float) -> None:
    box = BoxView(50.0, True, frozenset(), (KernelObject("veth", "v", None, seen),))
    cells = [view("a", idle=True, last_reclaim_at=seen, level="frozen")]
    due = next_pass_at(cells, box, now, 10.0)
    assert due is not None and due >= now
