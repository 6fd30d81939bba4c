"""The cell lifecycle (design step I): one state machine, one table, no I/O.

Everything that decides what happens to a cell lives here, h11-style.
:data:`TRANSITIONS` maps ``(State, Event)`` to a :class:`Rule`: the next state (or a
:class:`Choice` of states a named rule picks from, the restart policy or whether the
cell holds kernel objects) and the *action* that says what the step changes in the
record and which effects it has.  :func:`transition` is a pure function::

    transition(cell, event, now) -> (new_cell, effects)

It raises :class:`LifecycleError` (``E_STATE``) for a pair the table does not have; the
caller's record is untouched (it is frozen).  *Effects* are small frozen objects the
daemon carries out: run a plan, signal the service, arm or cancel a restart timer,
give back the budget, publish an event.

The rules the cell manager follows beside the table live here too: which events a plan
produces (:data:`PLAN_EVENTS`), what adoption after a restart feeds (:func:`adoption`),
when a record is forgotten (:func:`forgotten`), and the sets of states the manager asks
about (a request still in flight, a cell in the firewall rules, a cell on its way out).
docs/lifecycle.md explains each state and embeds the diagram :func:`render_mermaid`
draws from the table.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from agent.core.cell import (
    CancelRestart,
    Cell,
    CellPolicy,
    Effect,
    Exit,
    Publish,
    Release,
    RunPlan,
    ScheduleRestart,
    State,
    StopService,
)
from agent.core.errors import TransitionError

__all__ = [
    "HOLDS_TABLE",
    "IN_FIREWALL",
    "IN_FLIGHT",
    "LEAVING",
    "LIVE",
    "PLAN_EVENTS",
    "TRANSITIONS",
    "Choice",
    "Event",
    "LifecycleError",
    "PlanEvents",
    "Rule",
    "adoption",
    "allowed_events",
    "backoff_delay_ms",
    "forgotten",
    "render_dot",
    "render_mermaid",
    "transition",
]


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


# -- one step ------------------------------------------------------------------------------


class _Step:
    """What one transition changes in the record, the effects and the event's attributes."""

    def __init__(self, cell: Cell, exit_: Exit | None, now: float) -> None:
        self.cell = cell
        self.exit = exit_
        self.now = now
        self.changes: dict[str, Any] = {}
        self.effects: list[Effect] = []
        self.attrs: dict[str, Any] = {}

    def release(self) -> None:
        if self.cell.holds_budget:
            self.effects.append(Release())
            self.changes["holds_budget"] = False

    def plan(self, purpose: Literal["create", "restart", "destroy"]) -> None:
        self.effects.append(RunPlan(purpose, self.cell.generation))

    def stop_service(self) -> None:
        self.effects.append(StopService(self.cell.policy.stop_grace_ms / 1000))

    def ended(self) -> Exit:
        ex = self.exit if self.exit is not None else Exit()
        self.changes["last_exit"] = ex
        self.attrs.update(code=ex.code, signal=ex.signal)
        return ex


Action = Callable[[_Step], "State | None"]  # None: the rule's fixed target


@dataclass(frozen=True)
class Choice:
    """A transition whose target a named rule picks from ``targets``."""

    rule: str
    targets: tuple[State, ...]


@dataclass(frozen=True)
class Rule:
    """One entry of the table: where the step goes and the action that makes it."""

    to: State | Choice
    act: Action

    @property
    def targets(self) -> tuple[State, ...]:
        return self.to.targets if isinstance(self.to, Choice) else (self.to,)


def backoff_delay_ms(policy: CellPolicy, streak: int) -> int:
    """Wait before restart number ``streak + 1`` since the last stable run:
    ``initial * 2**streak``, capped at ``max``."""
    return int(min(policy.backoff_max_ms, policy.backoff_initial_ms * 2 ** min(streak, 40)))


# -- the actions (each a step of the table; its name is the rule it follows) ---------------

def _nothing(st: _Step) -> None:
    return None


def _admit(st: _Step) -> None:
    st.changes["holds_budget"] = True
    st.plan("create")


def _refuse(st: _Step) -> None:
    st.release()


def _begin_plan(st: _Step) -> None:
    st.changes["generation"] = st.cell.generation + 1


def _plan_done(st: _Step) -> None:
    st.changes.update(provisioned=True, started_at=st.now, error=None)


def _plan_done_stop(st: _Step) -> None:
    """The stop came while the plan ran: stop what it started."""
    _plan_done(st)
    st.stop_service()


def _restart_policy(st: _Step, ex: Exit, ran: bool) -> State:
    """The service ended (``ran``) or its restart plan failed: restart, destroy or keep."""
    c, p = st.cell, st.cell.policy
    if p.restart == "always" or (p.restart == "on-failure" and ex.failed):
        # Milliseconds, rounded: a float difference of clock readings must not make a
        # run of exactly stable_ms count as shorter (10.000 s - 1e-12).
        stable = (ran and c.started_at is not None
                  and round((st.now - c.started_at) * 1000) >= p.stable_ms)
        streak = 0 if stable else c.streak
        delay = backoff_delay_ms(p, streak)
        at = st.now + delay / 1000
        st.changes.update(streak=streak + 1, restarts=c.restarts + 1, restart_at=at)
        st.effects.append(ScheduleRestart(at, c.generation))
        st.attrs["delay_ms"] = delay
        return State.BACKOFF
    if p.destroy_on_exit:
        st.plan("destroy")
        return State.DESTROYING
    return State.EXITED


def _service_ended(st: _Step) -> State:
    return _restart_policy(st, st.ended(), ran=True)


def _stopped(st: _Step) -> None:
    st.ended()
    st.plan("destroy")


def _create_failed(st: _Step) -> State:
    if not st.cell.provisioned:  # the executor undid the create plan: nothing is left
        st.release()
        return State.FAILED
    return _restart_policy(st, Exit(), ran=False)  # a restart plan failed


def _holds(st: _Step) -> State:
    """Destroy what may exist; with nothing in the kernel, just release the budget."""
    if st.cell.provisioned:
        st.plan("destroy")
        return State.DESTROYING
    st.release()
    return State.DESTROYED


def _stop_running(st: _Step) -> None:
    st.stop_service()


def _destroy(st: _Step) -> None:
    st.plan("destroy")


def _cancel_and_destroy(st: _Step) -> None:
    st.changes["restart_at"] = None
    st.effects.append(CancelRestart())
    st.plan("destroy")


def _restart(st: _Step) -> None:
    st.changes["restart_at"] = None
    st.plan("restart")


def _destroyed(st: _Step) -> None:
    st.changes["provisioned"] = False
    st.release()


def _adopt_creating(st: _Step) -> None:
    """The plan ran to its end before agentd died (its pid 1 lives): it is running."""
    st.changes.update(provisioned=True, started_at=st.now)


def _adopt_admitted(st: _Step) -> None:
    st.plan("restart" if st.cell.provisioned else "create")


def _adopt_backoff(st: _Step) -> None:
    if st.cell.restart_at is not None:
        st.effects.append(ScheduleRestart(st.cell.restart_at, st.cell.generation))


# -- the whole machine ---------------------------------------------------------------------

S, E = State, Event
_ON_EXIT = Choice("restart policy", (S.BACKOFF, S.DESTROYING, S.EXITED))
_HOLDS = Choice("holds kernel objects", (S.DESTROYING, S.DESTROYED))
_CREATE_FAILED = Choice("first run, or restart policy",
                        (S.FAILED, S.BACKOFF, S.DESTROYING, S.EXITED))

# A pair that is not here is illegal (LifecycleError).
TRANSITIONS: dict[tuple[State, Event], Rule] = {
    (S.REQUESTED, E.ADMIT): Rule(S.ADMITTED, _admit),
    (S.REQUESTED, E.REFUSE): Rule(S.FAILED, _refuse),
    (S.REQUESTED, E.STOP_REQUESTED): Rule(S.DESTROYED, _nothing),
    (S.ADMITTED, E.PLAN_START): Rule(S.CREATING, _begin_plan),
    (S.ADMITTED, E.STOP_REQUESTED): Rule(_HOLDS, _holds),
    (S.ADMITTED, E.ADOPTED): Rule(S.ADMITTED, _adopt_admitted),
    (S.CREATING, E.PLAN_DONE): Rule(S.RUNNING, _plan_done),
    (S.CREATING, E.PLAN_FAILED): Rule(_CREATE_FAILED, _create_failed),
    (S.CREATING, E.STOP_REQUESTED): Rule(S.STOPPING, _nothing),  # the plan goes on
    (S.CREATING, E.ADOPTED): Rule(S.RUNNING, _adopt_creating),
    (S.RUNNING, E.SERVICE_EXITED): Rule(_ON_EXIT, _service_ended),
    (S.RUNNING, E.STOP_REQUESTED): Rule(S.STOPPING, _stop_running),
    (S.RUNNING, E.ADOPTED): Rule(S.RUNNING, _nothing),
    (S.EXITED, E.STOP_REQUESTED): Rule(S.DESTROYING, _destroy),
    (S.EXITED, E.ADOPTED): Rule(S.EXITED, _nothing),
    (S.BACKOFF, E.RESTART_DUE): Rule(S.ADMITTED, _restart),
    (S.BACKOFF, E.STOP_REQUESTED): Rule(S.DESTROYING, _cancel_and_destroy),
    (S.BACKOFF, E.ADOPTED): Rule(S.BACKOFF, _adopt_backoff),
    (S.STOPPING, E.SERVICE_EXITED): Rule(S.DESTROYING, _stopped),
    (S.STOPPING, E.PLAN_DONE): Rule(S.STOPPING, _plan_done_stop),
    (S.STOPPING, E.PLAN_FAILED): Rule(_HOLDS, _holds),
    (S.STOPPING, E.STOP_REQUESTED): Rule(S.STOPPING, _nothing),  # already on its way out
    (S.STOPPING, E.ADOPTED): Rule(S.STOPPING, _stop_running),
    (S.DESTROYING, E.DESTROY_DONE): Rule(S.DESTROYED, _destroyed),
    (S.DESTROYING, E.DESTROY_FAILED): Rule(S.FAILED, _nothing),
    (S.DESTROYING, E.STOP_REQUESTED): Rule(S.DESTROYING, _nothing),
    (S.DESTROYING, E.ADOPTED): Rule(S.DESTROYING, _destroy),
    (S.FAILED, E.STOP_REQUESTED): Rule(_HOLDS, _holds),
    (S.FAILED, E.ADOPTED): Rule(S.FAILED, _nothing),
}


def allowed_events(state: State) -> tuple[Event, ...]:
    return tuple(e for (s, e) in TRANSITIONS if s is state)


class LifecycleError(TransitionError):
    """An event the cell's current state does not accept (code ``E_STATE``)."""

    def __init__(self, cell: str, state: State, event: Event) -> None:
        self.cell = cell
        self.state = state
        self.event = event
        super().__init__(f"cell {cell}", f"event {event.name}", f"state {state.name}",
                         (e.name for e in allowed_events(state)), "the cell")


def transition(cell: Cell, event: Event | Exit, now: float, *, error: str | None = None
               ) -> tuple[Cell, tuple[Effect, ...]]:
    """Apply ``event`` to ``cell``.  An :class:`Exit` means SERVICE_EXITED with that status.

    ``error`` (for REFUSE, PLAN_FAILED, DESTROY_FAILED) is kept in ``Cell.error``.
    Raises :class:`LifecycleError` for a pair not in :data:`TRANSITIONS`.
    """
    ev = E.SERVICE_EXITED if isinstance(event, Exit) else event
    rule = TRANSITIONS.get((cell.state, ev))
    if rule is None:
        raise LifecycleError(cell.name, cell.state, ev)
    st = _Step(cell, event if isinstance(event, Exit) else None, now)
    if error is not None:
        st.changes["error"] = error
        st.attrs["error"] = error
    chosen = rule.act(st)
    new = chosen if chosen is not None else rule.to
    if not isinstance(new, State) or new not in rule.targets:
        raise AssertionError(f"{cell.state.name}/{ev.name}: action {rule.act.__name__} "
                             f"chose {new}, not one of {rule.targets}")
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


# -- what the cell manager asks of the lifecycle -------------------------------------------

# A run request waits while its cell is in one of these (it returns once the cell leaves).
IN_FLIGHT = frozenset({S.REQUESTED, S.ADMITTED, S.CREATING})
# The cell's address is in the firewall rules (it holds a lease and is not leaving)...
IN_FIREWALL = frozenset({S.ADMITTED, S.CREATING, S.RUNNING, S.EXITED, S.BACKOFF,
                         S.STOPPING})
# ... and its netns holds its own table (the create plan applied it).
HOLDS_TABLE = frozenset({S.RUNNING, S.EXITED, S.BACKOFF, S.STOPPING})
# Torn down or gone: it holds no VLAN for others (the last cell of a VLAN takes the
# VLAN's gateway with it).
LEAVING = frozenset({S.STOPPING, S.DESTROYING, S.DESTROYED})
# A pid 1 may be alive: adoption looks for the cell's processes.
LIVE = frozenset({S.RUNNING, S.STOPPING, S.CREATING})


def forgotten(cell: Cell) -> bool:
    """The record can go (``cell-gone``): nothing of the cell is left, in the kernel or in
    the budget."""
    return cell.state is S.DESTROYED or (
        cell.state is S.FAILED and not cell.provisioned and not cell.holds_budget)


@dataclass(frozen=True)
class PlanEvents:
    """What the manager feeds around running one plan of a purpose."""

    start: Event | None  # before the plan runs
    done: Event
    failed: Event


PLAN_EVENTS: dict[str, PlanEvents] = {
    "create": PlanEvents(E.PLAN_START, E.PLAN_DONE, E.PLAN_FAILED),
    "restart": PlanEvents(E.PLAN_START, E.PLAN_DONE, E.PLAN_FAILED),
    "destroy": PlanEvents(None, E.DESTROY_DONE, E.DESTROY_FAILED),
}


def adoption(cell: Cell, alive: bool, repaired: bool) -> tuple[tuple[Event, str | None], ...]:
    """The events a restarted agentd feeds a journaled cell.  ``alive``: its processes
    were found (and its pid 1 re-adopted); ``repaired``: its in-flight plan was undone."""
    if cell.state is S.REQUESTED:  # never journaled by agentd (ADMIT comes first): drop it
        return ((E.STOP_REQUESTED, None),)
    if cell.state is S.CREATING and repaired and not alive:
        return ((E.PLAN_FAILED, "agentd restarted during the plan; it was undone"),)
    if cell.state in LIVE and not alive and cell.state is not S.STOPPING:
        return ((E.ADOPTED, None), (E.STOP_REQUESTED, None))  # its processes are gone
    return ((E.ADOPTED, None),)


# -- drawing -------------------------------------------------------------------------------


def _edges() -> list[tuple[State, State, str]]:
    out: list[tuple[State, State, str]] = []
    for (s, e), rule in TRANSITIONS.items():
        if isinstance(rule.to, Choice):
            out += [(s, x, f"{e.name} ({rule.to.rule})") for x in rule.to.targets]
        else:
            out.append((s, rule.to, e.name))
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
