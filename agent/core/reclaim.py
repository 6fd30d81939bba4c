"""The host's reclaim loop (design step J), pure.

:func:`reclaim_pass` looks at every cell (:class:`CellView`) and the box
(:class:`BoxView`) and returns the :data:`Action`\\ s the daemon carries out in
list order, each one also a ``reclaim`` event; :func:`summarize` says what a
pass reclaimed.  Nothing here does I/O.  A pass, in order:

1. **Orphans.**  A kernel object (cgroup, veth, VLAN entry, netns file, mount,
   nftables table) whose owning cell is not in the journal, and that has been
   seen for at least ``orphan_grace_s``, is collected (:class:`CollectOrphan`),
   in teardown order: mounts, nftables, VLAN entries, veths, netns, cgroups.
   The journal records a cell before any of its objects exist (plan, then
   execute), and the grace period covers the rest of a creation in flight.
2. **Budget.**  Admission holds, per cell, the commitment the tuner was granted
   (``TunerState.held``: cpu.max and memory.max, at least the manifest's
   minimums).  When the tuner has lowered a cell and the lowering is *settled*
   (``tuner.settled``: memory.max written and past its rollback watch), the
   difference between what admission holds and the cell's current commitment
   is returned: :class:`ReturnBudget` tells the daemon to
   ``Budget.replace(Request(cell, new))`` and set ``TunerState.held = new``.
   Nothing is returned while a lowering may still roll back, so a rollback never
   needs budget that another cell has since been admitted with.
3. **Escalation** under whole-box memory pressure (``some avg10`` above
   ``pressure_on_avg10``): the lowest-priority cell not yet stopped (ties: the
   largest) is throttled (:class:`Throttle`: cpu.max to its floor, memory.high
   to 3/4 of its use), then frozen if the pressure persists ``escalate_after_s``,
   then stopped after as long again; only then does the next cell start down
   the ladder.  One step per pass.  Cells at or above ``exempt_priority`` are
   never escalated.  Below ``pressure_off_avg10`` every escalated cell goes one
   step back per pass, highest priority first (:class:`Thaw`, then
   :class:`Unthrottle`); in between, nothing changes (hysteresis).
4. **Memory reclaim** from idle cells where the kernel has ``memory.reclaim``:
   a quarter of what the cell uses above its floor, at most once a minute.
5. **cpu.weight** by priority: :func:`weight_for`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import Literal

from agent.core.budget import Amount

__all__ = [
    "ORPHAN_ORDER", "Action", "BoxView", "CellView", "CollectOrphan", "Freeze", "KernelObject",
    "Level", "MemoryReclaim", "ReclaimConfig", "ReclaimSummary", "ReturnBudget",
    "SetCpuWeight", "Stop", "Thaw", "Throttle", "Unthrottle", "apply", "next_pass_at",
    "reclaim_pass", "summarize", "weight_for",
]

MiB = 1 << 20
Level = Literal["none", "throttled", "frozen", "stopped"]
ObjectKind = Literal["mount", "nftables", "vlan", "veth", "netns", "cgroup"]
ORPHAN_ORDER: tuple[ObjectKind, ...] = ("mount", "nftables", "vlan", "veth", "netns", "cgroup")


@dataclass(frozen=True)
class ReclaimConfig:
    pressure_on_avg10: float = 20.0   # box memory some avg10 (%) that starts escalation
    pressure_off_avg10: float = 5.0   # ... and that ends it
    escalate_after_s: float = 10.0    # how long each rung holds before the next
    exempt_priority: int = 90         # cells at or above are never escalated
    throttle_high_ratio: float = 0.75  # Throttle: memory.high to this share of use
    reclaim_fraction: float = 0.25    # of what an idle cell uses above its floor
    reclaim_min: int = 1 * MiB        # smaller reclaims are not worth a write
    reclaim_interval_s: float = 60.0
    orphan_grace_s: float = 30.0


@dataclass(frozen=True)
class CellView:
    """What the loop needs to know of a cell (from the tuner's state and the cgroup)."""

    cell: str
    priority: int
    cpu_min: int            # guarantee (millicpu): a floor under the weight
    cpu_lo: int             # lowest cpu.max (tuner bounds)
    memory_lo: int          # lowest memory.max (tuner bounds)
    held: Amount            # what admission holds for the cell
    grant: Amount           # tuner.commitment of its current size
    settled: bool           # tuner.settled(state, now)
    idle: bool
    memory_current: int
    cpu_max: int            # the tuner's cpu.max (restored by Unthrottle)
    memory_high: int        # the tuner's memory.high (restored by Unthrottle)
    cpu_weight: int
    level: Level = "none"
    level_since: float = 0.0
    last_reclaim_at: float = -math.inf
    settle_at: float = -math.inf  # when an unsettled lowering settles (its watch ends)


@dataclass(frozen=True)
class KernelObject:
    """An agent-owned kernel object found by a scan.  ``cell`` is its owner as its name
    says (None if unreadable); ``seen_since`` is when scans began to see it with no
    journaled owner (the scan's time when its owner is journaled)."""

    kind: ObjectKind
    name: str
    cell: str | None
    seen_since: float


@dataclass(frozen=True)
class BoxView:
    memory_some_avg10: float | None  # /proc/pressure/memory; None without PSI
    has_memory_reclaim: bool
    journaled: frozenset[str]
    objects: tuple[KernelObject, ...] = ()


# -- actions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Action:
    cell: str | None
    reason: str

    @property
    def kind(self) -> str:
        return type(self).__name__.lower()

    def attrs(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d.pop("cell")
        return d


@dataclass(frozen=True)
class ReturnBudget(_Action):
    old: Amount
    new: Amount


@dataclass(frozen=True)
class MemoryReclaim(_Action):
    bytes: int


@dataclass(frozen=True)
class SetCpuWeight(_Action):
    old: int
    new: int


@dataclass(frozen=True)
class CollectOrphan(_Action):
    object_kind: ObjectKind
    name: str
    age_s: float


@dataclass(frozen=True)
class Throttle(_Action):
    cpu_old: int
    cpu_new: int
    high_old: int
    high_new: int
    avg10: float


@dataclass(frozen=True)
class Freeze(_Action):
    avg10: float
    held_s: float


@dataclass(frozen=True)
class Stop(_Action):
    avg10: float
    held_s: float


@dataclass(frozen=True)
class Thaw(_Action):
    avg10: float


@dataclass(frozen=True)
class Unthrottle(_Action):
    cpu: int
    memory_high: int
    avg10: float


Action = (ReturnBudget | MemoryReclaim | SetCpuWeight | CollectOrphan | Throttle | Freeze
          | Stop | Thaw | Unthrottle)


def weight_for(priority: int, cpu_min: int) -> int:
    """``cpu.weight``: 100 at normal priority (50), doubling every 15 points (low 20 -> 25,
    high 80 -> 400, 99 -> 962, 0 -> 10), never below the planner's guarantee weight
    ``ceil(cpu_min / 10)``; within 1..10000."""
    by_priority = round(100 * 2 ** ((priority - 50) / 15))
    return max(1, min(10_000, max(by_priority, -(-cpu_min // 10))))


# -- the pass -------------------------------------------------------------------------------

def _orphans(box: BoxView, now: float, c: ReclaimConfig) -> list[Action]:
    out: list[CollectOrphan] = []
    for o in box.objects:
        age = now - o.seen_since
        if (o.cell is None or o.cell not in box.journaled) and age >= c.orphan_grace_s:
            why = "no owner in its name" if o.cell is None else f"cell {o.cell} not in journal"
            out.append(CollectOrphan(o.cell, why, o.kind, o.name, age))
    out.sort(key=lambda a: (ORPHAN_ORDER.index(a.object_kind), a.name))
    return list(out)


def _budget(v: CellView) -> list[Action]:
    if not v.settled or v.held.fits_in(v.grant):
        return []
    new = Amount(min(v.held.cpu, v.grant.cpu), min(v.held.memory, v.grant.memory), v.held.pids)
    return [ReturnBudget(v.cell, "tuner lowered the cell", v.held, new)]


def _escalate(cells: list[CellView], avg10: float | None, now: float, c: ReclaimConfig
              ) -> list[Action]:
    if avg10 is None:
        return []
    if avg10 > c.pressure_on_avg10:
        ladder = sorted((v for v in cells if v.priority < c.exempt_priority
                         and v.level != "stopped"),
                        key=lambda v: (v.priority, -v.memory_current, v.cell))
        if not ladder:
            return []
        v = ladder[0]
        why = f"box memory pressure some avg10 {avg10:.1f}% > {c.pressure_on_avg10:g}%"
        held = now - v.level_since
        if v.level == "none":
            high = max(v.memory_lo, min(v.memory_high,
                                        int(v.memory_current * c.throttle_high_ratio)))
            return [Throttle(v.cell, why, v.cpu_max, v.cpu_lo, v.memory_high, high, avg10)]
        if held < c.escalate_after_s:
            return []
        if v.level == "throttled":
            return [Freeze(v.cell, f"{why} for {held:.0f}s", avg10, held)]
        return [Stop(v.cell, f"{why} for {held:.0f}s", avg10, held)]
    if avg10 < c.pressure_off_avg10:
        why = f"box memory pressure cleared: some avg10 {avg10:.1f}% < {c.pressure_off_avg10:g}%"
        out: list[Action] = []
        for v in sorted(cells, key=lambda v: (-v.priority, v.cell)):
            if v.level == "frozen":
                out.append(Thaw(v.cell, why, avg10))
            elif v.level == "throttled":
                out.append(Unthrottle(v.cell, why, v.cpu_max, v.memory_high, avg10))
        return out
    return []


def _reclaim(v: CellView, box: BoxView, now: float, c: ReclaimConfig) -> list[Action]:
    if (not box.has_memory_reclaim or not v.idle or v.level != "none"
            or now - v.last_reclaim_at < c.reclaim_interval_s):
        return []
    amount = int((v.memory_current - v.memory_lo) * c.reclaim_fraction)
    if amount < c.reclaim_min:
        return []
    return [MemoryReclaim(v.cell, f"idle: {v.memory_current} B in use, floor {v.memory_lo} B",
                          amount)]


def reclaim_pass(cells: list[CellView], box: BoxView, now: float,
                 config: ReclaimConfig = ReclaimConfig()) -> list[Action]:
    """One pass of the loop; see the module docstring for the order and the rules."""
    out = _orphans(box, now, config)
    for v in cells:
        out += _budget(v)
    out += _escalate(cells, box.memory_some_avg10, now, config)
    for v in cells:
        out += _reclaim(v, box, now, config)
        want = weight_for(v.priority, v.cpu_min)
        if v.level != "stopped" and want != v.cpu_weight:
            out.append(SetCpuWeight(v.cell, f"priority {v.priority}", v.cpu_weight, want))
    return out


def next_pass_at(cells: list[CellView], box: BoxView, now: float, period_s: float,
                 config: ReclaimConfig = ReclaimConfig()) -> float | None:
    """When a pass could next do something without being woken; None: only an event can
    make one useful (a lifecycle change, a tuner resize, the box's pressure trigger).

    * escalated cells, or box pressure not yet below ``pressure_off_avg10``: every
      ``period_s`` (the ladder moves one rung per pass);
    * a lowering whose budget is still held: when it settles (``settle_at``);
    * an orphan candidate in its grace period: when the grace ends;
    * an idle cell with memory worth reclaiming: when its reclaim interval ends.
    """
    due: list[float] = []
    avg10 = box.memory_some_avg10
    if any(v.level != "none" for v in cells) or (
            avg10 is not None and avg10 >= config.pressure_off_avg10):
        due.append(now + period_s)
    for v in cells:
        if not v.held.fits_in(v.grant) and not v.settled and v.settle_at > now:
            due.append(v.settle_at)
        if (box.has_memory_reclaim and v.idle and v.level == "none"
                and int((v.memory_current - v.memory_lo) * config.reclaim_fraction)
                >= config.reclaim_min):
            due.append(max(now, v.last_reclaim_at + config.reclaim_interval_s))
    for o in box.objects:
        if o.cell is None or o.cell not in box.journaled:
            due.append(max(now, o.seen_since + config.orphan_grace_s))
    return min(due) if due else None


def apply(v: CellView, a: Action, now: float) -> CellView:
    """The view after the daemon carried out ``a`` (what the next pass will see)."""
    if a.cell != v.cell:
        return v
    if isinstance(a, ReturnBudget):
        return replace(v, held=a.new)
    if isinstance(a, MemoryReclaim):
        return replace(v, last_reclaim_at=now)
    if isinstance(a, SetCpuWeight):
        return replace(v, cpu_weight=a.new)
    levels: dict[type, Level] = {Throttle: "throttled", Freeze: "frozen", Stop: "stopped",
                                 Thaw: "throttled", Unthrottle: "none"}
    if type(a) in levels:
        return replace(v, level=levels[type(a)], level_since=now)
    return v


@dataclass(frozen=True)
class ReclaimSummary:
    returned: Amount = dataclasses.field(default_factory=Amount)
    memory_reclaimed: int = 0  # bytes asked of memory.reclaim
    weights: int = 0
    orphans: tuple[tuple[str, int], ...] = ()  # (kind, count)
    escalated: tuple[tuple[str, str], ...] = ()  # (cell, "throttle"|"freeze"|"stop")
    relieved: tuple[tuple[str, str], ...] = ()   # (cell, "thaw"|"unthrottle")

    def attrs(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def summarize(actions: list[Action]) -> ReclaimSummary:
    returned, reclaimed, weights = Amount(), 0, 0
    orphans: Counter[str] = Counter()
    up: list[tuple[str, str]] = []
    down: list[tuple[str, str]] = []
    for a in actions:
        if isinstance(a, ReturnBudget):
            returned = returned + (a.old - a.new)
        elif isinstance(a, MemoryReclaim):
            reclaimed += a.bytes
        elif isinstance(a, SetCpuWeight):
            weights += 1
        elif isinstance(a, CollectOrphan):
            orphans[a.object_kind] += 1
        elif isinstance(a, Throttle | Freeze | Stop):
            up.append((a.cell or "", a.kind))
        elif isinstance(a, Thaw | Unthrottle):
            down.append((a.cell or "", a.kind))
    return ReclaimSummary(returned, reclaimed, weights, tuple(sorted(orphans.items())),
                          tuple(up), tuple(down))
