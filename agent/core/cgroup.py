"""The cgroup interface shared by every backend, its data types and parsers.

A backend manages the agent's subtree: one leaf per cell, named after the
cell.  :class:`agent.kernel.cgroupv2.CgroupV2` is the unified-hierarchy backend; a
cgroup-v1 backend (on cgroupspy) can implement the same :class:`CgroupBackend`
protocol and degrade where v1 lacks a feature.

The parsers here are pure functions over file contents, so the same code reads
a real cgroupfs and a fake one in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.core.errors import ConfigError

__all__ = [
    "ALL_FEATURES",
    "CellStats",
    "Limits",
    "Pressure",
    "PressureLine",
    "cell_from_proc_cgroup",
    "parse_flat_keyed",
    "parse_pressure",
]

# What a backend may lack (cgroup v1 lacks most; see docs/cgroup-v1.md).
ALL_FEATURES = ("psi", "memory.high", "memory.min", "cgroup.kill", "freeze", "io.weight",
                "memory.reclaim")


@dataclass(frozen=True)
class Limits:
    """What a cell may use.  ``None`` means "max" (no limit).

    ``cpu_max_millicores`` is a hard ceiling (1000 = one full CPU), written as
    ``cpu.max`` = ``quota period``.  ``cpu_weight`` and ``io_weight`` are
    1..10000 (100 is the kernel default).  Memory values are bytes.
    """

    cpu_max_millicores: int | None = None
    cpu_weight: int = 100
    memory_min: int = 0
    memory_high: int | None = None
    memory_max: int | None = None
    pids_max: int | None = None
    io_weight: int = 100
    cpu_period_us: int = 100_000

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError("E_LIMITS", f"limit {key}={getattr(self, key)!r}: {why}")

        if self.cpu_max_millicores is not None and self.cpu_max_millicores <= 0:
            raise bad("cpu_max_millicores", "must be positive or None")
        if not 1000 <= self.cpu_period_us <= 1_000_000:
            raise bad("cpu_period_us", "must be 1000..1000000")
        for key in ("cpu_weight", "io_weight"):
            if not 1 <= getattr(self, key) <= 10000:
                raise bad(key, "must be 1..10000")
        if self.memory_min < 0:
            raise bad("memory_min", "must not be negative")
        for key in ("memory_high", "memory_max", "pids_max"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise bad(key, "must not be negative")
        if self.memory_max is not None and self.memory_min > self.memory_max:
            raise bad("memory_min", "is above memory_max")
        if (
            self.memory_high is not None
            and self.memory_max is not None
            and self.memory_high > self.memory_max
        ):
            raise bad("memory_high", "is above memory_max")

    def cpu_max_line(self) -> str:
        """The ``cpu.max`` line: ``"max 100000"`` or ``"50000 100000"``."""
        if self.cpu_max_millicores is None:
            return f"max {self.cpu_period_us}"
        quota = max(1000, self.cpu_max_millicores * self.cpu_period_us // 1000)
        return f"{quota} {self.cpu_period_us}"

    def files(self) -> list[tuple[str, str]]:
        """``(file, value)`` pairs in a safe writing order.

        ``memory.high`` goes before ``memory.max`` so that lowering both lets
        the kernel reclaim down to ``high`` before the hard limit bites.
        """

        def num(v: int | None) -> str:
            return "max" if v is None else str(v)

        return [
            ("cpu.max", self.cpu_max_line()),
            ("cpu.weight", str(self.cpu_weight)),
            ("memory.min", str(self.memory_min)),
            ("memory.high", num(self.memory_high)),
            ("memory.max", num(self.memory_max)),
            ("pids.max", num(self.pids_max)),
            ("io.weight", f"default {self.io_weight}"),
        ]


@dataclass(frozen=True)
class PressureLine:
    avg10: float
    avg60: float
    avg300: float
    total_usec: int


@dataclass(frozen=True)
class Pressure:
    """One ``*.pressure`` file: ``some`` always, ``full`` where the kernel has it."""

    some: PressureLine
    full: PressureLine | None


@dataclass(frozen=True)
class CellStats:
    cpu_usage_usec: int
    memory_current: int
    memory_events: dict[str, int]
    pids_current: int
    pressure: dict[str, Pressure] = field(default_factory=dict)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (``cpu.stat``, ``memory.events``, ``cgroup.events``)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                out[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return out


def parse_pressure(text: str) -> Pressure:
    """Parse a PSI file (``some avg10=0.00 avg60=0.00 avg300=0.00 total=0``)."""
    lines: dict[str, PressureLine] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        kv = dict(item.split("=", 1) for item in rest.split() if "=" in item)
        try:
            lines[kind] = PressureLine(
                float(kv["avg10"]), float(kv["avg60"]), float(kv["avg300"]), int(kv["total"])
            )
        except (KeyError, ValueError):
            raise ValueError(f"malformed pressure line {line!r}") from None
    if "some" not in lines:
        raise ValueError("pressure file has no 'some' line")
    return Pressure(lines["some"], lines.get("full"))


def cell_from_proc_cgroup(text: str, prefix: str) -> str | None:
    """The cell of a process from its ``/proc/PID/cgroup`` text.

    ``prefix`` is the agent's subtree as the cgroup v2 path the reader sees,
    e.g. ``/agent``.  Only the unified-hierarchy line (``0::``) counts.
    """
    prefix = prefix.rstrip("/") + "/"
    for line in text.splitlines():
        if line.startswith("0::"):
            path = line[3:]
            if path.startswith(prefix):
                cell = path[len(prefix):].split("/", 1)[0]
                return cell or None
            return None
    return None


