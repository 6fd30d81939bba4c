"""The tuner (design step D): per-cell resize decisions, pure.

:func:`decide` takes a cell's frozen :class:`TunerState`, one observation
(:class:`PressureTriggered`, :class:`MemoryEvents` or :class:`Sample`), the cell's
:class:`Bounds`, a :class:`BudgetView` and the time, and returns the new state and
the :data:`Action`\\ s the daemon turns into cgroup writes, ``tuner`` events and
journal records, *in list order*.  Nothing here does I/O.

Rules (numbers in :class:`TunerConfig`, reasons in docs/tuner.md):

* raise at once under pressure, by ``max(25 % of the span, 50 % of the current
  limit)``, capped at the manifest maximum; raising memory writes ``memory.max``
  before ``memory.high`` so that ``high <= max`` holds after every write;
* lower only after ``idle_samples`` consecutive idle samples (memory: use below half of
  ``memory.high``, no pressure, and not growing: a working set still being built is not
  idle, however far below its limit), by at most 1/8 of
  the span, never below the minimum nor below use plus headroom;
* lower memory in two phases: ``memory.high`` first; ``memory.max`` only after a
  sample shows ``memory.current <= memory.high``; give up (restore) if the kernel
  has not reclaimed within ``reclaim_wait_samples`` samples;
* for ``watch_s`` after lowering ``memory.max``, any memory trouble (events high,
  max, oom, oom_kill, or a pressure trigger) rolls back to the previous values
  and starts a ``cooldown_s`` with no lowering;
* a raise beyond what admission already holds for the cell asks the
  :class:`BudgetView`; if refused, a :class:`RecordRefusal` with the numbers is
  the only action.  The budget is *returned* by the reclaim loop, only once the
  lowering is settled (see :func:`settled` and agent/core/reclaim.py);
* a pinned cell gets no automatic change.
"""

from __future__ import annotations

from dataclasses import replace

from agent.core.budget import Amount
from agent.core.errors import RefusedError
from agent.core.lowering import PendingLower, Phase, Step, Watch
from agent.core.tunerstate import (
    DEFAULT_CONFIG,
    Action,
    Bounds,
    BudgetView,
    Commit,
    MemoryEvents,
    Observation,
    RecordRefusal,
    Resource,
    Sample,
    SetCpuMax,
    SetLimits,
    SetMemoryHigh,
    SetMemoryMax,
    Size,
    TunerConfig,
    TunerState,
)

__all__ = ["PinRefused", "check_pin", "commitment", "decide", "high_for", "initial_size",
           "next_interval", "pin", "settled", "start", "unpin", "wants_samples"]

class PinRefused(RefusedError):
    """An operator's pin does not fit the bounds or the budget."""


def high_for(memory_max: int, bounds: Bounds, config: TunerConfig) -> int:
    """``memory.high`` for a ``memory.max``: ``high_gap_ratio`` below it, so that the
    kernel throttles and reports ``high`` events before the hard limit bites and the
    tuner can raise in time.  That early warning matters most at the floor: with
    ``high == max`` a working set growing past the minimum meets the OOM killer within
    milliseconds, before any notification reaches the tuner (seen in the box).  So below
    the maximum the gap is kept even under ``memory_lo``; only at the maximum, where no
    raise can follow, ``high`` stays at or above ``memory_lo``."""
    high = memory_max - int(memory_max * config.high_gap_ratio)
    return high if memory_max < bounds.memory_hi else max(bounds.memory_lo, high)


def initial_size(bounds: Bounds, memory_current: int, config: TunerConfig) -> Size:
    """Where tuning starts.

    By default (``config.start == "max"``) at the manifest's maximum, which the create
    plan already wrote.  Starting low would set memory.max below a working set that is
    still being built (a service allocates its start-up memory in milliseconds, faster
    than any trigger window), and the kernel would OOM-kill a cell that fits its
    maximum.  So a cell starts with all it may have and is lowered gradually, with
    hysteresis, once it is seen idle (two-phase: memory.high first, memory.max after
    the kernel reclaimed); the budget it frees goes back to admission once the lowering
    has settled.  ``start == "low"``: the lower bounds, but never below what the cell
    uses plus the tuner's headroom (for boxes that prefer packing to safety)."""
    if config.start == "max":
        return Size(bounds.cpu_hi, high_for(bounds.memory_hi, bounds, config), bounds.memory_hi)
    need = memory_current + max(int(memory_current * config.memory_headroom_ratio),
                                config.memory_headroom_min)
    mem = min(bounds.memory_hi, max(bounds.memory_lo, need))
    return Size(bounds.cpu_lo, high_for(mem, bounds, config), mem)


def commitment(size: Size, pids: int) -> Amount:
    """What admission must hold for a cell of this size: its cpu.max and memory.max."""
    return Amount(size.cpu, size.memory_max, pids)


def start(cell: str, bounds: Bounds, pids: int, config: TunerConfig = DEFAULT_CONFIG
          ) -> TunerState:
    """A cell started at its lower bounds; admit it with ``commitment(state.size, pids)``."""
    size = Size(bounds.cpu_lo, high_for(bounds.memory_lo, bounds, config), bounds.memory_lo)
    return TunerState(cell, size, commitment(size, pids))


def settled(state: TunerState, now: float) -> bool:
    """No lowering in flight and none that may still roll back: freed budget may go."""
    return not state.lowering.in_flight(now)


def wants_samples(state: TunerState, bounds: Bounds) -> bool:
    """Whether a periodic sample can still change anything for this cell.

    Samples serve only the lowering (idle counting, phase 2 of a memory lowering, and
    the sample-pressure raise that backs up a missed trigger).  A cell at its lower
    bounds with no lowering in flight, or a pinned one, has nothing a sample could
    lower: it is quiet, and only its PSI triggers and ``memory.events`` (raises) wake
    the tuner for it.  (A kernel without triggers samples every cell: agent.daemon.tuner.)"""
    if state.pinned:
        return False
    if state.lowering.phase is Phase.RECLAIMING:
        return True
    return state.size.cpu > bounds.cpu_lo or state.size.memory_max > bounds.memory_lo


def _memory_room(state: TunerState, bounds: Bounds, config: TunerConfig) -> bool:
    """Could an idle memory lowering go anywhere, given the last sample's use?"""
    cur = state.last_sample.memory_current if state.last_sample is not None else 0
    floor = cur + max(int(cur * config.memory_headroom_ratio), config.memory_headroom_min)
    return state.size.memory_max > max(bounds.memory_lo, floor)


def next_interval(interval: float, before: TunerState, after: TunerState, acted: bool,
                  bounds: Bounds, base: float, ceiling: float,
                  config: TunerConfig = DEFAULT_CONFIG) -> float:
    """The wait before a cell's next sample: ``base`` while samples make progress (an
    action, a lowering in flight, idle counts going up towards a lowering that has room
    to happen), doubled up to ``ceiling`` while they do not (a busy cell above its
    floor, or an idle one whose use keeps it where it is).  Any trigger or memory event
    brings the cell back to ``base`` (agent.daemon.tuner)."""
    progress = (acted or after.lowering.phase is Phase.RECLAIMING
                or (after.cpu_idle > before.cpu_idle and after.size.cpu > bounds.cpu_lo)
                or (after.memory_idle > before.memory_idle
                    and _memory_room(after, bounds, config)))
    return base if progress else min(ceiling, max(base, interval * 2))


# -- decisions ------------------------------------------------------------------------------

def _up(cur: int, lo: int, hi: int, config: TunerConfig) -> int:
    step = max(int((hi - lo) * config.raise_span_fraction), int(cur * (config.raise_factor - 1)))
    return min(hi, cur + max(step, 1))


def _grow(state: TunerState, size: Size, resource: Resource, reason: str,
          budget: BudgetView, changes: list[Action]) -> tuple[TunerState, list[Action]]:
    """Apply a raise to ``size`` if the budget allows; ``changes`` are its writes."""
    want = commitment(size, state.held.pids)
    need = Amount(max(0, want.cpu - state.held.cpu), max(0, want.memory - state.held.memory), 0)
    actions: list[Action] = []
    held = state.held
    if need != Amount():
        verdict = budget.can_grow(state.cell, need)
        if not verdict:
            cur, new = ((state.size.cpu, size.cpu) if resource == "cpu"
                        else (state.size.memory_max, size.memory_max))
            why = f"{reason}: {verdict.reason}" if verdict.reason else reason
            return state, [RecordRefusal(state.cell, why, resource, cur, new, need)]
        held = held + need
        actions.append(Commit(state.cell, reason, state.held, held))
    state = replace(state, size=size, held=held)
    state = (replace(state, cpu_idle=0) if resource == "cpu" else replace(state, memory_idle=0))
    return state, actions + changes


def _raise(state: TunerState, resource: Resource, reason: str, bounds: Bounds,
           budget: BudgetView, config: TunerConfig, now: float
           ) -> tuple[TunerState, list[Action]]:
    s, cell = state.size, state.cell
    if resource == "cpu":
        new = _up(s.cpu, bounds.cpu_lo, bounds.cpu_hi, config)
        if new <= s.cpu:
            return state, []
        return _grow(state, replace(s, cpu=new), "cpu", reason, budget,
                     [SetCpuMax(cell, reason, s.cpu, new)])
    if state.lowering.in_flight(now):
        return _rollback(state, reason, config, now)
    new_max = _up(s.memory_max, bounds.memory_lo, bounds.memory_hi, config)
    new_high = high_for(new_max, bounds, config)
    changes: list[Action] = []
    if new_max > s.memory_max:
        changes.append(SetMemoryMax(cell, reason, s.memory_max, new_max))
    if new_high > s.memory_high:
        changes.append(SetMemoryHigh(cell, reason, s.memory_high, new_high))
    if not changes:
        return state, []
    size = replace(s, memory_high=max(new_high, s.memory_high), memory_max=new_max)
    return _grow(state, size, "memory", reason, budget, changes)


def _rollback(state: TunerState, why: str, config: TunerConfig, now: float
              ) -> tuple[TunerState, list[Action]]:
    """Undo the memory lowering in flight: no budget needed, admission still holds it."""
    s, cell = state.size, state.cell
    prev = state.pending or state.watch
    assert prev is not None
    reason = f"rollback:{why}"
    actions: list[Action] = []
    if prev.prev_max > s.memory_max:
        actions.append(SetMemoryMax(cell, reason, s.memory_max, prev.prev_max))
    if prev.prev_high > s.memory_high:
        actions.append(SetMemoryHigh(cell, reason, s.memory_high, prev.prev_high))
    size = replace(s, memory_high=max(s.memory_high, prev.prev_high),
                   memory_max=max(s.memory_max, prev.prev_max))
    step = Step.GIVE_UP if why == "not-reclaimed" else Step.TROUBLE
    state = state.lower(step, cooldown_until=now + config.cooldown_s)
    return replace(state, size=size, memory_idle=0, cpu_idle=0), actions


def _on_events(state: TunerState, ev: MemoryEvents, bounds: Bounds, budget: BudgetView,
               config: TunerConfig) -> tuple[TunerState, list[Action]]:
    last = state.events
    state = replace(state, events=ev)
    if last is None or state.pinned:
        return state, []
    delta = {k: getattr(ev, k) - getattr(last, k) for k in ("high", "max", "oom", "oom_kill")}
    if any(v < 0 for v in delta.values()):
        return state, []  # counters went back: the cgroup was re-created; new baseline
    trouble = [k for k in ("max", "oom", "oom_kill") if delta[k] > 0]
    if delta["high"] > 0 and state.lowering.phase is not Phase.RECLAIMING:
        # (phase 1 throttles at memory.high on purpose)
        trouble.insert(0, "high")
    if not trouble:
        return state, []
    return _raise(state, "memory", "events:" + ",".join(trouble), bounds, budget, config, ev.at)


def _lower_memory(state: TunerState, cur: int, bounds: Bounds, config: TunerConfig,
                  ) -> tuple[TunerState, list[Action]]:
    s = state.size
    floor = cur + max(int(cur * config.memory_headroom_ratio), config.memory_headroom_min)
    step = int((bounds.memory_hi - bounds.memory_lo) * config.lower_span_fraction)
    new_max = min(s.memory_max, max(bounds.memory_lo, floor, s.memory_max - max(step, 1)))
    new_high = min(new_max, max(cur, high_for(new_max, bounds, config)))
    if new_max >= s.memory_max or new_high >= s.memory_high:
        return replace(state, memory_idle=0), []
    pending = PendingLower(s.memory_high, s.memory_max, new_max)
    return (replace(state.lower(Step.LOWER_HIGH, pending=pending),
                    size=replace(s, memory_high=new_high), memory_idle=0),
            [SetMemoryHigh(state.cell, "idle", s.memory_high, new_high)])


def _continue_lowering(state: TunerState, cur: int, now: float, config: TunerConfig
                       ) -> tuple[TunerState, list[Action]]:
    """Phase 2 of a memory lowering (``memory.max`` once use is under ``memory.high``),
    another wait, or giving up on it."""
    p = state.pending
    if p is None:
        return state, []
    if cur <= state.size.memory_high:
        new_max = max(p.new_max, cur)
        act = SetMemoryMax(state.cell, "reclaimed", state.size.memory_max, new_max)
        state = replace(state.lower(Step.RECLAIMED,
                                    watch=Watch(p.prev_high, p.prev_max, now + config.watch_s)),
                        size=replace(state.size, memory_max=new_max))
        return state, [act]
    if p.samples + 1 >= config.reclaim_wait_samples:
        return _rollback(state, "not-reclaimed", config, now)
    return state.lower(Step.WAIT, pending=replace(p, samples=p.samples + 1)), []


def _raise_on_pressure(state: TunerState, smp: Sample, bounds: Bounds, budget: BudgetView,
                       config: TunerConfig) -> tuple[TunerState, list[Action], set[Resource]]:
    """A sample under pressure raises (kernels without triggers, missed triggers); returns
    the resources found busy too."""
    busy: set[Resource] = set()
    actions: list[Action] = []
    checks: tuple[tuple[Resource, float], ...] = (("memory", smp.memory_some_avg10),
                                                  ("cpu", smp.cpu_some_avg10))
    for res, avg in checks:
        if avg > config.sample_raise_avg10:
            busy.add(res)
            state, more = _raise(state, res, "sample-pressure", bounds, budget, config, smp.at)
            actions += more
    return state, actions, busy


def _cpu_rate(prev: Sample | None, smp: Sample) -> float | None:
    """Millicores used between two samples (None without a usable earlier sample)."""
    if prev is None or smp.at <= prev.at or smp.cpu_usage_usec < prev.cpu_usage_usec:
        return None
    return (smp.cpu_usage_usec - prev.cpu_usage_usec) / (smp.at - prev.at) / 1000.0


def _count_idle(state: TunerState, prev: Sample | None, smp: Sample, busy: set[Resource],
                rate: float | None, config: TunerConfig) -> TunerState:
    """One more idle sample per resource, or back to zero.  Memory is not idle while it
    grows, however far below its limit: a working set still being built."""
    s = state.size
    growing = prev is not None and smp.memory_current > prev.memory_current + config.idle_growth_max
    mem_idle = ("memory" not in busy and not growing
                and smp.memory_current < s.memory_high * config.idle_usage_ratio
                and smp.memory_some_avg10 <= config.idle_pressure_avg10)
    cpu_idle = ("cpu" not in busy and rate is not None and rate < s.cpu * config.idle_usage_ratio
                and smp.cpu_some_avg10 <= config.idle_pressure_avg10)
    return replace(state, memory_idle=state.memory_idle + 1 if mem_idle else 0,
                   cpu_idle=state.cpu_idle + 1 if cpu_idle else 0)


def _lower_when_idle(state: TunerState, cur: int, rate: float | None, bounds: Bounds,
                     config: TunerConfig, now: float) -> tuple[TunerState, list[Action]]:
    """Gradual lowering after ``idle_samples`` idle samples, outside a cooldown: memory
    through the lowering machine (not while one is pending or watched), cpu at once."""
    actions: list[Action] = []
    if now < state.cooldown_until:
        return state, actions
    if (state.memory_idle >= config.idle_samples and state.pending is None
            and (state.watch is None or now > state.watch.until)):
        state, more = _lower_memory(state, cur, bounds, config)
        actions += more
    if state.cpu_idle >= config.idle_samples and rate is not None:
        s = state.size
        floor = int(rate * (1 + config.cpu_headroom_ratio)) + 1
        step = max(1, int((bounds.cpu_hi - bounds.cpu_lo) * config.lower_span_fraction))
        new = min(s.cpu, max(bounds.cpu_lo, floor, s.cpu - step))
        if new < s.cpu:
            actions.append(SetCpuMax(state.cell, "idle", s.cpu, new))
            state = replace(state, size=replace(s, cpu=new))
        state = replace(state, cpu_idle=0)
    return state, actions


def _on_sample(state: TunerState, smp: Sample, bounds: Bounds, budget: BudgetView,
               config: TunerConfig) -> tuple[TunerState, list[Action]]:
    """A periodic sample, in named steps: continue a lowering, raise what is under
    pressure, count idle samples, lower what has been idle long enough."""
    prev = state.last_sample
    state = replace(state, last_sample=smp)
    if state.pinned:
        return state, []
    state, actions = _continue_lowering(state, smp.memory_current, smp.at, config)
    state, raised, busy = _raise_on_pressure(state, smp, bounds, budget, config)
    rate = _cpu_rate(prev, smp)
    state = _count_idle(state, prev, smp, busy, rate, config)
    state, lowered = _lower_when_idle(state, smp.memory_current, rate, bounds, config, smp.at)
    return state, actions + raised + lowered


def decide(state: TunerState, obs: Observation, bounds: Bounds, budget: BudgetView,
           now: float, config: TunerConfig = DEFAULT_CONFIG) -> tuple[TunerState, list[Action]]:
    """One step of the tuner; see the module docstring for the rules."""
    at = obs.at if isinstance(obs, Sample | MemoryEvents) else now
    state = replace(state, lowering=state.lowering.expire(state.cell, at))
    if isinstance(obs, Sample):
        return _on_sample(state, obs, bounds, budget, config)
    if isinstance(obs, MemoryEvents):
        return _on_events(state, obs, bounds, budget, config)
    if state.pinned:
        return state, []
    return _raise(state, obs.resource, "pressure", bounds, budget, config, now)


# -- operator -------------------------------------------------------------------------------

def check_pin(cell: str, size: Size, bounds: Bounds, in_use: int) -> None:
    """A pinned size must lie within the bounds (``memory_high <= memory_max``) and not
    below what the cell uses; else :class:`PinRefused`.  (The budget is :func:`pin`'s.)"""
    if not (bounds.cpu_lo <= size.cpu <= bounds.cpu_hi
            and 0 < size.memory_high <= size.memory_max
            and bounds.memory_lo <= size.memory_max <= bounds.memory_hi):
        raise PinRefused("E_PIN_BOUNDS", f"cell {cell}: pin {size} is outside the manifest's "
                         f"bounds {bounds} or has memory_high above memory_max",
                         "pin a size between the manifest's minimum and maximum")
    if size.memory_max < in_use:
        raise PinRefused("E_PIN_BELOW_USE", f"cell {cell}: pin memory_max {size.memory_max} "
                         f"is below the cell's current use {in_use}",
                         "a lower memory_max would OOM-kill the cell; pin a larger size")


def pin(state: TunerState, size: Size, bounds: Bounds, budget: BudgetView
        ) -> tuple[TunerState, list[Action]]:
    """Fix the cell's size (``agentctl pin``); raises :class:`PinRefused` if it cannot be."""
    cell = state.cell
    in_use = state.last_sample.memory_current if state.last_sample else 0
    check_pin(cell, size, bounds, in_use)
    want = commitment(size, state.held.pids)
    need = Amount(max(0, want.cpu - state.held.cpu), max(0, want.memory - state.held.memory), 0)
    actions: list[Action] = []
    held = state.held
    if need != Amount():
        verdict = budget.can_grow(cell, need)
        if not verdict:
            raise PinRefused("E_PIN_BUDGET", verdict.reason or f"cell {cell}: no budget",
                             "stop a cell or pin a smaller size")
        held = held + need
        actions.append(Commit(cell, "pin", state.held, held))
    actions.append(SetLimits(cell, "pin", state.size, size))
    return replace(state.lower(Step.PIN), size=size, held=held, pinned=True, cpu_idle=0,
                   memory_idle=0), actions


def unpin(state: TunerState) -> TunerState:
    return replace(state, pinned=False, cpu_idle=0, memory_idle=0)
