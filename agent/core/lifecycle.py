"""The cell lifecycle (design step I): one state machine, one table, no I/O.

Everything that decides what happens to a cell lives here, h11-style:
:data:`TRANSITIONS` maps ``(State, Event)`` to the next state, or to a :class:`Choice`
whose outcome a named rule (the restart policy, whether the cell holds kernel objects)
decides from the cell record.  :func:`transition` is a pure function::

    transition(cell, event, now) -> (new_cell, effects)

It raises :class:`LifecycleError` (``E_STATE``) for a pair the table does not have; the
caller's record is untouched (it is frozen).  *Effects* are small frozen objects the
daemon carries out: run a plan, signal the service, arm or cancel a restart timer,
give back the budget, publish an event.  docs/lifecycle.md explains each state and
embeds the diagram :func:`render_mermaid` draws from the table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from agent.core.errors import StateError
from agent.core.manifest import Lifecycle, Manifest

__all__ = [
    "DEFAULT_STABLE_MS",
    "DEFAULT_STOP_GRACE_MS",
    "TRANSITIONS",
    "CancelRestart",
    "Cell",
    "CellPolicy",
    "Choice",
    "Effect",
    "Event",
    "Exit",
    "LifecycleError",
    "Publish",
    "Release",
    "RunPlan",
    "ScheduleRestart",
    "State",
    "StopService",
    "allowed_events",
    "backoff_delay_ms",
    "render_dot",
    "render_mermaid",
    "transition",
]

DEFAULT_STABLE_MS = 10_000  # a run at least this long (and >= backoff max) resets the backoff
DEFAULT_STOP_GRACE_MS = 5_000  # SIGTERM, then SIGKILL of the whole cgroup after this


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


class Event(enum.Enum):
    ADMIT = "admit"  # policy and admission passed; budget and address are held
    REFUSE = "refuse"  # policy or admission refused the request
    PLAN_START = "plan-start"  # the executor begins the due plan
    PLAN_DONE = "plan-done"  # the create/restart plan committed
    PLAN_FAILED = "plan-failed"  # it failed; the executor undid its steps
    SERVICE_EXITED = "service-exited"  # pid 1 of the cell ended (see Exit)
    STOP_REQUESTED = "stop-requested"  # agentctl stop, shutdown, or reclaim
    RESTART_DUE = "restart-due"  # the ScheduleRestart timer fired
    DESTROY_DONE = "destroy-done"  # the destroy plan committed
    DESTROY_FAILED = "destroy-failed"  # it failed; leftovers are the reclaim loop's
    ADOPTED = "adopted"  # agentd restarted and re-established this cell (see docs)


@dataclass(frozen=True)
class Choice:
    """A transition whose target a named rule picks from ``targets``."""

    rule: str
    targets: tuple[State, ...]


S, E = State, Event
_ON_EXIT = Choice("restart policy", (S.BACKOFF, S.DESTROYING, S.EXITED))
_HOLDS = Choice("holds kernel objects", (S.DESTROYING, S.DESTROYED))
_CREATE_FAILED = Choice("first run, or restart policy",
                        (S.FAILED, S.BACKOFF, S.DESTROYING, S.EXITED))

# The whole machine.  A pair that is not here is illegal (LifecycleError).
TRANSITIONS: dict[tuple[State, Event], State | Choice] = {
    (S.REQUESTED, E.ADMIT): S.ADMITTED,
    (S.REQUESTED, E.REFUSE): S.FAILED,
    (S.REQUESTED, E.STOP_REQUESTED): S.DESTROYED,
    (S.ADMITTED, E.PLAN_START): S.CREATING,
    (S.ADMITTED, E.STOP_REQUESTED): _HOLDS,
    (S.ADMITTED, E.ADOPTED): S.ADMITTED,
    (S.CREATING, E.PLAN_DONE): S.RUNNING,
    (S.CREATING, E.PLAN_FAILED): _CREATE_FAILED,
    (S.CREATING, E.STOP_REQUESTED): S.STOPPING,
    (S.CREATING, E.ADOPTED): S.RUNNING,
    (S.RUNNING, E.SERVICE_EXITED): _ON_EXIT,
    (S.RUNNING, E.STOP_REQUESTED): S.STOPPING,
    (S.RUNNING, E.ADOPTED): S.RUNNING,
    (S.EXITED, E.STOP_REQUESTED): S.DESTROYING,
    (S.EXITED, E.ADOPTED): S.EXITED,
    (S.BACKOFF, E.RESTART_DUE): S.ADMITTED,
    (S.BACKOFF, E.STOP_REQUESTED): S.DESTROYING,
    (S.BACKOFF, E.ADOPTED): S.BACKOFF,
    (S.STOPPING, E.SERVICE_EXITED): S.DESTROYING,
    (S.STOPPING, E.PLAN_DONE): S.STOPPING,
    (S.STOPPING, E.PLAN_FAILED): _HOLDS,
    (S.STOPPING, E.STOP_REQUESTED): S.STOPPING,
    (S.STOPPING, E.ADOPTED): S.STOPPING,
    (S.DESTROYING, E.DESTROY_DONE): S.DESTROYED,
    (S.DESTROYING, E.DESTROY_FAILED): S.FAILED,
    (S.DESTROYING, E.STOP_REQUESTED): S.DESTROYING,
    (S.DESTROYING, E.ADOPTED): S.DESTROYING,
    (S.FAILED, E.STOP_REQUESTED): _HOLDS,
    (S.FAILED, E.ADOPTED): S.FAILED,
}


def allowed_events(state: State) -> tuple[Event, ...]:
    return tuple(e for (s, e) in TRANSITIONS if s is state)


class LifecycleError(StateError):
    """An event the cell's current state does not accept (code ``E_STATE``)."""

    def __init__(self, cell: str, state: State, event: Event) -> None:
        self.cell = cell
        self.state = state
        self.event = event
        ok = ", ".join(e.name for e in allowed_events(state)) or "nothing (terminal)"
        super().__init__("E_STATE", f"cell {cell}: event {event.name} is not allowed in "
                         f"state {state.name}", f"in {state.name} the cell accepts {ok}")


# -- records -----------------------------------------------------------------------------


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


# -- effects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """Build and run the cell's plan (agent.planner) with the executor."""

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


# -- the machine ---------------------------------------------------------------------------


def backoff_delay_ms(policy: CellPolicy, streak: int) -> int:
    """Wait before restart number ``streak + 1`` since the last stable run:
    ``initial * 2**streak``, capped at ``max``."""
    return int(min(policy.backoff_max_ms, policy.backoff_initial_ms * 2 ** min(streak, 40)))


class _Step:
    """Builds the outcome of one transition."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.changes: dict[str, Any] = {}
        self.effects: list[Effect] = []
        self.attrs: dict[str, Any] = {}

    def release(self) -> None:
        if self.cell.holds_budget:
            self.effects.append(Release())
            self.changes["holds_budget"] = False


def _after_end(st: _Step, ex: Exit, now: float, ran: bool) -> State:
    """The restart policy: the service ended (``ran``) or its restart plan failed."""
    c, p = st.cell, st.cell.policy
    if p.restart == "always" or (p.restart == "on-failure" and ex.failed):
        # Milliseconds, rounded: a float difference of clock readings must not make a
        # run of exactly stable_ms count as shorter (10.000 s - 1e-12).
        stable = (ran and c.started_at is not None
                  and round((now - c.started_at) * 1000) >= p.stable_ms)
        streak = 0 if stable else c.streak
        delay = backoff_delay_ms(p, streak)
        at = now + delay / 1000
        st.changes.update(streak=streak + 1, restarts=c.restarts + 1, restart_at=at)
        st.effects.append(ScheduleRestart(at, c.generation))
        st.attrs["delay_ms"] = delay
        return State.BACKOFF
    if p.destroy_on_exit:
        st.effects.append(RunPlan("destroy", c.generation))
        return State.DESTROYING
    return State.EXITED


def _holds(st: _Step) -> State:
    """Destroy what may exist; with nothing in the kernel, just release the budget."""
    if st.cell.provisioned:
        st.effects.append(RunPlan("destroy", st.cell.generation))
        return State.DESTROYING
    st.release()
    return State.DESTROYED


def _decide(st: _Step, ev: Event, ex: Exit | None, error: str | None, now: float) -> State:
    c = st.cell
    s = c.state
    if error is not None:
        st.changes["error"] = error
        st.attrs["error"] = error
    if ev is E.ADMIT:
        st.changes["holds_budget"] = True
        st.effects.append(RunPlan("create", c.generation))
    elif ev is E.REFUSE:
        st.release()
    elif ev is E.PLAN_START:
        st.changes["generation"] = c.generation + 1
    elif ev is E.PLAN_DONE:
        st.changes.update(provisioned=True, started_at=now, error=None)
        if s is S.STOPPING:  # the stop came while the plan ran: stop what it started
            st.effects.append(StopService(c.policy.stop_grace_ms / 1000))
    elif ev is E.PLAN_FAILED:
        if s is S.STOPPING:
            return _holds(st)
        if not c.provisioned:  # the executor undid the create plan: nothing is left
            st.release()
            return S.FAILED
        return _after_end(st, Exit(), now, ran=False)  # a restart plan failed
    elif ev is E.SERVICE_EXITED:
        exit_ = ex if ex is not None else Exit()
        st.changes["last_exit"] = exit_
        st.attrs.update(code=exit_.code, signal=exit_.signal)
        if s is S.RUNNING:
            return _after_end(st, exit_, now, ran=True)
        st.effects.append(RunPlan("destroy", c.generation))
    elif ev is E.STOP_REQUESTED:
        if s in (S.STOPPING, S.DESTROYING):
            return s  # already on its way out
        if s is S.RUNNING:
            st.effects.append(StopService(c.policy.stop_grace_ms / 1000))
        elif s is S.BACKOFF:
            st.changes["restart_at"] = None
            st.effects += [CancelRestart(), RunPlan("destroy", c.generation)]
        elif s is S.EXITED:
            st.effects.append(RunPlan("destroy", c.generation))
        elif s in (S.ADMITTED, S.FAILED):
            return _holds(st)
        elif s is S.REQUESTED:
            return S.DESTROYED
    elif ev is E.RESTART_DUE:
        st.changes["restart_at"] = None
        st.effects.append(RunPlan("restart", c.generation))
    elif ev is E.DESTROY_DONE:
        st.changes["provisioned"] = False
        st.release()
    elif ev is E.ADOPTED:
        if s is S.CREATING:
            st.changes.update(provisioned=True, started_at=now)
        elif s is S.ADMITTED:
            st.effects.append(RunPlan("restart" if c.provisioned else "create", c.generation))
        elif s is S.BACKOFF and c.restart_at is not None:
            st.effects.append(ScheduleRestart(c.restart_at, c.generation))
        elif s is S.STOPPING:
            st.effects.append(StopService(c.policy.stop_grace_ms / 1000))
        elif s is S.DESTROYING:
            st.effects.append(RunPlan("destroy", c.generation))
    target = TRANSITIONS[(s, ev)]
    assert isinstance(target, State), f"{s.name}/{ev.name} is a choice without a rule"
    return target


def transition(cell: Cell, event: Event | Exit, now: float, *, error: str | None = None
               ) -> tuple[Cell, tuple[Effect, ...]]:
    """Apply ``event`` to ``cell``.  An :class:`Exit` means SERVICE_EXITED with that status.

    ``error`` (for REFUSE, PLAN_FAILED, DESTROY_FAILED) is kept in ``Cell.error``.
    Raises :class:`LifecycleError` for a pair not in :data:`TRANSITIONS`.
    """
    ev = E.SERVICE_EXITED if isinstance(event, Exit) else event
    ex = event if isinstance(event, Exit) else None
    target = TRANSITIONS.get((cell.state, ev))
    if target is None:
        raise LifecycleError(cell.name, cell.state, ev)
    st = _Step(cell)
    new = _decide(st, ev, ex, error, now)
    allowed = target.targets if isinstance(target, Choice) else (target,)
    assert new in allowed, f"{cell.state.name}/{ev.name} chose {new.name}, not in {allowed}"
    if new is cell.state and not st.changes and not st.effects and ev is not E.ADOPTED:
        return cell, ()  # a repeated request: nothing to do, nothing to tell
    if new is not cell.state:
        st.changes.update(state=new, changed_at=now)
    out = replace(cell, **st.changes)
    kind = "adopted" if ev is E.ADOPTED else new.value
    attrs = {"from": cell.state.value, "event": ev.value, "generation": out.generation,
             **st.attrs}
    severity: Literal["info", "notice"] = "notice" if new is S.FAILED else "info"
    st.effects.append(Publish(kind, tuple(attrs.items()), severity))
    return out, tuple(st.effects)


# -- drawing -------------------------------------------------------------------------------


def _edges() -> list[tuple[State, State, str]]:
    out: list[tuple[State, State, str]] = []
    for (s, e), t in TRANSITIONS.items():
        if isinstance(t, Choice):
            out += [(s, x, f"{e.name} ({t.rule})") for x in t.targets]
        else:
            out.append((s, t, e.name))
    return out


def render_mermaid() -> str:
    """The table as a Mermaid ``stateDiagram-v2`` (embedded in docs/lifecycle.md)."""
    lines = ["stateDiagram-v2", f"    [*] --> {S.REQUESTED.name}"]
    lines += [f"    {a.name} --> {b.name}: {label}" for a, b, label in _edges()]
    lines.append(f"    {S.DESTROYED.name} --> [*]")
    return "\n".join(lines) + "\n"


def render_dot() -> str:
    """The table as a graphviz digraph (``dot -Tsvg``)."""
    lines = ["digraph lifecycle {", "    rankdir=LR;", "    node [shape=box];"]
    lines += [f'    {a.name} -> {b.name} [label="{label}"];' for a, b, label in _edges()]
    lines.append("}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m agent.core.lifecycle [dot]
    import sys

    print(render_dot() if sys.argv[1:] == ["dot"] else render_mermaid(), end="")
