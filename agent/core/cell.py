"""A cell's lifecycle record: its state, its restart policy, how its service ended (pure).

:class:`Cell` is what the journal keeps of a cell's life and what
:func:`agent.core.lifecycle.transition` maps to a new record; :class:`State` is its
field, the machine's states; the *effects* are what a transition asks the daemon to do
(the table that moves between states is in :mod:`agent.core.lifecycle`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.manifest import Lifecycle, Manifest

__all__ = ["DEFAULT_STABLE_MS", "DEFAULT_STOP_GRACE_MS", "CancelRestart", "Cell", "CellPolicy",
           "Effect", "Exit", "Publish", "Release", "RunPlan", "ScheduleRestart", "State",
           "StopService"]


class State(enum.Enum):
    REQUESTED = "requested"  # a valid run request, not yet admitted
    ADMITTED = "admitted"  # budget and address held; a create or restart plan is due
    CREATING = "creating"  # the plan is running
    RUNNING = "running"  # the service is alive
    EXITED = "exited"  # the service ended; the cell is kept (destroy_on_exit = false)
    BACKOFF = "backoff"  # the service ended; a restart is scheduled
    STOPPING = "stopping"  # asked to stop; waiting for the service (or plan) to end
    DESTROYING = "destroying"  # the destroy plan is running
    DESTROYED = "destroyed"  # nothing of the cell is left (terminal)
    FAILED = "failed"  # refused, or creation/destruction failed; see Cell.error


DEFAULT_STABLE_MS = 10_000  # a run at least this long (and >= backoff max) resets the backoff
DEFAULT_STOP_GRACE_MS = 5_000  # SIGTERM, then SIGKILL of the whole cgroup after this


@dataclass(frozen=True)
class CellPolicy:
    """What the lifecycle needs from the manifest, plus two agent-wide durations."""

    mode: Literal["oneshot", "service"] = "service"
    restart: Literal["no", "on-failure", "always"] = "on-failure"
    backoff_initial_ms: int = 1000
    backoff_max_ms: int = 60_000
    destroy_on_exit: bool = True
    stable_ms: int = DEFAULT_STABLE_MS
    stop_grace_ms: int = DEFAULT_STOP_GRACE_MS

    @classmethod
    def from_manifest(cls, m: Manifest | Lifecycle, *, stop_grace_ms: int = DEFAULT_STOP_GRACE_MS
                      ) -> CellPolicy:
        """``stable_ms`` is max(DEFAULT_STABLE_MS, backoff max): a run that outlasts the
        longest wait shows the service is healthy again."""
        lc = m.lifecycle if isinstance(m, Manifest) else m
        return cls(lc.mode, lc.restart, lc.backoff_initial_ms, lc.backoff_max_ms,
                   lc.destroy_on_exit, max(DEFAULT_STABLE_MS, lc.backoff_max_ms), stop_grace_ms)


@dataclass(frozen=True)
class Exit:
    """How pid 1 of a cell ended; both None: unknown (e.g. found dead after a restart)."""

    code: int | None = None
    signal: int | None = None

    @property
    def failed(self) -> bool:
        return self.code != 0 or self.signal is not None

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return "exit status unknown" if self.code is None else f"exit code {self.code}"


@dataclass(frozen=True)
class Cell:
    """One cell's lifecycle record (what the journal keeps; times are the caller's clock)."""

    name: str
    policy: CellPolicy
    state: State = State.REQUESTED
    generation: int = 0  # plans started (PLAN_START): one per run of the service
    restarts: int = 0  # restarts scheduled in the cell's life
    streak: int = 0  # restarts since the last stable run: drives the backoff
    provisioned: bool = False  # cgroup, netns, link... may exist: destroy before forgetting
    holds_budget: bool = False  # admission budget and address lease not yet released
    last_exit: Exit | None = None
    error: str | None = None
    created_at: float = 0.0
    changed_at: float = 0.0
    started_at: float | None = None  # the last PLAN_DONE
    restart_at: float | None = None  # while in BACKOFF

    @classmethod
    def new(cls, name: str, policy: CellPolicy, now: float) -> Cell:
        return cls(name, policy, created_at=now, changed_at=now)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in _PLAIN}
        d["state"] = self.state.value
        d["policy"] = {k: getattr(self.policy, k) for k in _POLICY}
        d["last_exit"] = (None if self.last_exit is None
                          else {"code": self.last_exit.code, "signal": self.last_exit.signal})
        return d

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> Cell:
        """Inverse of :meth:`to_wire`; ValueError/KeyError/TypeError on a malformed record."""
        ex = d["last_exit"]
        return cls(policy=CellPolicy(**{k: d["policy"][k] for k in _POLICY}),
                   state=State(d["state"]),
                   last_exit=None if ex is None else Exit(ex["code"], ex["signal"]),
                   **{k: d[k] for k in _PLAIN})


_PLAIN = ("name", "generation", "restarts", "streak", "provisioned", "holds_budget", "error",
          "created_at", "changed_at", "started_at", "restart_at")


_POLICY = ("mode", "restart", "backoff_initial_ms", "backoff_max_ms", "destroy_on_exit",
           "stable_ms", "stop_grace_ms")


@dataclass(frozen=True)
class RunPlan:
    """Build and run the cell's plan (agent.core.planner) with the executor."""

    purpose: Literal["create", "restart", "destroy"]
    generation: int


@dataclass(frozen=True)
class StopService:
    """SIGTERM pid 1; after ``grace`` seconds kill the cell's cgroup.  SERVICE_EXITED follows."""

    grace: float


@dataclass(frozen=True)
class ScheduleRestart:
    """Feed RESTART_DUE at ``at``; drop it if the cell's generation has moved on."""

    at: float
    generation: int


@dataclass(frozen=True)
class CancelRestart:
    """Disarm the cell's restart timer."""


@dataclass(frozen=True)
class Release:
    """Give back what ADMIT took: the admission budget and the address lease."""


@dataclass(frozen=True)
class Publish:
    """An event for the bus: channel ``lifecycle``, this kind, these attributes."""

    kind: str
    attrs: tuple[tuple[str, Any], ...] = ()
    severity: Literal["info", "notice", "alert"] = "info"

    def attrs_dict(self) -> dict[str, Any]:
        return dict(self.attrs)


Effect = RunPlan | StopService | ScheduleRestart | CancelRestart | Release | Publish
