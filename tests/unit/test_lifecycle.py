"""The cell state machine: the whole table, restart/backoff, invariants over random runs."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from agent.core.errors import StateError
from agent.core.lifecycle import (
    HOLDS_TABLE,
    IN_FIREWALL,
    IN_FLIGHT,
    LEAVING,
    LIVE,
    PLAN_EVENTS,
    TRANSITIONS,
    Event,
    LifecycleError,
    adoption,
    allowed_events,
    backoff_delay_ms,
    forgotten,
    render_dot,
    render_mermaid,
    transition,
)
from agent.core.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "rootfs-overlay/etc/agent/services"
S, E = State, Event


def at(state: State, policy: CellPolicy | None = None, **kw: object) -> Cell:
    """A record in ``state`` with plausible flags for it."""
    held = state not in (S.REQUESTED, S.DESTROYED)
    prov = state in (S.RUNNING, S.EXITED, S.BACKOFF, S.STOPPING, S.DESTROYING)
    base = Cell("web", policy or CellPolicy(), state, generation=1, provisioned=prov,
                holds_budget=held, restart_at=5.0 if state is S.BACKOFF else None,
                started_at=0.0 if prov else None)
    return replace(base, **kw)  # type: ignore[arg-type]


def kinds(effects: tuple[Effect, ...]) -> list[type]:
    return [type(e) for e in effects]


# -- the table ------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("event", list(Event))
def test_every_pair_is_a_transition_or_an_error(state: State, event: Event) -> None:
    for provisioned in (False, True):
        cell = at(state, provisioned=provisioned)
        rule = TRANSITIONS.get((state, event))
        if rule is None:
            with pytest.raises(LifecycleError) as ei:
                transition(cell, event, 10.0)
            err = ei.value
            assert isinstance(err, StateError) and err.code == "E_STATE"
            assert state.name in err.message and event.name in err.message
            assert (err.state, err.event, err.cell) == (state, event, "web")
            assert cell.state is state  # the record is untouched
            continue
        new, effects = transition(cell, event, 10.0)
        assert new.state in rule.targets
        assert cell.state is state
        if new.state is not state:
            assert new.changed_at == 10.0
            kind = "adopted" if event is E.ADOPTED else new.state.value
            assert isinstance(effects[-1], Publish) and effects[-1].kind == kind


def test_terminal_state_accepts_nothing() -> None:
    assert allowed_events(S.DESTROYED) == ()
    with pytest.raises(LifecycleError, match="terminal"):
        transition(at(S.DESTROYED), E.STOP_REQUESTED, 1.0)


def test_every_state_is_reachable_and_every_nonterminal_state_can_leave() -> None:
    targets = {S.REQUESTED}
    for rule in TRANSITIONS.values():
        targets |= set(rule.targets)
    assert targets == set(State)
    for s in State:
        if s is not S.DESTROYED:
            assert (s, E.STOP_REQUESTED) in TRANSITIONS, s


def test_illegal_event_hint_lists_what_is_accepted() -> None:
    with pytest.raises(LifecycleError) as ei:
        transition(at(S.REQUESTED), E.PLAN_DONE, 1.0)
    assert ei.value.hint == "in REQUESTED the cell accepts ADMIT, REFUSE, STOP_REQUESTED"
    assert str(ei.value).startswith("error[E_STATE]: cell web: event PLAN_DONE")


# -- paths through the machine ----------------------------------------------------------------


def run(cell: Cell, *events: Event | Exit, now: float = 1.0) -> tuple[Cell, list[Effect]]:
    out: list[Effect] = []
    for ev in events:
        cell, effects = transition(cell, ev, now)
        out += effects
    return cell, out


def test_oneshot_is_destroyed_when_it_exits() -> None:
    pol = CellPolicy.from_manifest(load_manifest(str(SERVICES / "demo-echo.toml")))
    assert (pol.mode, pol.restart, pol.destroy_on_exit) == ("oneshot", "no", True)
    cell = Cell.new("demo-echo", pol, 0.0)
    cell, eff = transition(cell, E.ADMIT, 0.0)
    assert (cell.state, cell.holds_budget) == (S.ADMITTED, True)
    assert eff[0] == RunPlan("create", 0)
    cell, _ = run(cell, E.PLAN_START, E.PLAN_DONE)
    assert (cell.state, cell.generation, cell.provisioned) == (S.RUNNING, 1, True)
    cell, eff = transition(cell, Exit(code=0), 2.0)
    assert cell.state is S.DESTROYING and eff[0] == RunPlan("destroy", 1)
    assert cell.last_exit == Exit(0)
    cell, eff = transition(cell, E.DESTROY_DONE, 3.0)
    assert cell.state is S.DESTROYED and not cell.holds_budget and not cell.provisioned
    assert kinds(eff) == [Release, Publish]


def test_keep_after_exit_then_stop() -> None:
    cell = at(S.RUNNING, CellPolicy(mode="oneshot", restart="no", destroy_on_exit=False))
    cell, eff = transition(cell, Exit(code=3), 2.0)
    assert cell.state is S.EXITED and kinds(eff) == [Publish]
    assert eff[0] == Publish("exited", (("from", "running"), ("event", "service-exited"),
                                        ("generation", 1), ("code", 3), ("signal", None)))
    cell, eff = transition(cell, E.STOP_REQUESTED, 3.0)
    assert cell.state is S.DESTROYING and eff[0] == RunPlan("destroy", 1)


def test_on_failure_restarts_only_failures() -> None:
    pol = CellPolicy(restart="on-failure", backoff_initial_ms=500, backoff_max_ms=30_000)
    cell, eff = transition(at(S.RUNNING, pol), Exit(signal=9), 1.0)
    assert cell.state is S.BACKOFF and eff[0] == ScheduleRestart(1.5, 1)
    assert (cell.restarts, cell.streak, cell.restart_at) == (1, 1, 1.5)
    assert eff[-1].attrs_dict()["delay_ms"] == 500  # type: ignore[union-attr]
    cell, eff = transition(at(S.RUNNING, pol), Exit(code=0), 1.0)
    assert cell.state is S.DESTROYING
    cell, eff = transition(at(S.RUNNING, pol), E.SERVICE_EXITED, 1.0)  # status unknown
    assert cell.state is S.BACKOFF and cell.last_exit == Exit()


def test_restart_cycle_runs_a_restart_plan_with_a_new_generation() -> None:
    cell = at(S.BACKOFF)
    cell, eff = transition(cell, E.RESTART_DUE, 5.0)
    assert cell.state is S.ADMITTED and cell.restart_at is None
    assert eff[0] == RunPlan("restart", 1)
    cell, _ = run(cell, E.PLAN_START, E.PLAN_DONE, now=5.0)
    assert (cell.state, cell.generation, cell.started_at) == (S.RUNNING, 2, 5.0)


def test_failed_first_create_releases_and_fails() -> None:
    cell, _ = run(Cell.new("web", CellPolicy(), 0.0), E.ADMIT, E.PLAN_START)
    cell, eff = transition(cell, E.PLAN_FAILED, 1.0, error="step 3 failed")
    assert cell.state is S.FAILED and cell.error == "step 3 failed"
    assert kinds(eff) == [Release, Publish] and eff[-1].severity == "notice"  # type: ignore[union-attr]
    cell, eff = transition(cell, E.STOP_REQUESTED, 2.0)  # forget it: nothing to destroy
    assert cell.state is S.DESTROYED and kinds(eff) == [Publish]


def test_failed_restart_plan_backs_off_without_resetting_the_streak() -> None:
    pol = CellPolicy(restart="always", backoff_initial_ms=100, backoff_max_ms=10_000,
                     stable_ms=1000)
    cell = at(S.CREATING, pol, provisioned=True, streak=3, started_at=0.0)
    cell, eff = transition(cell, E.PLAN_FAILED, 500.0, error="execve: ENOENT")
    assert cell.state is S.BACKOFF and cell.streak == 4
    assert eff[0] == ScheduleRestart(500.8, 1)


def test_stop_while_running_waits_for_exit_then_destroys() -> None:
    pol = CellPolicy(stop_grace_ms=2000, restart="always")
    cell, eff = transition(at(S.RUNNING, pol), E.STOP_REQUESTED, 1.0)
    assert cell.state is S.STOPPING and eff[0] == StopService(2.0)
    again, eff = transition(cell, E.STOP_REQUESTED, 1.5)
    assert again is cell and eff == ()
    cell, eff = transition(cell, Exit(code=0), 2.0)  # no restart while stopping
    assert cell.state is S.DESTROYING and eff[0] == RunPlan("destroy", 1)


def test_stop_during_creation() -> None:
    cell = at(S.CREATING, provisioned=False)
    cell, eff = transition(cell, E.STOP_REQUESTED, 1.0)
    assert cell.state is S.STOPPING and kinds(eff) == [Publish]
    done, eff = transition(cell, E.PLAN_DONE, 2.0)
    assert done.state is S.STOPPING and isinstance(eff[0], StopService) and done.provisioned
    failed, eff = transition(cell, E.PLAN_FAILED, 2.0)
    assert failed.state is S.DESTROYED and kinds(eff) == [Release, Publish]


def test_stop_in_backoff_cancels_the_timer() -> None:
    cell, eff = transition(at(S.BACKOFF), E.STOP_REQUESTED, 1.0)
    assert cell.state is S.DESTROYING and cell.restart_at is None
    assert kinds(eff) == [CancelRestart, RunPlan, Publish]


def test_destroy_failure_keeps_the_budget_until_a_retry_succeeds() -> None:
    cell, eff = transition(at(S.DESTROYING), E.DESTROY_FAILED, 1.0, error="rmdir: EBUSY")
    assert cell.state is S.FAILED and cell.holds_budget and cell.provisioned
    assert Release not in kinds(eff)
    cell, eff = transition(cell, E.STOP_REQUESTED, 2.0)
    assert cell.state is S.DESTROYING and eff[0] == RunPlan("destroy", 1)
    cell, eff = transition(cell, E.DESTROY_DONE, 3.0)
    assert cell.state is S.DESTROYED and Release in kinds(eff)


def test_adoption_rearms_what_was_pending() -> None:
    _, eff = transition(at(S.BACKOFF, restart_at=42.0), E.ADOPTED, 1.0)
    assert eff[0] == ScheduleRestart(42.0, 1) and eff[-1].kind == "adopted"  # type: ignore[union-attr]
    _, eff = transition(at(S.DESTROYING), E.ADOPTED, 1.0)
    assert eff[0] == RunPlan("destroy", 1)
    cell, _ = transition(at(S.CREATING), E.ADOPTED, 7.0)
    assert (cell.state, cell.provisioned, cell.started_at) == (S.RUNNING, True, 7.0)
    _, eff = transition(at(S.ADMITTED, provisioned=True), E.ADOPTED, 1.0)
    assert eff[0] == RunPlan("restart", 1)
    _, eff = transition(at(S.RUNNING), E.ADOPTED, 1.0)
    assert kinds(eff) == [Publish]


def test_policy_from_demo_manifests() -> None:
    web = CellPolicy.from_manifest(load_manifest(str(SERVICES / "demo-web.toml")))
    assert (web.restart, web.backoff_initial_ms, web.backoff_max_ms, web.stable_ms) == (
        "on-failure", 500, 30_000, 30_000)
    client = CellPolicy.from_manifest(load_manifest(str(SERVICES / "demo-client.toml")))
    assert (client.restart, client.backoff_initial_ms, client.backoff_max_ms) == (
        "always", 1000, 60_000)


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_doubles_then_caps_then_resets_after_a_stable_run() -> None:
    pol = CellPolicy(restart="always", backoff_initial_ms=100, backoff_max_ms=1000,
                     stable_ms=10_000)
    cell = at(S.RUNNING, pol, started_at=0.0)
    now, delays = 0.0, []
    for _ in range(6):
        now += 1.0  # runs 1 s: not stable
        cell, eff = transition(cell, Exit(1), now)
        delays.append(round((eff[0].at - now) * 1000))  # type: ignore[union-attr]
        cell, _ = run(cell, E.RESTART_DUE, E.PLAN_START, E.PLAN_DONE, now=now)
    assert delays == [100, 200, 400, 800, 1000, 1000]
    cell, eff = transition(cell, Exit(1), now + 10.0)  # ran 10 s: stable
    assert eff[0] == ScheduleRestart(now + 10.1, cell.generation) and cell.streak == 1


def test_backoff_delay_does_not_overflow() -> None:
    pol = CellPolicy(backoff_initial_ms=10, backoff_max_ms=7 * 86_400_000)
    assert backoff_delay_ms(pol, 10_000) == 7 * 86_400_000


@settings(max_examples=200)
@given(initial=st.integers(10, 5000), extra=st.integers(0, 100_000),
       runs=st.lists(st.integers(0, 200_000), min_size=1, max_size=30))
def test_backoff_matches_its_definition(initial: int, extra: int, runs: list[int]) -> None:
    pol = CellPolicy(restart="always", backoff_initial_ms=initial,
                     backoff_max_ms=initial + extra, stable_ms=max(10_000, initial + extra))
    cell = at(S.RUNNING, pol, started_at=0.0)
    now, streak = 0.0, 0
    for ran_ms in runs:
        now += ran_ms / 1000
        cell, eff = transition(cell, Exit(0), now)
        streak = 0 if ran_ms >= pol.stable_ms else streak
        want = min(initial + extra, initial * 2 ** streak)
        sched = eff[0]
        assert isinstance(sched, ScheduleRestart)
        assert sched.at == now + want / 1000 and initial <= want <= pol.backoff_max_ms
        streak += 1
        cell, _ = run(cell, E.RESTART_DUE, E.PLAN_START, E.PLAN_DONE, now=now)
    assert cell.restarts == len(runs)


# -- random walks ----------------------------------------------------------------------------

EVENTS = st.one_of(st.sampled_from(list(Event)),
                   st.builds(Exit, st.none() | st.integers(0, 255), st.none() | st.integers(1, 64)))


@settings(max_examples=300)
@given(policy=st.builds(CellPolicy, mode=st.sampled_from(["oneshot", "service"]),
                        restart=st.sampled_from(["no", "on-failure", "always"]),
                        destroy_on_exit=st.booleans()),
       steps=st.lists(st.tuples(EVENTS, st.floats(0, 100)), max_size=60))
def test_random_event_sequences_keep_the_invariants(
        policy: CellPolicy, steps: list[tuple[Event | Exit, float]]) -> None:
    cell = Cell.new("web", policy, 0.0)
    now = 0.0
    admits = releases = 0
    for event, dt in steps:
        now += dt
        before = cell
        try:
            cell, effects = transition(cell, event, now)
        except LifecycleError as e:
            assert cell is before and e.state is cell.state
            continue
        ev = Event.SERVICE_EXITED if isinstance(event, Exit) else event
        admits += ev is Event.ADMIT
        releases += sum(isinstance(x, Release) for x in effects)
        assert admits - releases == int(cell.holds_budget)  # released once, never twice
        assert (cell.restart_at is not None) == (cell.state is S.BACKOFF)
        assert cell.generation >= before.generation
        if cell.state is S.DESTROYED:
            assert not cell.holds_budget and not cell.provisioned
        for x in effects:
            if isinstance(x, ScheduleRestart) and ev is not Event.ADOPTED:
                assert now + policy.backoff_initial_ms / 1000 <= x.at
                assert x.at <= now + policy.backoff_max_ms / 1000
            if isinstance(x, RunPlan) and x.purpose == "destroy":
                assert cell.state is S.DESTROYING
        if effects:
            assert isinstance(effects[-1], Publish)
            assert sum(isinstance(x, Publish) for x in effects) == 1


# -- records and drawing ---------------------------------------------------------------------


def test_cell_record_round_trips_through_cbor() -> None:
    cell = at(S.BACKOFF, CellPolicy(restart="always"), last_exit=Exit(None, 9),
              error="oom", restarts=3, streak=2)
    assert Cell.from_wire(cbor2.loads(cbor2.dumps(cell.to_wire()))) == cell
    fresh = Cell.new("a", CellPolicy(), 1.0)
    assert Cell.from_wire(cbor2.loads(cbor2.dumps(fresh.to_wire()))) == fresh


def test_diagram_has_one_edge_per_outcome() -> None:
    text = render_mermaid()
    edges = re.findall(r"^    (\w+) --> (\w+): (.+)$", text, re.M)
    n = sum(len(rule.targets) for rule in TRANSITIONS.values())
    assert len(edges) == n
    assert ("RUNNING", "BACKOFF", "SERVICE_EXITED (restart policy)") in edges
    assert render_dot().count(" -> ") == n


def test_doc_embeds_the_current_diagram() -> None:
    doc = (ROOT / "docs/lifecycle.md").read_text()
    m = re.search(r"```mermaid\n(.*?)```", doc, re.S)
    assert m is not None, "docs/lifecycle.md lost its mermaid block"
    assert m.group(1) == render_mermaid(), (
        "docs/lifecycle.md is stale: paste the output of `python -m agent.core.lifecycle`")


# -- the rules the cell manager follows beside the table --------------------------------------

@pytest.mark.parametrize("state", list(State))
@pytest.mark.parametrize("alive", [False, True])
@pytest.mark.parametrize("repaired", [False, True])
def test_adoption_feeds_only_events_the_machine_accepts(state: State, alive: bool,
                                                        repaired: bool) -> None:
    if state is S.DESTROYED:
        return  # a destroyed cell is forgotten: never journaled, never adopted
    cell = at(state)
    events = adoption(cell, alive, repaired)
    assert events and all(ev in (E.ADOPTED, E.PLAN_FAILED, E.STOP_REQUESTED)
                          for ev, _ in events)
    for ev, why in events:
        cell, _ = transition(cell, ev, 20.0, error=why)
    if state in LIVE and not alive:  # nothing runs: the cell is on its way out or failed
        assert cell.state in (S.STOPPING, S.DESTROYING, S.FAILED, S.BACKOFF, S.EXITED)
    if state is S.CREATING and repaired and not alive:
        assert events == ((E.PLAN_FAILED, "agentd restarted during the plan; it was undone"),)


def test_plan_events_are_what_the_machine_expects_of_every_plan() -> None:
    """Every RunPlan effect the table can produce, fed its PLAN_EVENTS in order, is
    accepted: start in the state that asked, then done and failed after it."""
    seen = set()
    for state, event in TRANSITIONS:
        for provisioned in (False, True):
            cell = at(state, provisioned=provisioned)
            try:
                new, effects = transition(cell, event, 10.0)
            except LifecycleError:
                continue
            for eff in effects:
                if not isinstance(eff, RunPlan):
                    continue
                seen.add(eff.purpose)
                pe = PLAN_EVENTS[eff.purpose]
                after = transition(new, pe.start, 11.0)[0] if pe.start is not None else new
                transition(after, pe.done, 12.0)
                transition(after, pe.failed, 12.0, error="x")
    assert seen == set(PLAN_EVENTS)


def test_the_state_sets_agree_with_the_machine() -> None:
    assert HOLDS_TABLE <= IN_FIREWALL and not IN_FIREWALL & {S.DESTROYING, S.DESTROYED}
    assert S.DESTROYED in LEAVING and not LEAVING & IN_FLIGHT
    assert IN_FLIGHT == {S.REQUESTED, S.ADMITTED, S.CREATING}
    for s in State:
        assert forgotten(at(s)) is (s is S.DESTROYED)
    assert forgotten(at(S.FAILED, provisioned=False, holds_budget=False))
    assert not forgotten(at(S.FAILED, provisioned=True, holds_budget=False))
    assert not forgotten(at(S.FAILED, provisioned=False, holds_budget=True))
