"""The tuner's decisions: scenarios, then properties over random observation sequences."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.budget import Amount, Budget, Request
from agent.core.errors import ConfigError
from agent.core.lowering import (
    TRANSITIONS,
    Lowering,
    LoweringError,
    PendingLower,
    Phase,
    Step,
    Watch,
    render_mermaid,
)
from agent.core.manifest import Resources
from agent.core.tuner import (
    PinRefused,
    commitment,
    decide,
    high_for,
    next_interval,
    pin,
    settled,
    start,
    unpin,
    wants_samples,
)
from agent.core.tunerstate import (
    Action,
    Bounds,
    BudgetGate,
    Commit,
    MemoryEvents,
    PressureTriggered,
    RecordRefusal,
    Sample,
    SetCpuMax,
    SetLimits,
    SetMemoryHigh,
    SetMemoryMax,
    Size,
    TunerConfig,
    TunerState,
    Verdict,
)

MiB = 1 << 20
CFG = TunerConfig()
B = Bounds(cpu_lo=100, cpu_hi=2000, memory_lo=16 * MiB, memory_hi=256 * MiB)


@dataclass
class Gate:
    ok: bool = True
    asked: list[Amount] = field(default_factory=list)

    def can_grow(self, cell: str, delta: Amount) -> Verdict:
        self.asked.append(delta)
        return Verdict(self.ok, "" if self.ok else "no room")


def big(cfg: TunerConfig = CFG) -> TunerState:
    """A cell at 200 MiB max and its lowest cpu.max, admission holding exactly that."""
    size = Size(B.cpu_lo, high_for(200 * MiB, B, cfg), 200 * MiB)
    return TunerState("web", size, commitment(size, 64))


def sample(at: float, mem: int, cpu_usec: int = 0, mavg: float = 0.0, cavg: float = 0.0
           ) -> Sample:
    return Sample(cpu_usec, mem, mavg, cavg, at)


def idle_until_lowered(state: TunerState, t: float, mem: int, gate: Gate
                       ) -> tuple[TunerState, float, list[Action]]:
    for _ in range(CFG.idle_samples + 1):
        t += 10
        state, acts = decide(state, sample(t, mem), B, gate, t)
        if acts:
            return state, t, acts
    raise AssertionError("never lowered")


# -- raising -------------------------------------------------------------------------------

def test_memory_pressure_raises_max_then_high_by_a_step() -> None:
    s0 = start("web", B, 64)
    gate = Gate()
    s1, acts = decide(s0, PressureTriggered("memory", 1.0), B, gate, 1.0)
    step = max((B.memory_hi - B.memory_lo) // 4, B.memory_lo // 2)
    new_max = B.memory_lo + step
    assert [type(a) for a in acts] == [Commit, SetMemoryMax, SetMemoryHigh]
    assert acts[1] == SetMemoryMax("web", "pressure", B.memory_lo, new_max)
    assert acts[2] == SetMemoryHigh("web", "pressure", s0.size.memory_high,
                                    new_max - new_max // 8)
    assert gate.asked == [Amount(0, new_max - B.memory_lo, 0)]
    assert s1.held == commitment(s1.size, 64) and s1.size.memory_max == new_max


def test_raises_stop_at_the_manifest_maximum() -> None:
    s, gate, t = start("web", B, 64), Gate(), 0.0
    maxes = []
    for _ in range(10):
        t += 1
        s, acts = decide(s, PressureTriggered("memory", t), B, gate, t)
        maxes += [a.new for a in acts if isinstance(a, SetMemoryMax)]
    assert maxes == sorted(maxes) and maxes[-1] == B.memory_hi
    assert len(maxes) < 10  # at the maximum: no more actions
    assert s.size == Size(B.cpu_lo, high_for(B.memory_hi, B, CFG), B.memory_hi)


def test_cpu_pressure_raises_cpu_max() -> None:
    s0 = start("web", B, 64)
    s1, acts = decide(s0, PressureTriggered("cpu", 1.0), B, Gate(), 1.0)
    new = B.cpu_lo + max((B.cpu_hi - B.cpu_lo) // 4, B.cpu_lo // 2)
    assert acts[-1] == SetCpuMax("web", "pressure", B.cpu_lo, new)
    assert s1.size.cpu == new and s1.size.memory_max == s0.size.memory_max


def test_raise_the_budget_cannot_afford_is_refused_with_numbers() -> None:
    s0 = start("web", B, 64)
    budget = Budget.new(Amount(4000, 64 * MiB, 1000), Amount(0, 0, 0))
    budget = budget.admit(Request("web", s0.held)).admit(Request("o", Amount(0, 40 * MiB, 0)))
    s1, acts = decide(s0, PressureTriggered("memory", 1.0), B, BudgetGate(budget), 1.0)
    assert s1 == s0
    (r,) = acts
    assert isinstance(r, RecordRefusal) and r.resource == "memory"
    assert r.current == B.memory_lo and r.wanted > r.current
    assert r.need.memory == r.wanted - B.memory_lo
    assert str(budget.free.memory) in r.reason and r.kind == "refused"


def test_raise_within_what_admission_holds_asks_no_budget() -> None:
    s0 = replace(start("web", B, 64), held=Amount(2000, B.memory_hi, 64))
    gate = Gate(ok=False)
    s1, acts = decide(s0, PressureTriggered("memory", 1.0), B, gate, 1.0)
    assert gate.asked == [] and not any(isinstance(a, Commit) for a in acts)
    assert s1.size.memory_max > s0.size.memory_max and s1.held == s0.held


def test_events_raise_and_counter_reset_is_a_new_baseline() -> None:
    s, gate = big(), Gate()
    s, acts = decide(s, MemoryEvents(5, 1, 0, 0, 1.0), B, gate, 1.0)
    assert acts == []  # first read: baseline
    s, acts = decide(s, MemoryEvents(5, 1, 0, 0, 2.0), B, gate, 2.0)
    assert acts == []
    s, acts = decide(s, MemoryEvents(0, 0, 0, 0, 3.0), B, gate, 3.0)
    assert acts == []  # went backwards: cgroup re-created
    s, acts = decide(s, MemoryEvents(0, 1, 0, 0, 4.0), B, gate, 4.0)
    assert any(isinstance(a, SetMemoryMax) and a.reason == "events:max" for a in acts)


def test_a_pressured_sample_raises_without_a_trigger() -> None:
    s = big()
    s, acts = decide(s, sample(1.0, 10 * MiB, cavg=CFG.sample_raise_avg10 + 1), B, Gate(), 1.0)
    assert [a.reason for a in acts if isinstance(a, SetCpuMax)] == ["sample-pressure"]


# -- lowering ------------------------------------------------------------------------------

def test_lowering_is_two_phase_and_keeps_headroom() -> None:
    s, gate = big(), Gate()
    mem = 40 * MiB
    s, t, acts = idle_until_lowered(s, 0.0, mem, gate)
    (h,) = [a for a in acts if isinstance(a, SetMemoryHigh)]
    assert h.reason == "idle" and h.new < h.old and h.new >= mem
    assert not any(isinstance(a, SetMemoryMax) for a in acts)
    assert s.pending is not None and not settled(s, t)
    s, acts = decide(s, sample(t + 10, mem), B, gate, t + 10)
    (m,) = [a for a in acts if not isinstance(a, SetCpuMax)]  # cpu lowers on its own count
    assert isinstance(m, SetMemoryMax) and m.reason == "reclaimed"
    assert m.new >= mem + max(mem // 4, CFG.memory_headroom_min)
    assert m.new >= s.size.memory_high
    assert m.old - m.new <= (B.memory_hi - B.memory_lo) // 8
    assert not settled(s, t + 10) and settled(s, t + 10 + CFG.watch_s + 1)
    assert s.held == big().held  # the budget is returned by the reclaim loop, not here


def test_lowering_stops_at_use_plus_headroom() -> None:
    size = Size(B.cpu_lo, high_for(40 * MiB, B, CFG), 40 * MiB)
    s, gate, mem = TunerState("web", size, commitment(size, 64)), Gate(), 17 * MiB
    s, t, acts = idle_until_lowered(s, 0.0, mem, gate)
    s, acts = decide(s, sample(t + 10, mem), B, gate, t + 10)
    floor = mem + max(mem // 4, CFG.memory_headroom_min)
    assert 40 * MiB - (B.memory_hi - B.memory_lo) // 8 < floor  # the step alone would undercut
    assert acts == [SetMemoryMax("web", "reclaimed", 40 * MiB, floor)]


def test_phase_two_waits_for_reclaim_then_gives_up_and_cools_down() -> None:
    s, gate = big(), Gate()
    s, t, _ = idle_until_lowered(s, 0.0, 40 * MiB, gate)
    lowered_high = s.size.memory_high
    over = lowered_high + MiB
    acts: list[Action] = []
    for _ in range(CFG.reclaim_wait_samples):
        t += 10
        s, acts = decide(s, sample(t, over), B, gate, t)
        if acts:
            break
    assert acts == [SetMemoryHigh("web", "rollback:not-reclaimed", lowered_high,
                                  big().size.memory_high)]
    assert s.pending is None and s.cooldown_until == t + CFG.cooldown_s
    for _ in range(CFG.idle_samples * 3):
        t += 10
        s, acts = decide(s, sample(t, 10 * MiB), B, gate, t)
        assert t >= s.cooldown_until or acts == []


@pytest.mark.parametrize("events", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)])
def test_trouble_after_lowering_rolls_back(events: tuple[int, int, int, int]) -> None:
    s, gate = big(), Gate(ok=False)  # a rollback needs no budget
    s, _ = decide(s, MemoryEvents(0, 0, 0, 0, 0.0), B, gate, 0.0)
    s, t, _ = idle_until_lowered(s, 0.0, 40 * MiB, gate)
    s, _ = decide(s, sample(t + 1, 40 * MiB), B, gate, t + 1)
    assert s.watch is not None
    lowered = s.size
    s, acts = decide(s, MemoryEvents(*events, t + 2), B, gate, t + 2)
    assert acts[0] == SetMemoryMax("web", acts[0].reason, lowered.memory_max, 200 * MiB)
    assert acts[0].reason.startswith("rollback:events")
    assert s.size == big().size and s.cooldown_until == t + 2 + CFG.cooldown_s


def test_high_events_during_phase_one_are_expected() -> None:
    s, gate = big(), Gate()
    s, _ = decide(s, MemoryEvents(0, 0, 0, 0, 0.0), B, gate, 0.0)
    s, t, _ = idle_until_lowered(s, 0.0, 40 * MiB, gate)
    s2, acts = decide(s, MemoryEvents(7, 0, 0, 0, t + 1), B, gate, t + 1)
    assert acts == [] and s2.pending == s.pending
    _, acts = decide(s2, MemoryEvents(7, 1, 0, 0, t + 2), B, gate, t + 2)
    assert acts and acts[0].reason == "rollback:events:max"


def test_one_busy_sample_restarts_the_idle_count() -> None:
    s, gate, t = big(), Gate(), 0.0
    for i in range(CFG.idle_samples * 3):
        t += 10
        mem = 150 * MiB if i % CFG.idle_samples == CFG.idle_samples - 2 else 10 * MiB
        s, acts = decide(s, sample(t, mem), B, gate, t)
        assert acts == []


def test_cpu_lowers_toward_use_plus_headroom_but_not_below_min() -> None:
    s, gate, t, usec = replace(big(), size=replace(big().size, cpu=1000)), Gate(), 0.0, 0
    s = replace(s, held=commitment(s.size, 64))
    cpus = []
    for _ in range(200):
        t += 10
        usec += 10 * 150_000  # 150 millicpu
        s, acts = decide(s, sample(t, 150 * MiB, usec), B, gate, t)
        cpus += [a.new for a in acts if isinstance(a, SetCpuMax)]
    assert cpus == sorted(cpus, reverse=True) and cpus
    # Each step is at most 1/8 of the span; it stops once use is half the limit (not idle),
    # and never goes below use plus headroom.
    steps = [a - b for a, b in zip([1000, *cpus], cpus, strict=False)]
    assert max(steps) <= (B.cpu_hi - B.cpu_lo) // 8
    assert 150 * (1 + CFG.cpu_headroom_ratio) < cpus[-1] <= 150 / CFG.idle_usage_ratio


# -- pinning and helpers -------------------------------------------------------------------

def test_pin_sets_limits_and_silences_the_tuner() -> None:
    s, gate = big(), Gate()
    size = Size(B.cpu_lo, 100 * MiB, 120 * MiB)
    s, acts = pin(s, size, B, gate)
    assert acts == [SetLimits("web", "pin", big().size, size)] and s.pinned
    for obs in (PressureTriggered("memory", 1.0), PressureTriggered("cpu", 2.0),
                MemoryEvents(0, 0, 0, 0, 3.0), MemoryEvents(9, 9, 9, 9, 4.0),
                sample(5.0, 10 * MiB, mavg=90, cavg=90)):
        s, acts = decide(s, obs, B, gate, obs.at)
        assert acts == []
    s = unpin(s)
    _, acts = decide(s, PressureTriggered("memory", 6.0), B, gate, 6.0)
    assert acts


def test_pin_refusals() -> None:
    s = big()
    s, _ = decide(s, sample(1.0, 90 * MiB), B, Gate(), 1.0)
    with pytest.raises(PinRefused) as e:
        pin(s, Size(50, 20 * MiB, 20 * MiB), B, Gate())
    assert e.value.code == "E_PIN_BOUNDS"
    with pytest.raises(PinRefused) as e:
        pin(s, Size(500, 20 * MiB, 80 * MiB), B, Gate())
    assert e.value.code == "E_PIN_BELOW_USE"
    with pytest.raises(PinRefused) as e:
        pin(s, Size(500, 200 * MiB, 256 * MiB), B, Gate(ok=False))
    assert e.value.code == "E_PIN_BUDGET"


def test_bounds_from_manifest_include_floors() -> None:
    b = Bounds.from_resources(Resources(cpu_min=0, cpu_max=500, memory_min=0,
                                        memory_max=64 * MiB))
    assert (b.cpu_lo, b.cpu_hi, b.memory_lo, b.memory_hi) == (
        CFG.cpu_floor, 500, CFG.memory_floor, 64 * MiB)
    b = Bounds.from_resources(Resources(cpu_min=0, cpu_max=10, memory_min=0, memory_max=4 * MiB))
    assert b.memory_lo == 4 * MiB and b.cpu_lo == 10
    with pytest.raises(ConfigError):
        Bounds(10, 5, 1, 2)


def test_actions_encode_for_events_and_journal() -> None:
    s = start("web", B, 64)
    _, acts = decide(s, PressureTriggered("memory", 1.0), B, Gate(), 1.0)
    _, more = pin(big(), Size(500, 20 * MiB, 30 * MiB), B, Gate())
    for a in [*acts, *more]:
        d = cbor2.loads(cbor2.dumps(a.attrs()))
        assert d["action"] == type(a).__name__ and d["reason"] == a.reason and "cell" not in d


# -- properties ----------------------------------------------------------------------------

bounds_st = st.builds(
    lambda clo, cspan, mlo, mspan: Bounds(clo, clo + cspan, mlo * MiB, (mlo + mspan) * MiB),
    st.integers(10, 1000), st.integers(0, 3000), st.integers(1, 64), st.integers(0, 512))

sample_st = st.tuples(
    st.just("sample"), st.floats(0, 1), st.floats(0, 1.2),
    st.sampled_from([0.0, 0.0, 0.3, 5.0, 50.0]), st.sampled_from([0.0, 0.0, 20.0]),
    st.sampled_from([1.0, 10.0, 30.0, 100.0]))
# A run of quiet samples, so that lowerings, reclaim waits and watches really happen.
idle_run_st = st.builds(
    lambda n, frac, cpu, dt: [("sample", frac, cpu, 0.0, 0.0, dt)] * n,
    st.integers(1, 12), st.sampled_from([0.0, 0.02, 0.1, 0.3, 0.45]),
    st.sampled_from([0.0, 0.1, 0.3]), st.sampled_from([10.0, 30.0]))
obs_st = st.one_of(
    idle_run_st, st.lists(sample_st, min_size=1, max_size=3),
    st.tuples(st.just("pressure"), st.sampled_from(["memory", "cpu"])).map(lambda x: [x]),
    st.tuples(st.just("events"), st.sampled_from(["high", "max", "oom", "oom_kill", "none"]))
    .map(lambda x: [x]),
    st.tuples(st.just("pin"), st.floats(0, 1), st.floats(0, 1)).map(lambda x: [x]),
    st.just([("unpin",)]),
)


def _raises(acts: list[Action], res: str) -> bool:
    kinds = (SetCpuMax,) if res == "cpu" else (SetMemoryHigh, SetMemoryMax)
    return any(isinstance(a, kinds) and a.new > a.old for a in acts)


@settings(max_examples=300, deadline=None)
@given(bounds_st, st.lists(st.tuples(obs_st, st.booleans()), max_size=60))
def test_invariants_over_random_observations(
        b: Bounds, runs: list[tuple[list[tuple[object, ...]], bool]]) -> None:
    steps = [(obs, ok) for run, ok in runs for obs in run]
    cfg = TunerConfig()
    s = start("c", b, 32)
    kernel = {"cpu": s.size.cpu, "high": s.size.memory_high, "max": s.size.memory_max}
    held = s.held
    t, usec, current = 0.0, 0, 0
    counts = {"high": 0, "max": 0, "oom": 0, "oom_kill": 0}
    since = {"cpu": 10**9, "memory": 10**9}  # samples since the last change (per resource)
    cooldown_from = float("-inf")
    lowering_at = 0
    for (kind, *args), ok in steps:
        gate = Gate(ok=ok)
        t += 1.0
        obs: Sample | PressureTriggered | MemoryEvents
        if kind == "sample":
            frac, cpu_frac, mavg, cavg, dt = args
            t += float(dt)  # type: ignore[arg-type]
            current = min(int(frac * b.memory_hi), kernel["max"])  # type: ignore[operator]
            usec += int(cpu_frac * kernel["cpu"] * 1000 * dt)  # type: ignore[operator]
            obs = Sample(usec, current, mavg, cavg, t)  # type: ignore[arg-type]
        elif kind == "pressure":
            obs = PressureTriggered(args[0], t)  # type: ignore[arg-type]
        elif kind == "events":
            if args[0] != "none":
                counts[args[0]] += 1  # type: ignore[index]
            obs = MemoryEvents(**counts, at=t)
        elif kind == "pin":
            mx = b.memory_lo + int(args[1] * (b.memory_hi - b.memory_lo))  # type: ignore[operator]
            size = Size(b.cpu_lo + int(args[0] * (b.cpu_hi - b.cpu_lo)),  # type: ignore[operator]
                        max(b.memory_lo, mx * 3 // 4), mx)
            try:
                s, acts = pin(s, size, b, gate)
            except PinRefused:
                assert size.memory_max < current or not ok
                continue
            for a in acts:
                if isinstance(a, SetLimits):
                    kernel = {"cpu": a.new.cpu, "high": a.new.memory_high,
                              "max": a.new.memory_max}
                elif isinstance(a, Commit):
                    held = a.new
            continue
        else:
            s = unpin(s)
            continue
        before = s
        s, acts = decide(s, obs, b, gate, t)
        if before.pinned:
            assert acts == []
        if isinstance(obs, PressureTriggered) and not before.pinned:
            below = (before.size.cpu < b.cpu_hi if obs.resource == "cpu"
                     else before.size.memory_max < b.memory_hi
                     or before.size.memory_high < high_for(b.memory_hi, b, cfg))
            if below:
                assert _raises(acts, obs.resource) or (
                    not ok and any(isinstance(a, RecordRefusal) for a in acts))
        if isinstance(obs, Sample):
            since = {k: v + 1 for k, v in since.items()}
        for a in acts:
            if isinstance(a, Commit):
                assert a.old == held and a.new - a.old in gate.asked
                held = a.new
                continue
            if isinstance(a, RecordRefusal):
                assert not ok
                continue
            assert not isinstance(a, SetLimits)
            res = "cpu" if isinstance(a, SetCpuMax) else "memory"
            key = {SetCpuMax: "cpu", SetMemoryHigh: "high", SetMemoryMax: "max"}[type(a)]
            assert kernel[key] == a.old  # actions describe the real transition
            kernel[key] = a.new
            lo, hi = (b.cpu_lo, b.cpu_hi) if res == "cpu" else (b.memory_lo, b.memory_hi)
            if isinstance(a, SetMemoryHigh):  # below the maximum it may sit under memory_lo
                assert 0 < a.new <= hi        # (high_for: an early warning at the floor)
            else:
                assert lo <= a.new <= hi
            assert kernel["high"] <= kernel["max"]  # after every single write
            if isinstance(a, SetMemoryMax) and a.new < a.old:
                assert a.new >= current  # never OOM-kill by lowering
            if a.reason == "idle":
                assert since[res] >= cfg.idle_samples  # hysteresis
                assert t >= cooldown_from + cfg.cooldown_s
                if isinstance(a, SetMemoryHigh):
                    assert a.new >= current
                    lowering_at = current
            if isinstance(a, SetMemoryMax) and a.reason == "reclaimed":  # use plus headroom
                assert a.new >= min(a.old, lowering_at + max(
                    int(lowering_at * cfg.memory_headroom_ratio), cfg.memory_headroom_min))
            if a.new > a.old or a.reason == "idle":
                since[res] = 0
            if a.reason.startswith("rollback"):
                cooldown_from = t
        # The lowering's phase holds exactly its data.
        assert (s.lowering.phase is Phase.RECLAIMING) == (s.pending is not None)
        assert (s.lowering.phase is Phase.WATCHING) == (s.watch is not None)
        # The state mirrors the kernel, and admission always holds at least the size.
        assert (s.size.cpu, s.size.memory_high, s.size.memory_max) == (
            kernel["cpu"], kernel["high"], kernel["max"])
        assert s.held == held and commitment(s.size, 32).fits_in(held)


# -- when samples are worth taking ------------------------------------------------------------

def test_a_cell_at_its_lower_bounds_or_pinned_wants_no_samples() -> None:
    low = start("web", B, 64)
    assert not wants_samples(low, B)
    assert wants_samples(big(), B)  # memory above its floor: a lowering may come
    assert wants_samples(replace(low, size=replace(low.size, cpu=B.cpu_lo + 1)), B)
    assert not wants_samples(replace(big(), pinned=True), B)
    # a lowering in flight needs its phase-2 sample even at the bounds
    pending = PendingLower(low.size.memory_high, low.size.memory_max, low.size.memory_max)
    assert wants_samples(replace(low, lowering=Lowering(Phase.RECLAIMING, pending)), B)


def test_a_raise_makes_a_quiet_cell_want_samples_again() -> None:
    low = start("web", B, 64)
    raised, acts = decide(low, PressureTriggered("memory", 1.0), B, Gate(), 1.0)
    assert acts and wants_samples(raised, B)


@given(st.integers(0, 40), st.floats(1.0, 10.0), st.floats(10.0, 120.0))
def test_samples_back_off_while_they_change_nothing(n: int, base: float, ceiling: float
                                                   ) -> None:
    """A busy cell above its floor: each sample resets the idle counts and changes
    nothing, so the interval doubles from ``base`` up to ``ceiling`` and stays there."""
    busy = replace(big(), last_sample=sample(0.0, 190 * MiB))
    interval = base
    for _ in range(n):
        interval = next_interval(interval, busy, busy, False, B, base, ceiling)
    assert interval == min(ceiling, max(base, base * 2 ** n))


def test_progress_keeps_the_base_interval() -> None:
    s = replace(big(), last_sample=sample(0.0, 2 * MiB))
    counting = replace(s, memory_idle=s.memory_idle + 1)
    assert next_interval(40.0, s, counting, False, B, 5.0, 60.0) == 5.0  # idle, room to lower
    assert next_interval(40.0, s, s, True, B, 5.0, 60.0) == 5.0           # it acted
    # idle, but its use keeps memory where it is and cpu is at its floor: no progress
    full = replace(s, last_sample=sample(0.0, 195 * MiB))
    assert next_interval(5.0, full, replace(full, memory_idle=1, cpu_idle=1), False, B,
                         5.0, 60.0) == 10.0


def test_a_growing_working_set_is_not_idle_however_far_below_its_limit() -> None:
    """Use well under half of memory.high, but growing 1 MiB a sample: no lowering (it
    would cut under a working set still being built); once it stops growing, it is."""
    mem = 10 * MiB
    s, gate = replace(big(), last_sample=sample(-1.0, mem)), Gate()
    for i in range(CFG.idle_samples * 3):
        mem += MiB
        s, acts = decide(s, sample(float(i), mem), B, gate, float(i))
        assert acts == [] and s.memory_idle == 0
    t = float(CFG.idle_samples * 3)
    for _ in range(CFG.idle_samples + 1):
        s, acts = decide(s, sample(t, mem), B, gate, t)
        t += 1.0
        if acts:
            break
    assert any(isinstance(a, SetMemoryHigh) and a.reason == "idle" for a in acts)


# -- the lowering's state machine (agent.core.lowering) ----------------------------------------

def test_every_phase_is_reachable_and_every_step_used() -> None:
    assert {p for (p, _) in TRANSITIONS} | set(TRANSITIONS.values()) == set(Phase)
    assert {s for (_, s) in TRANSITIONS} == set(Step)


@pytest.mark.parametrize(("phase", "step"), [(p, s) for p in Phase for s in Step
                                              if (p, s) not in TRANSITIONS])
def test_an_illegal_step_is_named_and_changes_nothing(phase: Phase, step: Step) -> None:
    pending = PendingLower(1, 2, 1) if phase is Phase.RECLAIMING else None
    watch = Watch(1, 2, 10.0) if phase is Phase.WATCHING else None
    low = Lowering(phase, pending, watch, 5.0)
    with pytest.raises(LoweringError) as info:
        low.step("web", step)
    assert info.value.code == "E_STATE" and step.value in info.value.message
    assert phase.value in info.value.message and low == Lowering(phase, pending, watch, 5.0)


def test_a_watch_and_a_cooldown_expire_with_time_only() -> None:
    w = Lowering(Phase.WATCHING, watch=Watch(1, 2, 10.0))
    assert w.expire("c", 10.0) == w and w.in_flight(10.0)
    assert w.expire("c", 10.5).phase is Phase.STEADY and not w.in_flight(10.5)
    c = Lowering(Phase.COOLDOWN, cooldown_until=20.0)
    assert c.expire("c", 19.9) == c and c.expire("c", 20.0).phase is Phase.STEADY


def test_a_lowering_walks_the_table_through_the_tuner() -> None:
    s, gate = big(), Gate()
    s, t, _ = idle_until_lowered(s, 0.0, 40 * MiB, gate)
    assert s.lowering.phase is Phase.RECLAIMING
    s, _ = decide(s, sample(t + 10, 40 * MiB), B, gate, t + 10)
    assert s.lowering.phase is Phase.WATCHING
    s, _ = decide(s, MemoryEvents(0, 0, 0, 0, t + 11), B, gate, t + 11)
    s, acts = decide(s, MemoryEvents(0, 1, 0, 0, t + 12), B, gate, t + 12)
    assert acts and s.lowering.phase is Phase.COOLDOWN
    s, _ = decide(s, sample(t + 13 + CFG.cooldown_s, 40 * MiB), B, gate, t + 13 + CFG.cooldown_s)
    assert s.lowering.phase is Phase.STEADY


def test_docs_draw_the_lowering_table() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs/tuner.md").read_text()
    assert render_mermaid() in doc, (
        "docs/tuner.md is stale: paste the output of `python -m agent.core.lowering`")
