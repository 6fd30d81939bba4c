"""The tuner's vocabulary (pure data): its configuration, a cell's bounds and size, the
observations it decides on, the actions it returns, the budget gate it asks, and the
per-cell state (:class:`TunerState`, whose memory lowering is :mod:`agent.core.lowering`'s
state machine).  The decisions are in :mod:`agent.core.tuner`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

from agent.core.budget import Amount, Budget
from agent.core.cgroup import CellStats
from agent.core.errors import ConfigError
from agent.core.lowering import Lowering, PendingLower, Step, Watch
from agent.core.manifest import MIN_CPU_MAX, Resources

__all__ = [
    "DEFAULT_CONFIG",
    "Action",
    "Bounds",
    "BudgetGate",
    "BudgetView",
    "Commit",
    "MemoryEvents",
    "MiB",
    "Observation",
    "PressureTriggered",
    "RecordRefusal",
    "Resource",
    "Sample",
    "SetCpuMax",
    "SetLimits",
    "SetMemoryHigh",
    "SetMemoryMax",
    "Size",
    "TunerConfig",
    "TunerState",
    "Verdict",
]

MiB = 1 << 20
Resource = Literal["memory", "cpu"]


@dataclass(frozen=True)
class TunerConfig:
    raise_span_fraction: float = 0.25    # a raise is at least this share of max - min ...
    raise_factor: float = 1.5            # ... or takes the limit to this multiple
    lower_span_fraction: float = 0.125   # a lowering is at most this share of the span
    idle_samples: int = 6                # consecutive idle samples before a lowering
    idle_usage_ratio: float = 0.5        # idle: use below this share of the limit ...
    idle_pressure_avg10: float = 0.5     # ... and some avg10 (percent) at most this ...
    idle_growth_max: int = 256 * 1024    # ... and memory use grown at most this since the last
    sample_raise_avg10: float = 10.0     # a sample above this avg10 raises (no trigger)
    memory_headroom_ratio: float = 0.25  # never lower memory.max below current * 1.25 ...
    memory_headroom_min: int = 4 * MiB   # ... nor below current + 4 MiB
    cpu_headroom_ratio: float = 0.5      # never lower cpu.max below use * 1.5
    high_gap_ratio: float = 0.125        # memory.high sits this share below memory.max
    reclaim_wait_samples: int = 3        # phase 2 waits this many samples for reclaim
    watch_s: float = 60.0                # after lowering memory.max, trouble rolls back
    cooldown_s: float = 300.0            # no lowering after a rollback or abandon
    memory_floor: int = 8 * MiB          # lowest memory.max even when memory_min is 0
    cpu_floor: int = MIN_CPU_MAX         # lowest cpu.max (millicpu)
    start: str = "max"                   # a new cell starts at its "max" (safe) or "low"



DEFAULT_CONFIG = TunerConfig()

@dataclass(frozen=True)
class Bounds:
    """The range the tuner works in.  ``*_lo`` already include the floors."""

    cpu_lo: int
    cpu_hi: int
    memory_lo: int
    memory_hi: int

    def __post_init__(self) -> None:
        if not 0 < self.cpu_lo <= self.cpu_hi or not 0 < self.memory_lo <= self.memory_hi:
            raise ConfigError("E_TUNER_BOUNDS", f"tuner bounds {self} are empty or not positive")

    @classmethod
    def from_resources(cls, r: Resources, config: TunerConfig = TunerConfig()) -> Bounds:
        return cls(min(r.cpu_max, max(r.cpu_min, config.cpu_floor)), r.cpu_max,
                   min(r.memory_max, max(r.memory_min, config.memory_floor)), r.memory_max)

    def to_wire(self) -> dict[str, int]:
        return {"cpu_lo": self.cpu_lo, "cpu_hi": self.cpu_hi, "memory_lo": self.memory_lo,
                "memory_hi": self.memory_hi}


@dataclass(frozen=True)
class Size:
    cpu: int  # cpu.max in millicpu
    memory_high: int
    memory_max: int

    def to_wire(self) -> dict[str, int]:
        return {"cpu": self.cpu, "memory_high": self.memory_high, "memory_max": self.memory_max}


# -- observations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PressureTriggered:
    resource: Resource
    at: float


@dataclass(frozen=True)
class MemoryEvents:
    """``memory.events`` counters; the tuner acts on their increase since the last read."""

    high: int
    max: int
    oom: int
    oom_kill: int
    at: float

    @classmethod
    def from_counters(cls, stats: Mapping[str, int], at: float) -> MemoryEvents:
        """From the counters of ``memory.events`` (a missing one counts 0)."""
        return cls(stats.get("high", 0), stats.get("max", 0), stats.get("oom", 0),
                   stats.get("oom_kill", 0), at)


@dataclass(frozen=True)
class Sample:
    cpu_usage_usec: int
    memory_current: int
    memory_some_avg10: float
    cpu_some_avg10: float
    at: float

    @classmethod
    def from_stats(cls, st: CellStats, at: float) -> Sample:
        """From a cell's cgroup statistics (a resource without PSI reads 0)."""
        def avg(res: str) -> float:
            p = st.pressure.get(res)
            return p.some.avg10 if p is not None else 0.0

        return cls(st.cpu_usage_usec, st.memory_current, avg("memory"), avg("cpu"), at)


Observation = PressureTriggered | MemoryEvents | Sample


# -- actions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Action:
    cell: str
    reason: str

    @property
    def kind(self) -> str:
        return "resize"

    def attrs(self) -> dict[str, object]:
        """Event and journal attributes (CBOR-encodable)."""
        d = dataclasses.asdict(self)
        d.pop("cell")
        d["action"] = type(self).__name__
        return d


@dataclass(frozen=True)
class SetCpuMax(_Action):
    old: int
    new: int


@dataclass(frozen=True)
class SetMemoryHigh(_Action):
    old: int
    new: int


@dataclass(frozen=True)
class SetMemoryMax(_Action):
    old: int
    new: int


@dataclass(frozen=True)
class SetLimits(_Action):
    old: Size
    new: Size

    @property
    def kind(self) -> str:
        return "pin"


@dataclass(frozen=True)
class Commit(_Action):
    """Admission must now hold ``new`` for the cell (``Budget.replace``)."""

    old: Amount
    new: Amount

    @property
    def kind(self) -> str:
        return "commit"


@dataclass(frozen=True)
class RecordRefusal(_Action):
    resource: Resource
    current: int
    wanted: int
    need: Amount

    @property
    def kind(self) -> str:
        return "refused"


Action = SetCpuMax | SetMemoryHigh | SetMemoryMax | SetLimits | Commit | RecordRefusal


# -- budget ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class BudgetView(Protocol):
    def can_grow(self, cell: str, delta: Amount) -> Verdict: ...


@dataclass(frozen=True)
class BudgetGate:
    """A :class:`BudgetView` over admission's :class:`Budget`: growth must fit in ``free``."""

    budget: Budget

    def can_grow(self, cell: str, delta: Amount) -> Verdict:
        free = self.budget.free
        if delta.fits_in(free):
            return Verdict(True)
        return Verdict(False, f"cell {cell}: needs cpu {delta.cpu}m memory {delta.memory} B, "
                              f"budget free cpu {free.cpu}m memory {free.memory} B")


# -- state ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunerState:
    cell: str
    size: Size
    held: Amount                     # what admission holds for the cell
    pinned: bool = False
    cpu_idle: int = 0                # consecutive idle samples
    memory_idle: int = 0
    lowering: Lowering = field(default_factory=Lowering)  # agent.core.lowering's phase
    events: MemoryEvents | None = None
    last_sample: Sample | None = None

    @property
    def pending(self) -> PendingLower | None:
        return self.lowering.pending

    @property
    def watch(self) -> Watch | None:
        return self.lowering.watch

    @property
    def cooldown_until(self) -> float:
        return self.lowering.cooldown_until

    def lower(self, step: Step, *, pending: PendingLower | None = None,
              watch: Watch | None = None, cooldown_until: float | None = None) -> TunerState:
        """The state after one step of the lowering machine (LoweringError if illegal)."""
        return replace(self, lowering=self.lowering.step(
            self.cell, step, pending=pending, watch=watch, cooldown_until=cooldown_until))
