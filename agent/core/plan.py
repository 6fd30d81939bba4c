"""Plan, then execute: ordered, undoable operations, journaled so a crash is repaired.

A :class:`Plan` is a frozen tuple of :class:`Operation`\\ s for one cell (its *target*).
Pure code builds it; ``explain()`` shows it (``agentctl`` dry-run); an :class:`Executor`
applies it, journaling as it goes::

    plan-begin  {plan, target, purpose, ops: [{kind, args}, ...]}      fsync
    op-done     {plan, i, undo: {...}}            one per operation,   fsync
    plan-commit {plan}                                                  fsync

If operation *k* raises, the executor undoes operations k-1..0 in reverse (each journaled
``op-undone``), journals ``plan-abort`` and raises :class:`PlanError` naming operation *k*.
An ``apply`` that raises must leave nothing behind itself.

Contract for ``undo(ctx, undo_data)``: it is idempotent and tolerates partial application.
After a crash, :meth:`Executor.repair` undoes the operation that was in flight (applied
maybe half, maybe not at all, maybe entirely) with *empty* undo data, then the done
operations with their journaled undo data; undo of something already gone is success.

Operations are reconstructed from the journal by ``kind`` through :data:`OP_REGISTRY`
(``@register_op``).  :class:`DataOp` gives frozen dataclasses ``to_wire``/``from_wire``.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar

from agent.core.errors import AgentError

__all__ = [
    "OP_REGISTRY",
    "DataOp",
    "Executor",
    "IncompletePlan",
    "Journal",
    "Operation",
    "Plan",
    "PlanError",
    "PlanEvent",
    "PlanHook",
    "Record",
    "RepairReport",
    "op_from_wire",
    "op_to_wire",
    "recover",
    "register_op",
]

class Record(Protocol):
    """A journal record as the executor reads it (agent.kernel.journal.Record is one)."""

    @property
    def t(self) -> str: ...
    @property
    def data(self) -> Mapping[str, Any]: ...


class Journal(Protocol):
    """The journal the executor appends to and replays (agent.kernel.journal.Journal,
    or the cell manager's locked wrapper of it)."""

    def append(self, t: str, data: Mapping[str, Any] | None = None, *, sync: bool) -> Any: ...
    def replay(self) -> Iterable[Record]: ...


_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


class Operation(Protocol):
    """One small step of a plan, able to describe, apply and undo itself."""

    kind: ClassVar[str]

    def describe(self) -> str:
        """One human line, e.g. ``create cgroup /sys/fs/cgroup/agent/web``."""
        ...

    def apply(self, ctx: Any) -> Mapping[str, Any]:
        """Do it; return CBOR-encodable undo data.  On failure leave nothing behind."""
        ...

    def undo(self, ctx: Any, undo_data: Mapping[str, Any]) -> None:
        """Undo it; idempotent, and ``undo_data`` may be empty (crash mid-apply)."""
        ...

    def to_wire(self) -> dict[str, Any]:
        """CBOR-encodable arguments from which ``from_wire`` rebuilds the operation."""
        ...

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> Operation:
        ...


OP_REGISTRY: dict[str, type[Operation]] = {}
_T = TypeVar("_T", bound=type[Any])


def register_op(cls: _T) -> _T:
    """Class decorator: make ``cls`` reconstructible from the journal by its ``kind``."""
    kind = getattr(cls, "kind", None)
    if not isinstance(kind, str) or not _NAME_RE.fullmatch(kind):
        raise ValueError(f"operation class {cls.__name__} needs a `kind` like 'mkdir-cgroup'")
    other = OP_REGISTRY.get(kind)
    if other is not None and other is not cls:
        raise ValueError(f"operation kind {kind!r} is already registered by {other.__name__}")
    OP_REGISTRY[kind] = cls
    return cls


def op_to_wire(op: Operation) -> dict[str, Any]:
    return {"kind": op.kind, "args": op.to_wire()}


def op_from_wire(wire: object, registry: Mapping[str, type[Operation]] = OP_REGISTRY
                 ) -> Operation:
    """Rebuild an operation journaled by :func:`op_to_wire`."""
    if not isinstance(wire, Mapping) or not isinstance(wire.get("args"), Mapping):
        raise PlanError(f"malformed journaled operation {wire!r}",
                        "the journal holds {kind, args} maps")
    kind = wire.get("kind")
    cls = registry.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise PlanError(f"unknown operation kind {kind!r} in the journal",
                        "was the operation module imported before recovery?")
    return cls.from_wire(wire["args"])


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


class DataOp:
    """Mixin for frozen dataclass operations whose fields are CBOR-encodable.

    Lists come back from the journal as tuples, so declare sequence fields as tuples.
    """

    kind: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if set(args) != names:
            raise PlanError(f"journaled {cls.kind} has fields {sorted(args)}, "
                            f"expected {sorted(names)}")
        return cls(**{k: _tuplify(v) for k, v in args.items()})


class PlanError(AgentError):
    """A plan failed (the cause is chained) or could not be read back from the journal."""

    def __init__(self, message: str, hint: str | None = None, *, plan_id: str = "",
                 index: int = -1, undo_errors: Sequence[str] = ()) -> None:
        super().__init__("E_PLAN", message, hint)
        self.plan_id = plan_id
        self.index = index
        self.undo_errors = tuple(undo_errors)


@dataclass(frozen=True)
class Plan:
    """Ordered operations that create, destroy or change one cell."""

    id: str
    target: str
    purpose: str
    ops: tuple[Operation, ...]

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ValueError("a plan needs an id")
        if not _NAME_RE.fullmatch(self.purpose):
            raise ValueError(f"plan purpose {self.purpose!r} is not a short lower-case word")
        if not isinstance(self.ops, tuple):
            raise TypeError("Plan.ops must be a tuple")

    @classmethod
    def new(cls, target: str, purpose: str, ops: Iterable[Operation]) -> Plan:
        return cls(f"{purpose}-{target}-{uuid.uuid4().hex[:8]}", target, purpose, tuple(ops))

    def explain(self) -> list[str]:
        """What running the plan would do, one line per operation (``agentctl`` dry-run)."""
        n = len(self.ops)
        lines = [f"plan {self.id}: {self.purpose} {self.target}, {n} operation"
                 + ("" if n == 1 else "s")]
        width = len(str(n))
        lines += [f"{i:>{width}}. {op.describe()}" for i, op in enumerate(self.ops, 1)]
        return lines

    def to_wire(self) -> dict[str, Any]:
        return {"plan": self.id, "target": self.target, "purpose": self.purpose,
                "ops": [op_to_wire(op) for op in self.ops]}


@dataclass(frozen=True)
class PlanEvent:
    """Passed to the executor's hooks; ``attrs()`` suits ``EventBus.emit``."""

    kind: str  # op-applied, op-undone, op-undo-failed, plan-commit, plan-abort
    plan_id: str
    target: str
    purpose: str
    index: int = -1
    line: str = ""
    error: str | None = None
    step: str = ""  # the operation's kind (op-applied)

    def attrs(self) -> dict[str, Any]:
        d: dict[str, Any] = {"plan": self.plan_id, "purpose": self.purpose}
        if self.index >= 0:
            d["i"] = self.index
            d["op"] = self.line
        if self.step:
            d["step"] = self.step
        if self.error is not None:
            d["error"] = self.error
        return d


PlanHook = Callable[[PlanEvent], None]


@dataclass
class IncompletePlan:
    """A plan found in the journal with neither commit nor abort."""

    plan_id: str
    target: str
    purpose: str
    ops: tuple[Operation | None, ...]  # None: could not be rebuilt (see ``errors``)
    wires: tuple[Any, ...]
    done: dict[int, Mapping[str, Any]] = field(default_factory=dict)  # i -> undo data
    undone: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> int | None:
        """The operation that may have been half applied when the agent died."""
        nxt = max(self.done, default=-1) + 1
        return nxt if nxt < len(self.ops) else None

    def undo_order(self) -> list[tuple[int, Mapping[str, Any]]]:
        """What repair undoes, in order: the in-flight op with {}, then done ops reversed."""
        order: list[tuple[int, Mapping[str, Any]]] = []
        if self.in_flight is not None and self.in_flight not in self.undone:
            order.append((self.in_flight, {}))
        order += [(i, self.done[i]) for i in sorted(self.done, reverse=True)
                  if i not in self.undone]
        return order

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """The journal records that describe this plan's progress (for snapshots)."""
        recs: list[tuple[str, dict[str, Any]]] = [
            ("plan-begin", {"plan": self.plan_id, "target": self.target,
                            "purpose": self.purpose, "ops": list(self.wires)})]
        recs += [("op-done", {"plan": self.plan_id, "i": i, "undo": dict(u)})
                 for i, u in sorted(self.done.items())]
        recs += [("op-undone", {"plan": self.plan_id, "i": i}) for i in sorted(self.undone)]
        return recs


@dataclass(frozen=True)
class RepairReport:
    plan_id: str
    target: str
    undone: tuple[int, ...]
    errors: tuple[str, ...]


def recover(records: Iterable[Record], registry: Mapping[str, type[Operation]] = OP_REGISTRY
            ) -> list[IncompletePlan]:
    """Plans begun in the journal and neither committed nor aborted, oldest first.

    Pure; never raises on odd records (they are ignored or noted in ``errors``).
    """
    open_plans: dict[str, IncompletePlan] = {}
    for rec in records:
        pid = rec.data.get("plan")
        if not isinstance(pid, str):
            continue
        if rec.t == "plan-begin":
            wires = rec.data.get("ops")
            wires = tuple(wires) if isinstance(wires, list) else ()
            ops: list[Operation | None] = []
            errors: list[str] = []
            for i, w in enumerate(wires):
                try:
                    ops.append(op_from_wire(w, registry))
                except Exception as exc:
                    ops.append(None)
                    errors.append(f"op {i}: {exc}")
            open_plans[pid] = IncompletePlan(
                pid, str(rec.data.get("target", "")), str(rec.data.get("purpose", "")),
                tuple(ops), wires, errors=errors)
        elif rec.t in ("plan-commit", "plan-abort"):
            open_plans.pop(pid, None)
        elif pid in open_plans:
            plan = open_plans[pid]
            idx = rec.data.get("i")
            if not isinstance(idx, int) or not 0 <= idx < len(plan.ops):
                continue
            i = idx
            if rec.t == "op-done":
                undo = rec.data.get("undo")
                plan.done[i] = undo if isinstance(undo, Mapping) else {}
            elif rec.t == "op-undone":
                plan.undone.add(i)
    return list(open_plans.values())


def _err(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Executor:
    """Applies plans against ``ctx`` (whatever the operations need: roots, handles)."""

    def __init__(self, journal: Journal, ctx: Any, *, on_op_applied: PlanHook | None = None,
                 on_op_undone: PlanHook | None = None, on_plan_done: PlanHook | None = None
                 ) -> None:
        self.journal = journal
        self.ctx = ctx
        self.on_op_applied = on_op_applied
        self.on_op_undone = on_op_undone
        self.on_plan_done = on_plan_done
        self._open: dict[str, IncompletePlan] = {}

    def snapshot_records(self) -> list[tuple[str, dict[str, Any]]]:
        """Records of plans in progress, for the journal owner's snapshot function."""
        return [r for p in self._open.values() for r in p.records()]

    def _emit(self, hook: PlanHook | None, ev: PlanEvent) -> None:
        if hook is not None:
            hook(ev)

    def run(self, plan: Plan) -> tuple[Mapping[str, Any], ...]:
        """Apply every operation, or none: returns the undo data of each operation."""
        wire = plan.to_wire()
        self.journal.append("plan-begin", wire, sync=True)
        track = IncompletePlan(plan.id, plan.target, plan.purpose, plan.ops,
                               tuple(wire["ops"]))
        self._open[plan.id] = track
        applied: list[Mapping[str, Any]] = []
        i = 0
        try:
            for i, op in enumerate(plan.ops):
                undo = op.apply(self.ctx)
                applied.append(undo)
                self.journal.append("op-done", {"plan": plan.id, "i": i, "undo": dict(undo)},
                                    sync=True)
                track.done[i] = undo
                self._emit(self.on_op_applied, PlanEvent(
                    "op-applied", plan.id, plan.target, plan.purpose, i, op.describe(),
                    step=op.kind))
        except Exception as exc:
            undo_errors = self._rollback(track, list(enumerate(applied)))
            line = plan.ops[i].describe()
            self._finish(track, "plan-abort", {"reason": "error", "failed": i,
                                               "error": _err(exc), "undo_errors": undo_errors},
                         undo_errors)
            self._emit(self.on_plan_done, PlanEvent("plan-abort", plan.id, plan.target,
                                                    plan.purpose, i, line, _err(exc)))
            msg = f"{plan.purpose} {plan.target}: step {i + 1}/{len(plan.ops)} `{line}` failed"
            if undo_errors:
                msg += f"; {len(undo_errors)} undo(s) failed too"
            raise PlanError(f"{msg}: {_err(exc)}", "the steps before it were undone"
                            if not undo_errors else "leftovers are for the reclaim loop",
                            plan_id=plan.id, index=i, undo_errors=undo_errors) from exc
        try:
            self._finish(track, "plan-commit", {}, [])
        except Exception as exc:  # not committed (journal full?): a restart would undo it
            undo_errors = self._rollback(track, list(enumerate(applied)))
            self._finish(track, "plan-abort", {"reason": "not committed", "error": _err(exc),
                                               "undo_errors": undo_errors}, undo_errors)
            self._emit(self.on_plan_done, PlanEvent("plan-abort", plan.id, plan.target,
                                                    plan.purpose, error=_err(exc)))
            raise PlanError(f"{plan.purpose} {plan.target}: its commit was not journaled, so "
                            f"its {len(plan.ops)} steps were undone: {_err(exc)}",
                            "nothing is done that the journal does not record",
                            plan_id=plan.id, undo_errors=undo_errors) from exc
        self._emit(self.on_plan_done, PlanEvent("plan-commit", plan.id, plan.target,
                                                plan.purpose))
        return tuple(applied)

    def _rollback(self, track: IncompletePlan, order: Sequence[tuple[int, Mapping[str, Any]]],
                  *, reverse: bool = True) -> list[str]:
        """Undo ``order`` (reversed unless told otherwise); return the failures as text."""
        errors: list[str] = []
        for i, undo in (reversed(order) if reverse else order):
            op = track.ops[i]
            line = op.describe() if op is not None else f"operation {i}"
            try:
                if op is None:
                    raise PlanError(f"cannot rebuild {track.wires[i]!r}")
                op.undo(self.ctx, undo)
            except Exception as exc:
                errors.append(f"undo step {i + 1} `{line}`: {_err(exc)}")
                self._emit_quiet(errors, PlanEvent("op-undo-failed", track.plan_id,
                                                   track.target, track.purpose, i, line,
                                                   _err(exc)))
                continue
            try:
                self.journal.append("op-undone", {"plan": track.plan_id, "i": i}, sync=False)
                track.undone.add(i)
            except Exception as exc:
                errors.append(f"journal op-undone {i}: {_err(exc)}")
            self._emit_quiet(errors, PlanEvent("op-undone", track.plan_id, track.target,
                                               track.purpose, i, line))
        return errors

    def _emit_quiet(self, errors: list[str], ev: PlanEvent) -> None:
        """A hook failing during undo is reported with the undo errors, never raised."""
        try:
            self._emit(self.on_op_undone, ev)
        except Exception as exc:
            errors.append(f"hook on {ev.kind}: {_err(exc)}")

    def _finish(self, track: IncompletePlan, t: str, extra: dict[str, Any],
                errors: list[str]) -> None:
        try:
            self.journal.append(t, {"plan": track.plan_id, **extra}, sync=True)
        except Exception as exc:
            if t == "plan-commit":
                raise  # not committed: the caller must know; restart repairs it
            errors.append(f"journal {t}: {_err(exc)}")
        self._open.pop(track.plan_id, None)

    def recover(self, registry: Mapping[str, type[Operation]] = OP_REGISTRY
                ) -> list[IncompletePlan]:
        """Incomplete plans in this executor's journal."""
        return recover(self.journal.replay(), registry)

    def repair(self, plans: Iterable[IncompletePlan]) -> list[RepairReport]:
        """Undo what incomplete plans did (see the module's undo contract); never raises
        for a failing undo: failures are journaled in ``plan-abort`` and reported."""
        reports: list[RepairReport] = []
        for plan in plans:
            self._open[plan.plan_id] = plan
            order = plan.undo_order()
            errors = list(plan.errors) + self._rollback(plan, order, reverse=False)
            self._finish(plan, "plan-abort", {"reason": "recovered", "undo_errors": errors},
                         errors)
            self._emit(self.on_plan_done, PlanEvent("plan-abort", plan.plan_id, plan.target,
                                                    plan.purpose, error="recovered"))
            reports.append(RepairReport(plan.plan_id, plan.target,
                                        tuple(i for i, _ in order if i in plan.undone),
                                        tuple(errors)))
        return reports
