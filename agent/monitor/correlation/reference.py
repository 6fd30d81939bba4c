"""The brute-force matcher: what a match is, as plainly as it can be written.

It looks at the whole stream at once and shares no code with the engine but the
pattern model, so that the property tests (engine == reference on random streams and
patterns) test the engine's bookkeeping against the definition.  The definition
(docs/patterns.md, "What a match is"):

1. *Starts.*  For a plain first step, every event that satisfies it.  For a counting
   first step: walking the stream, each event that satisfies the step is counted in the
   window of its group (the values of its ``per`` attributes, and its cell under
   ``cells same``); the window holds the events of that group counted since the group's
   last completion, less those older than the count's ``within`` than the current
   event; when it holds N events (N distinct values of the ``distinct`` attribute) the
   step completes at the current event and the group's window is emptied.
2. *A run* from a start binds each later step to the first event after the previous
   step's event that satisfies the step, its joins with the steps bound so far and the
   cell relation (a counting step: the event at which its count, begun after the
   previous step, is reached).  The run dies at the first event after its start that
   is later than the start's time plus the span, or that satisfies an until clause
   (whose references to steps not yet bound are false).  A run that binds every step
   completes at the event that bound its last step.
3. *Matches.*  Of the runs of a pattern that complete at the same event, the one with
   the latest start (its first step's event) is the match.  Matches are ordered by the
   completing event, then by the pattern's place in the library.

A condition needs the attribute present and a single value (text, number, boolean,
null, but no NaN); numbers compare with numbers, booleans with booleans, texts with
texts.  The start's time is its event's time, or for a counting first step the time of
the earliest event the count needed (for distinct counts: the earliest of the latest
events of each value).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

from agent.monitor.correlation.event import EventLike
from agent.monitor.correlation.match import Link, Match
from agent.monitor.correlation.model import PSEUDO_ATTRS, Cond, Pattern, Ref, Selector, Step

__all__ = ["reference_matches"]

_MISSING = object()
Info = tuple[int, float, tuple[Any, ...]]


def _value(e: EventLike, attr: str) -> Any:
    return getattr(e, attr) if attr in PSEUDO_ATTRS else e.attrs.get(attr, _MISSING)


def _single(v: Any) -> bool:
    if isinstance(v, float):
        return not math.isnan(v)
    return v is None or isinstance(v, str | int | bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _number(a) or _number(b):
        return _number(a) and _number(b) and a == b
    return type(a) is type(b) and a == b


def _key(v: Any) -> Any:
    return ("bool", v) if isinstance(v, bool) else v


def _compare(op: str, v: Any, w: Any) -> bool:
    if op == "==":
        return _same(v, w)
    if op == "!=":
        return not _same(v, w)
    if not (_number(v) and _number(w)):
        return False
    return bool({"<": v < w, "<=": v <= w, ">": v > w, ">=": v >= w}[op])


def _holds(c: Cond, e: EventLike, binds: dict[str, EventLike]) -> bool:
    v = _value(e, c.attr)
    if not _single(v):
        return False
    lit = c.value
    if isinstance(lit, Ref):
        if lit.step not in binds:
            return False
        w = _value(binds[lit.step], lit.attr)
        return _single(w) and _compare(c.op, v, w)
    if c.op in ("in", "not in"):
        assert isinstance(lit, tuple)
        found = any(_same(v, x) for x in lit)
        return found if c.op == "in" else not found
    if c.op in ("~", "!~"):
        assert isinstance(lit, str)
        return isinstance(v, str) and fnmatch.fnmatchcase(v, lit) == (c.op == "~")
    return _compare(c.op, v, lit)


def _selects(s: Selector, e: EventLike) -> bool:
    return e.channel == s.channel and (s.kinds == ("*",) or e.kind in s.kinds)


def _satisfies(p: Pattern, k: int, e: EventLike, binds: dict[str, EventLike]) -> bool:
    st = p.steps[k]
    if not _selects(st.on, e) or not all(_holds(c, e, binds) for c in st.where):
        return False
    earlier = [binds[s.label].cell for s in p.steps[:k]]
    if p.cells == "same" and earlier and e.cell != earlier[0]:
        return False
    return not (p.cells == "distinct" and e.cell in earlier)


def _window(st: Step, counted: list[EventLike], e: EventLike) -> Info | None:
    """The count of ``st`` at ``e`` over ``counted`` (oldest first, ``e`` last)."""
    assert st.count is not None
    inside = [x for x in counted if e.mono - x.mono <= st.count.within]
    if st.count.distinct is None:
        return (len(inside), inside[0].mono, ()) if len(inside) >= st.count.n else None
    last: dict[Any, tuple[float, Any]] = {}
    for x in inside:
        v = _value(x, st.count.distinct)
        last.pop(_key(v), None)
        last[_key(v)] = (x.mono, v)
    if len(last) < st.count.n:
        return None
    return len(last), next(iter(last.values()))[0], tuple(v for _, v in last.values())


def _counts(st: Step, e: EventLike) -> bool:
    assert st.count is not None
    return st.count.distinct is None or _single(_value(e, st.count.distinct))


def _starts(p: Pattern, events: Sequence[EventLike]) -> list[tuple[int, float, Info | None]]:
    """(index of the first step's event, the start's time, its count summary)."""
    st = p.steps[0]
    if st.count is None:
        return [(i, e.mono, None) for i, e in enumerate(events) if _satisfies(p, 0, e, {})]
    out: list[tuple[int, float, Info | None]] = []
    groups: dict[tuple[Any, ...], list[EventLike]] = {}
    per = st.count.per + (("cell",) if p.cells == "same" else ())
    for i, e in enumerate(events):
        if not _satisfies(p, 0, e, {}) or not _counts(st, e):
            continue
        vals = [_value(e, a) for a in per]
        if not all(_single(v) for v in vals):
            continue
        group = groups.setdefault(tuple(_key(v) for v in vals), [])
        group.append(e)
        info = _window(st, group, e)
        if info is not None:
            out.append((i, info[1], info))
            group.clear()
    return out


def _run(p: Pattern, events: Sequence[EventLike], i0: int, start: float,
         info0: Info | None) -> tuple[int, list[EventLike], list[Info | None]] | None:
    binds = {p.steps[0].label: events[i0]}
    chain: list[EventLike] = [events[i0]]
    infos: list[Info | None] = [info0]
    counted: list[EventLike] = []
    for j in range(i0 + 1, len(events)):
        if len(chain) == len(p.steps):
            break
        u = events[j]
        if any(_selects(t.on, u) and all(_holds(c, u, binds) for c in t.where)
               for t in p.until):
            return None
        if u.mono - start > p.within:
            return None
        k = len(chain)
        st = p.steps[k]
        if not _satisfies(p, k, u, binds):
            continue
        info = None
        if st.count is not None:
            if not _counts(st, u):
                continue
            counted.append(u)
            info = _window(st, counted, u)
            if info is None:
                continue
            counted = []
        binds[st.label] = u
        chain.append(u)
        infos.append(info)
        if len(chain) == len(p.steps):
            return j, chain, infos
    return (i0, chain, infos) if len(chain) == len(p.steps) else None


def _shown(p: Pattern) -> list[list[str]]:
    out: list[list[str]] = [[] for _ in p.steps]
    for i, st in enumerate(p.steps):
        extra = [a for a in (st.count.distinct, *st.count.per) if a] if st.count else []
        for a in [c.attr for c in st.where] + extra:
            out[i].append(a)
        for c in st.where:
            if isinstance(c.value, Ref):
                out[p.label_index(c.value.step)].append(c.value.attr)
    return [[a for a in dict.fromkeys(names) if a not in ("cell", "channel", "kind")]
            for names in out]


def reference_matches(patterns: Sequence[Pattern], events: Sequence[EventLike]
                      ) -> list[Match]:
    """Every match of ``patterns`` over the whole of ``events`` (see the module doc)."""
    found: list[tuple[int, int, Match]] = []
    for pi, p in enumerate(patterns):
        best: dict[int, tuple[int, list[EventLike], list[Info | None]]] = {}
        for i0, start, info0 in _starts(p, events):
            r = _run(p, events, i0, start, info0)
            if r is None:
                continue
            end, chain, infos = r
            if end not in best or chain[0].seq > best[end][1][0].seq:
                best[end] = r
        shown = _shown(p)
        for end, (_, chain, infos) in best.items():
            links = tuple(
                Link(st.label, e.seq, e.mono, e.ts, e.cell, e.channel, e.kind,
                     tuple((a, _value(e, a)) for a in shown[k]
                           if _value(e, a) is not _MISSING),
                     *(info if info is not None else ()))
                for k, (st, e, info) in enumerate(zip(p.steps, chain, infos, strict=True)))
            found.append((end, pi, Match(p.name, p.digest, p.severity, p.response, p.tags,
                                         links)))
    found.sort(key=lambda t: (t[0], t[1]))
    return [m for _, _, m in found]
