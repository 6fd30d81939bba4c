"""A pattern's wire form decoded: the inverse of :meth:`~.model.Pattern.to_wire`.

The map comes from a bundle, so every field is checked for its type here, and the
pattern then passes the model's validation like one written in the language.
"""

from __future__ import annotations

from typing import Any

from agent.monitor.correlation.model import (
    Cond,
    Count,
    Pattern,
    PatternError,
    Ref,
    Selector,
    Step,
    Until,
)

__all__ = ["pattern_from_wire"]


def _bad_wire(what: str) -> PatternError:
    return PatternError("E_PATTERN_WIRE", f"malformed pattern: {what}",
                        "rebuild the bundle with agent-patterns build")


def _get(obj: Any, key: str, typ: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _bad_wire(f"no {key!r}")
    v = obj[key]
    if not isinstance(v, typ) or (isinstance(v, bool) and typ in (int, float, (int, float))):
        raise _bad_wire(f"{key!r} has the wrong type")
    return v


def _sel_from(obj: Any) -> Selector:
    if (not isinstance(obj, list) or len(obj) != 2 or not isinstance(obj[0], str)
            or not isinstance(obj[1], list) or not all(isinstance(k, str) for k in obj[1])):
        raise _bad_wire("a selector is [channel, [kinds]]")
    return Selector(obj[0], tuple(obj[1]))


def _cond_from(obj: Any) -> Cond:
    if not isinstance(obj, list) or len(obj) != 3 or not isinstance(obj[0], str) \
            or not isinstance(obj[1], str):
        raise _bad_wire("a condition is [attr, op, value]")
    v = obj[2]
    if isinstance(v, dict):
        r = v.get("ref")
        if set(v) != {"ref"} or not isinstance(r, list) or len(r) != 2 \
                or not all(isinstance(x, str) for x in r):
            raise _bad_wire("a reference is {'ref': [step, attr]}")
        return Cond(obj[0], obj[1], Ref(r[0], r[1]))
    if isinstance(v, list):
        return Cond(obj[0], obj[1], tuple(v))
    return Cond(obj[0], obj[1], v)


def pattern_from_wire(obj: Any) -> Pattern:
    """The pattern of a wire map; raises :class:`PatternError` if it is malformed or
    invalid (the same checks as the language)."""
    keys = {"name", "within", "steps", "until", "cells", "severity", "response", "tags",
            "about"}
    if not isinstance(obj, dict) or set(obj) != keys:
        raise _bad_wire(f"a pattern is a map of {', '.join(sorted(keys))}")
    steps = []
    for s in _get(obj, "steps", list):
        c = _get(s, "count", (dict, type(None)))
        count = None if c is None else Count(
            _get(c, "n", int), float(_get(c, "within", (int, float))),
            _get(c, "distinct", (str, type(None))), tuple(_get(c, "per", list)))
        if set(s) != {"label", "on", "where", "count"}:
            raise _bad_wire("a step is a map of label, on, where, count")
        steps.append(Step(_get(s, "label", str), _sel_from(s["on"]),
                          tuple(_cond_from(x) for x in _get(s, "where", list)), count))
    until = []
    for u in _get(obj, "until", list):
        if not isinstance(u, dict) or set(u) != {"on", "where"}:
            raise _bad_wire("an until clause is a map of on, where")
        until.append(Until(_sel_from(u["on"]),
                           tuple(_cond_from(x) for x in _get(u, "where", list))))
    return Pattern(
        name=_get(obj, "name", str), within=float(_get(obj, "within", (int, float))),
        steps=tuple(steps), until=tuple(until), cells=_get(obj, "cells", str),
        severity=_get(obj, "severity", str), response=_get(obj, "response", str),
        tags=tuple(_get(obj, "tags", list)), about=_get(obj, "about", str))
