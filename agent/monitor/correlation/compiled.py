"""A pattern made fast to match: predicates and join plans built once per pattern.

Conditions with a literal become one predicate per step (its *static* test, which
needs only the event).  Conditions with a step's attribute are *joins*: the engine
reads the event's side once per step and event, and each partial match keeps the
bound side (``want``) it computed when it began to await the step; the first equality
join is the *probe*, an index from the bound value to the partials awaiting it.  The
cell relation of the pattern (``cells same`` / ``cells distinct``) is compiled into
joins on ``cell``.

Semantics of a condition (docs/patterns.md): the attribute must be present and a single
value (text, number, boolean or null); otherwise the condition is false, ``!=`` and
``not in`` included.  Numbers compare as numbers (1 == 1.0), booleans only with
booleans, texts only with texts.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.monitor.correlation.event import EventLike
from agent.monitor.correlation.model import PSEUDO_ATTRS, Cond, Count, Pattern, Ref, Selector

__all__ = [
    "NA",
    "CStep",
    "CUntil",
    "CompiledPattern",
    "Gate",
    "Getter",
    "compile_pattern",
    "getter",
    "norm",
    "values_of",
]

Getter = Callable[[EventLike], Any]
Pred = Callable[[EventLike], bool]
Gate = tuple[str, frozenset[Any]]  # (attribute, the normalized values it may have)
NA: Any = type("NA", (), {"__repr__": lambda self: "NA"})()  # missing or not one value


class _Bool:
    """A boolean as a join/index key that never equals a number."""

    __slots__ = ("v",)

    def __init__(self, v: bool) -> None:
        self.v = v

    def __repr__(self) -> str:
        return f"<{self.v}>"


_TRUE, _FALSE = _Bool(True), _Bool(False)


def norm(v: Any) -> Any:
    """A value as a key for joins, indexes and distinct counts (NA if unusable)."""
    t = v.__class__
    if t is str or t is int or v is None:
        return v
    if t is bool:
        return _TRUE if v else _FALSE
    if t is float:
        return v if v == v else NA  # NaN equals nothing, itself included
    return NA


def getter(attr: str) -> Getter:
    if attr in PSEUDO_ATTRS:
        return operator.attrgetter(attr)

    def get(e: EventLike) -> Any:
        return e.attrs.get(attr, NA)

    return get


def values_of(getters: tuple[Getter, ...]) -> Callable[[EventLike], tuple[Any, ...]]:
    """``e -> (norm(g(e)) for g in getters)``, unrolled for the usual one or two."""
    if not getters:
        return lambda e: ()
    if len(getters) == 1:
        (a,) = getters
        return lambda e: (norm(a(e)),)
    if len(getters) == 2:
        a, b = getters
        return lambda e: (norm(a(e)), norm(b(e)))
    return lambda e: tuple(norm(g(e)) for g in getters)


def _number(v: Any) -> bool:
    t = v.__class__
    return t is int or t is float


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def join_holds(op: str, ev: Any, want: Any) -> bool:
    """A join between normalized values (``ev`` the event's, ``want`` the bound one)."""
    if ev is NA or want is NA:
        return False
    if op == "==":
        return bool(ev == want)
    if op == "!=":
        return bool(ev != want)
    return _number(ev) and _number(want) and _ORDER[op](ev, want)


def _static(c: Cond) -> Pred:
    g = getter(c.attr)
    lit, op = c.value, c.op
    if op in ("==", "!="):
        key = norm(lit)
        if op == "==":
            return lambda e: norm(g(e)) == key
        return lambda e: (v := norm(g(e))) is not NA and v != key
    if op in ("in", "not in"):
        assert isinstance(lit, tuple)
        keys = frozenset(norm(x) for x in lit)
        if op == "in":
            return lambda e: norm(g(e)) in keys
        return lambda e: (v := norm(g(e))) is not NA and v not in keys
    if op in ("~", "!~"):
        assert isinstance(lit, str)
        match = re.compile(fnmatch.translate(lit), re.S).match
        want = op == "~"
        return lambda e: (v := g(e)).__class__ is str and (match(v) is not None) is want
    cmp, bound = _ORDER[op], lit
    return lambda e: _number(v := g(e)) and cmp(v, bound)


def _gate(conds: list[Cond]) -> Gate | None:
    """The first condition that allows only some values of an attribute."""
    for c in conds:
        if c.op == "==" and not isinstance(c.value, Ref):
            return c.attr, frozenset({norm(c.value)})
        if c.op == "in" and isinstance(c.value, tuple):
            return c.attr, frozenset(norm(v) for v in c.value)
    return None


def _all(preds: list[Pred]) -> Pred | None:
    if not preds:
        return None
    if len(preds) == 1:
        return preds[0]
    if len(preds) == 2:
        a, b = preds
        return lambda e: a(e) and b(e)
    ps = tuple(preds)
    return lambda e: all(p(e) for p in ps)


@dataclass(frozen=True, slots=True)
class CStep:
    index: int
    label: str
    last: bool
    static: Pred | None
    jget: tuple[Getter, ...]  # the event's side of each join
    jvals: Callable[[EventLike], tuple[Any, ...]]  # ... as normalized values
    jops: tuple[str, ...]
    jrefs: tuple[tuple[int, Getter], ...]  # the bound side: (step index, its getter)
    all_eq: bool  # every join is ==: compare tuples at once
    probe: int  # index of the join whose bound value keys the partials (-1: none)
    count: Count | None
    dget: Getter | None  # count distinct ATTR
    pget: tuple[Getter, ...]  # count ... per ATTRS (first step)
    pvals: Callable[[EventLike], tuple[Any, ...]]
    keys: tuple[tuple[str, Getter], ...]  # what a match shows of this step's event
    sig: tuple[tuple[int, Getter], ...]  # bound values later steps and until look at
    sig0: Callable[[EventLike], tuple[Any, ...]]  # the sig when only step 0 is bound
    gate: Gate | None  # an == or in condition: the engine's index on event values


@dataclass(frozen=True, slots=True)
class CUntil:
    gate: Gate | None
    static: Pred | None
    jget: tuple[Getter, ...]
    jops: tuple[str, ...]
    jrefs: tuple[tuple[int, Getter], ...]


@dataclass(frozen=True, slots=True)
class CompiledPattern:
    pattern: Pattern
    digest: str
    steps: tuple[CStep, ...]
    until: tuple[CUntil, ...]
    # selector -> what it feeds: step indexes and until indexes
    step_on: tuple[Selector, ...]
    until_on: tuple[Selector, ...]


def _joins(p: Pattern, conds: list[Cond]) -> tuple[tuple[Getter, ...], tuple[str, ...],
                                                    tuple[tuple[int, Getter], ...]]:
    refs = [c for c in conds if isinstance(c.value, Ref)]
    refs.sort(key=lambda c: c.op != "==")  # equalities first: the probe is the first
    jrefs = []
    for c in refs:
        assert isinstance(c.value, Ref)
        jrefs.append((p.label_index(c.value.step), getter(c.value.attr)))
    return tuple(getter(c.attr) for c in refs), tuple(c.op for c in refs), tuple(jrefs)


def _conds(p: Pattern, i: int) -> list[Cond]:
    """The step's conditions with the pattern's cell relation added as joins."""
    out = list(p.steps[i].where)
    if i and p.cells == "same":
        out.append(Cond("cell", "==", Ref(p.steps[0].label, "cell")))
    elif i and p.cells == "distinct":
        out += [Cond("cell", "!=", Ref(p.steps[j].label, "cell")) for j in range(i)]
    return out


def compile_pattern(p: Pattern) -> CompiledPattern:
    n = len(p.steps)
    step_conds = [_conds(p, i) for i in range(n)]
    # what each step's event is looked at for: its own attributes, and those others refer to
    shown: list[dict[str, None]] = [{} for _ in range(n)]
    referred: list[set[tuple[int, str]]] = [set() for _ in range(n + 1)]  # by step >= i
    for i, conds in enumerate(step_conds):
        st = p.steps[i]
        extra = [a for a in (st.count.distinct, *st.count.per) if a] if st.count else []
        for a in [c.attr for c in conds] + extra:
            shown[i][a] = None
        for c in conds:
            if isinstance(c.value, Ref):
                j = p.label_index(c.value.step)
                shown[j][c.value.attr] = None
                referred[i].add((j, c.value.attr))
    until_refs = {(p.label_index(c.value.step), c.value.attr)
                  for u in p.until for c in u.where if isinstance(c.value, Ref)}
    for i in range(n - 1, -1, -1):
        referred[i] |= referred[i + 1]
    steps = []
    for i, st in enumerate(p.steps):
        conds = step_conds[i]
        jget, jops, jrefs = _joins(p, conds)
        sig = sorted((j, a) for j, a in referred[i] | until_refs if j < i)
        pget = tuple(getter(a) for a in (st.count.per if st.count else ())) + (
            (getter("cell"),) if i == 0 and st.count and p.cells == "same" else ())
        steps.append(CStep(
            index=i, label=st.label, last=i == n - 1,
            static=_all([_static(c) for c in conds if not isinstance(c.value, Ref)]),
            jget=jget, jvals=values_of(jget), jops=jops, jrefs=jrefs,
            all_eq=all(o == "==" for o in jops),
            probe=0 if jops and jops[0] == "==" else -1, count=st.count,
            dget=getter(st.count.distinct) if st.count and st.count.distinct else None,
            pget=pget, pvals=values_of(pget),
            keys=tuple((a, getter(a)) for a in shown[i]
                       if a not in ("cell", "channel", "kind")),
            sig=tuple((j, getter(a)) for j, a in sig),
            sig0=values_of(tuple(getter(a) for j, a in sig if j == 0)), gate=_gate(conds)))
    until = []
    for u in p.until:
        conds = list(u.where)
        jget, jops, jrefs = _joins(p, conds)
        until.append(CUntil(_gate(conds),
                            _all([_static(c) for c in conds if not isinstance(c.value, Ref)]),
                            jget, jops, jrefs))
    return CompiledPattern(p, p.digest, tuple(steps), tuple(until),
                           tuple(s.on for s in p.steps), tuple(u.on for u in p.until))
