"""Admission control (design step B): does the box have room for one more cell?

A :class:`Budget` is immutable: capacity (CPU in millicpu, memory in bytes, pids)
minus a host reserve is what cells may be *guaranteed*; each admitted cell commits
its guaranteed minimums (``cpu_min``, ``memory_min``, and ``pids_max`` as its pids
guarantee).  :meth:`Budget.admit` returns a new budget or raises
:class:`AdmissionRefused` (codes ``E_ADMISSION_CPU``, ``E_ADMISSION_MEMORY``,
``E_ADMISSION_PIDS``, ``E_ADMISSION_PRESSURE``) with the numbers.  Host pressure (PSI)
can refuse a cell even when the budget has room.

The ``read_*`` functions take the proc/sys roots they read, so tests pass fakes.
:func:`check_image` checks that the image a manifest names exists and holds its
command, workdir and mount points.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.core.cgroup import Pressure
from agent.core.errors import ConfigError, NotFoundError, RefusedError, StateError
from agent.core.manifest import Manifest
from agent.core.units import format_cpu

__all__ = [
    "AdmissionRefused",
    "Amount",
    "Budget",
    "HostPressure",
    "Ledger",
    "Request",
    "Thresholds",
    "check_pressure",
    "default_reserve",
    "parse_cpu_list",
    "parse_meminfo_total",
]


@dataclass(frozen=True)
class Amount:
    """An amount of the three admitted resources."""

    cpu: int = 0  # millicpu
    memory: int = 0  # bytes
    pids: int = 0

    def __add__(self, o: Amount) -> Amount:
        return Amount(self.cpu + o.cpu, self.memory + o.memory, self.pids + o.pids)

    def __sub__(self, o: Amount) -> Amount:
        return Amount(self.cpu - o.cpu, self.memory - o.memory, self.pids - o.pids)

    def fits_in(self, o: Amount) -> bool:
        return self.cpu <= o.cpu and self.memory <= o.memory and self.pids <= o.pids

    def to_wire(self) -> dict[str, int]:
        return {"cpu": self.cpu, "memory": self.memory, "pids": self.pids}


@dataclass(frozen=True)
class Request:
    """What a cell asks to be guaranteed."""

    cell: str
    amount: Amount

    @classmethod
    def from_manifest(cls, m: Manifest, cell: str | None = None) -> Request:
        r = m.resources
        return cls(cell or m.name, Amount(r.cpu_min, r.memory_min, r.pids_max))


@dataclass(frozen=True)
class Thresholds:
    """Refuse new cells while host ``some avg10`` pressure (percent) is above these."""

    memory_some_avg10: float = 40.0
    cpu_some_avg10: float = 80.0
    io_some_avg10: float | None = None  # None: io pressure does not refuse


@dataclass(frozen=True)
class HostPressure:
    """``/proc/pressure/{cpu,memory,io}``; ``None`` where the kernel has no PSI."""

    cpu: Pressure | None = None
    memory: Pressure | None = None
    io: Pressure | None = None


class AdmissionRefused(RefusedError):
    """Admission refused; carries the numbers for the control protocol."""

    def __init__(self, code: str, message: str, hint: str | None = None,
                 **details: float | str) -> None:
        super().__init__(code, message, hint)
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        d = super().to_wire()
        d["details"] = dict(self.details)
        return d


def _mem(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


_FMT: dict[str, Callable[[int], str]] = {"cpu": format_cpu, "memory": _mem, "pids": str}
_HINTS = {
    "cpu": "lower resources.cpu_min, or stop a cell with a guaranteed CPU share",
    "memory": "lower resources.memory_min, or stop a cell with guaranteed memory",
    "pids": "lower resources.pids_max, or stop a cell",
}


@dataclass(frozen=True)
class Budget:
    capacity: Amount
    reserve: Amount
    cells: tuple[tuple[str, Amount], ...] = ()  # in admission order

    @classmethod
    def new(cls, capacity: Amount, reserve: Amount) -> Budget:
        for res in ("cpu", "memory", "pids"):
            cap, rsv = getattr(capacity, res), getattr(reserve, res)
            if rsv < 0 or cap < 0 or rsv > cap:
                raise ConfigError("E_ADMISSION_RESERVE", f"{res}: host reserve {rsv} is not "
                                  f"within capacity 0..{cap}", "lower the host reserve")
        return cls(capacity, reserve)

    @property
    def available(self) -> Amount:
        return self.capacity - self.reserve

    @property
    def committed(self) -> Amount:
        total = Amount()
        for _, a in self.cells:
            total = total + a
        return total

    @property
    def free(self) -> Amount:
        return self.available - self.committed

    def get(self, cell: str) -> Amount | None:
        return next((a for c, a in self.cells if c == cell), None)

    def admit(self, req: Request, pressure: HostPressure | None = None,
              thresholds: Thresholds | None = None) -> Budget:
        """A budget with ``req`` committed; raises and leaves this budget unchanged."""
        if self.get(req.cell) is not None:
            raise StateError("E_ADMISSION_EXISTS", f"cell {req.cell} is already admitted",
                             "release it first, or use replace()")
        committed, available = self.committed, self.available
        for res in ("cpu", "memory", "pids"):
            asked, done = getattr(req.amount, res), getattr(committed, res)
            avail = getattr(available, res)
            if asked < 0:
                raise AdmissionRefused(f"E_ADMISSION_{res.upper()}",
                                       f"cell {req.cell}: {res}: negative request {asked}")
            if done + asked > avail:
                f = _FMT[res]
                cap, rsv = getattr(self.capacity, res), getattr(self.reserve, res)
                raise AdmissionRefused(
                    f"E_ADMISSION_{res.upper()}",
                    f"cell {req.cell}: {res}: requested {f(asked)}, committed {f(done)} of "
                    f"{f(avail)} available (capacity {f(cap)} - host reserve {f(rsv)}); "
                    f"free {f(avail - done)}", _HINTS[res],
                    resource=res, requested=asked, committed=done, capacity=cap, reserve=rsv)
        if pressure is not None:
            check_pressure(pressure, thresholds or Thresholds(), req.cell)
        return Budget(self.capacity, self.reserve, (*self.cells, (req.cell, req.amount)))

    def release(self, cell: str) -> Budget:
        if self.get(cell) is None:
            raise NotFoundError("E_ADMISSION_UNKNOWN", f"cell {cell} is not admitted")
        return Budget(self.capacity, self.reserve, tuple(x for x in self.cells if x[0] != cell))

    def replace(self, req: Request, pressure: HostPressure | None = None,
                thresholds: Thresholds | None = None) -> Budget:
        """Re-admit an admitted cell with a new request (a resize); all or nothing."""
        return self.release(req.cell).admit(req, pressure, thresholds)


class Ledger:
    """The one owner of the admission budget.

    Every change of what the cells hold goes through one of these methods: the cell
    manager admits and releases, the tuner commits a raise, the reclaim loop returns
    what a settled lowering freed, adoption restores what a journaled cell held.  The
    :class:`Budget` value itself stays immutable: a refused change raises and leaves the
    ledger as it was.  Readers (status, ``top``, the tuner's gate) see :attr:`budget`.
    """

    def __init__(self, budget: Budget) -> None:
        self._budget = budget

    @property
    def budget(self) -> Budget:
        return self._budget

    def get(self, cell: str) -> Amount | None:
        return self._budget.get(cell)

    def preview(self, req: Request, pressure: HostPressure | None = None) -> Budget:
        """The budget ``req`` would leave, changing nothing (raises a refusal)."""
        return self._budget.admit(req, pressure)

    def admit(self, req: Request, pressure: HostPressure | None = None) -> None:
        self._budget = self._budget.admit(req, pressure)

    def release(self, cell: str) -> bool:
        """Give back what ``cell`` holds; False if it held nothing."""
        if self._budget.get(cell) is None:
            return False
        self._budget = self._budget.release(cell)
        return True

    def replace(self, cell: str, amount: Amount) -> None:
        """The cell now holds ``amount`` (a raise committed, or budget returned)."""
        self._budget = self._budget.replace(Request(cell, amount))


def check_pressure(p: HostPressure, t: Thresholds, cell: str = "") -> None:
    """Raise ``E_ADMISSION_PRESSURE`` naming the resource and value above its threshold."""
    for res, pr, limit in (("memory", p.memory, t.memory_some_avg10),
                           ("cpu", p.cpu, t.cpu_some_avg10),
                           ("io", p.io, t.io_some_avg10)):
        if pr is not None and limit is not None and pr.some.avg10 > limit:
            who = f"cell {cell}: " if cell else ""
            raise AdmissionRefused(
                "E_ADMISSION_PRESSURE", f"{who}host {res} pressure: some avg10 "
                f"{pr.some.avg10:.2f}% is above the threshold of {limit:g}%",
                "the box is overloaded now; retry later or stop a cell",
                resource=res, value=pr.some.avg10, threshold=limit)


def default_reserve(capacity: Amount) -> Amount:
    """What the host keeps for itself: init, the agent, the kernel's own needs."""
    return Amount(
        cpu=min(capacity.cpu, max(100, capacity.cpu // 10)),
        memory=min(capacity.memory // 2, max(64 << 20, capacity.memory // 8)),
        pids=min(capacity.pids // 2, max(512, capacity.pids // 8)),
    )


# --------------------------------------------------------------------------------------------
# Reading the host


def parse_meminfo_total(text: str) -> int:
    """``MemTotal`` in bytes from /proc/meminfo text."""
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 2 and f[0] == "MemTotal:" and f[1].isdigit():
            unit = f[2].lower() if len(f) > 2 else ""
            return int(f[1]) * (1024 if unit == "kb" else 1)
    raise ValueError("no MemTotal line")


def parse_cpu_list(text: str) -> int:
    """Number of CPUs in a kernel CPU list such as ``0-3,6,8-9``."""
    count = 0
    for part in text.strip().split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"malformed CPU list {text.strip()!r}")
        a, b = int(lo), int(hi) if sep else int(lo)
        if b < a:
            raise ValueError(f"malformed CPU list {text.strip()!r}")
        count += b - a + 1
    return count


# --------------------------------------------------------------------------------------------
# The image on disk (the other resource a cell needs)


