"""What a pattern is: frozen, validated records, and their CBOR wire form.

A :class:`Pattern` is an ordered sequence of :class:`Step`\\ s.  Each step awaits events
of one channel and one or more kinds (:class:`Selector`) whose attributes satisfy its
conditions (:class:`Cond`); a condition compares an attribute with a literal or, to join
steps by key, with an attribute of an earlier step (:class:`Ref`).  A step may count
(:class:`Count`: N events, or N distinct values of an attribute, within a window).  The
pattern has a maximum span from its first event to its last (``within``), a relation
between the steps' cells, "until" clauses that cancel a partial match, and what an
alert says and asks for (severity, response, tags).

Validation lives here, so that a pattern from the text language and one decoded from a
bundle (:mod:`.wire`) pass the same checks; a failure raises :class:`PatternError` with a
code, a hint and the step it concerns (the language adds the file and line).  docs/patterns.md
describes the language and the semantics; :data:`ENGINE_VERSION` is what this engine
implements (bundles state the minimum they need).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import cbor2

from agent.core.errors import ConfigError

__all__ = [
    "CELL_RELATIONS",
    "ENGINE_VERSION",
    "JOIN_OPS",
    "LIMITS",
    "OPS",
    "PSEUDO_ATTRS",
    "RESPONSES",
    "SEVERITIES",
    "Cond",
    "Count",
    "Pattern",
    "PatternError",
    "Ref",
    "Scalar",
    "Selector",
    "Step",
    "Until",
    "check_cond",
]

# 1: steps, keys, span, cells, until, count [distinct] [per] (docs/patterns.md).
ENGINE_VERSION = 1

SEVERITIES = ("info", "notice", "alert")
RESPONSES = ("record", "kill", "freeze", "isolate", "stop")
CELL_RELATIONS = ("any", "same", "distinct")
OPS = ("==", "!=", "<", "<=", ">", ">=", "~", "!~", "in", "not in")
JOIN_OPS = ("==", "!=", "<", "<=", ">", ">=")  # the operators a Ref may follow
# Read from the event record rather than from its attributes.
PSEUDO_ATTRS = ("cell", "channel", "kind", "severity")


@dataclass(frozen=True)
class _Limits:
    steps: int = 16
    conds: int = 32
    until: int = 8
    set_size: int = 256
    text: int = 256
    tags: int = 16
    count: int = 10_000
    span_s: float = 86_400.0


LIMITS = _Limits()

Scalar = str | int | float | bool | None
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}")  # channels, kinds (as agent.core.events)
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,63}")  # attributes, step labels, tags
_PATTERN_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")


class PatternError(ConfigError):
    """A pattern is invalid.  ``step`` is the index of the step concerned (None: the
    pattern as a whole), ``clause`` the clause ("count" of that step, or "until", then
    ``step`` is the index of the until clause); the language turns them into a line."""

    def __init__(self, code: str, message: str, hint: str | None = None, *,
                 step: int | None = None, clause: str | None = None) -> None:
        super().__init__(code, message, hint)
        self.step = step
        self.clause = clause


@dataclass(frozen=True)
class Ref:
    """The attribute ``attr`` of the event bound to the step labelled ``step``."""

    step: str
    attr: str


@dataclass(frozen=True)
class Cond:
    """``attr op value``; ``value`` is a scalar, a tuple (in / not in) or a :class:`Ref`."""

    attr: str
    op: str
    value: Scalar | tuple[Scalar, ...] | Ref


@dataclass(frozen=True)
class Selector:
    """Events of ``channel`` whose kind is one of ``kinds`` (``("*",)``: any kind)."""

    channel: str
    kinds: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.channel}/{'|'.join(self.kinds)}"


@dataclass(frozen=True)
class Count:
    """Complete the step after ``n`` events (or ``n`` distinct values of ``distinct``)
    within ``within`` seconds; ``per``: a separate count per value of these attributes
    (first step only)."""

    n: int
    within: float
    distinct: str | None = None
    per: tuple[str, ...] = ()


@dataclass(frozen=True)
class Step:
    label: str
    on: Selector
    where: tuple[Cond, ...] = ()
    count: Count | None = None


@dataclass(frozen=True)
class Until:
    """An event that cancels a partial match (conditions may refer to bound steps)."""

    on: Selector
    where: tuple[Cond, ...] = ()


@dataclass(frozen=True)
class Pattern:
    name: str
    within: float
    steps: tuple[Step, ...]
    until: tuple[Until, ...] = ()
    cells: str = "any"
    severity: str = "alert"
    response: str = "record"
    tags: tuple[str, ...] = ()
    about: str = ""

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def digest(self) -> str:
        """sha256 of the canonical CBOR of the wire form: the pattern's identity with its
        name (a swap keeps the partial matches of a pattern whose digest is unchanged)."""
        return hashlib.sha256(cbor2.dumps(self.to_wire(), canonical=True)).hexdigest()

    def label_index(self, label: str) -> int:
        return next(i for i, s in enumerate(self.steps) if s.label == label)

    def to_wire(self) -> dict[str, Any]:
        return {
            "name": self.name, "within": float(self.within),
            "steps": [{"label": s.label, "on": _sel_wire(s.on),
                       "where": [_cond_wire(c) for c in s.where],
                       "count": None if s.count is None else {
                           "n": s.count.n, "within": float(s.count.within),
                           "distinct": s.count.distinct, "per": list(s.count.per)}}
                      for s in self.steps],
            "until": [{"on": _sel_wire(u.on), "where": [_cond_wire(c) for c in u.where]}
                      for u in self.until],
            "cells": self.cells, "severity": self.severity, "response": self.response,
            "tags": list(self.tags), "about": self.about,
        }


# -- wire form -------------------------------------------------------------------------------

def _sel_wire(s: Selector) -> list[Any]:
    return [s.channel, list(s.kinds)]


def _cond_wire(c: Cond) -> list[Any]:
    v = c.value
    if isinstance(v, Ref):
        return [c.attr, c.op, {"ref": [v.step, v.attr]}]
    return [c.attr, c.op, list(v) if isinstance(v, tuple) else v]


# -- validation ------------------------------------------------------------------------------

def _one_of(what: str, value: object, allowed: tuple[str, ...]) -> PatternError:
    return PatternError("E_PATTERN_VALUE", f"{what} {value!r} is not known",
                        f"use one of: {', '.join(allowed)}", clause=what)


def _is_scalar(v: object) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)  # a literal; events may carry any float
    return v is None or isinstance(v, str | int | bool)


def _check_attr(attr: object, where: str, step: int | None, clause: str | None) -> None:
    if not isinstance(attr, str) or not _IDENT.fullmatch(attr):
        raise PatternError("E_PATTERN_VALUE", f"{where}: {attr!r} is not an attribute name",
                           "attribute names are lower-case letters, digits and _",
                           step=step, clause=clause)


def check_cond(c: Cond, labels: tuple[str, ...], before: int | None,
               step: int | None = None, clause: str | None = None) -> None:
    """Check one condition of a pattern whose steps are ``labels``: a reference must name
    a step, and one before step ``before`` (None: any step, for until clauses)."""
    def bad(msg: str, hint: str, code: str = "E_PATTERN_VALUE") -> PatternError:
        return PatternError(code, msg, hint, step=step, clause=clause)

    _check_attr(c.attr, "condition", step, clause)
    if c.op not in OPS:
        raise bad(f"operator {c.op!r} is not known", f"use one of: {', '.join(OPS)}")
    v = c.value
    if isinstance(v, Ref):
        if c.op not in JOIN_OPS:
            raise bad(f"{c.attr} {c.op} {v.step}.{v.attr}: {c.op} cannot take a step's "
                      "attribute", f"compare with one of: {' '.join(JOIN_OPS)}")
        _check_attr(v.attr, "reference", step, clause)
        if v.step not in labels:
            raise bad(f"{v.step}.{v.attr}: there is no step {v.step!r}",
                      f"the steps are {', '.join(labels)}; quote it (\"{v.step}.{v.attr}\")"
                      " if you meant a text", "E_PATTERN_REF")
        if before is not None and labels.index(v.step) >= before:
            raise bad(f"{v.step}.{v.attr}: step {v.step} is not before this step",
                      "a step's conditions refer only to earlier steps", "E_PATTERN_REF")
    elif c.op in ("in", "not in"):
        if not isinstance(v, tuple) or not 0 < len(v) <= LIMITS.set_size \
                or not all(_is_scalar(x) for x in v):
            raise bad(f"{c.attr} {c.op}: a set of 1 to {LIMITS.set_size} values is needed",
                      'write e.g. {mount, umount2} or {"a b", 3}')
        if len({("bool", x) if isinstance(x, bool) else x for x in v}) != len(v):
            raise bad(f"{c.attr} {c.op}: a value is repeated", "list each value once")
    elif c.op in ("~", "!~"):
        if not isinstance(v, str) or not v:
            raise bad(f"{c.attr} {c.op}: a glob needs a text", 'write e.g. "/data/shared/*"')
    elif c.op in ("<", "<=", ">", ">="):
        if isinstance(v, bool) or not isinstance(v, int | float) or not _is_scalar(v):
            raise bad(f"{c.attr} {c.op} {v!r}: a number is needed", "write e.g. uid < 1000")
    elif not _is_scalar(v):
        raise bad(f"{c.attr} {c.op} {v!r}: a single value is needed",
                  "use 'in {...}' to compare with several values")
    if isinstance(v, str) and len(v) > LIMITS.text:
        raise bad(f"a text longer than {LIMITS.text} characters", "shorten it")


def _check_selector(s: Selector, step: int | None, clause: str | None) -> None:
    if not isinstance(s.channel, str) or not _NAME.fullmatch(s.channel):
        raise PatternError("E_PATTERN_VALUE", f"{s.channel!r} is not a channel name",
                           "write CHANNEL/KIND, e.g. net/flow", step=step, clause=clause)
    if not s.kinds or len(set(s.kinds)) != len(s.kinds) or not all(
            isinstance(k, str) and (_NAME.fullmatch(k) or k == "*") for k in s.kinds) \
            or ("*" in s.kinds and len(s.kinds) > 1):
        raise PatternError("E_PATTERN_VALUE", f"{s.channel}/{'|'.join(map(str, s.kinds))}: "
                           "bad kind list", "write KIND, KIND|KIND... or * (docs/events.md)",
                           step=step, clause=clause)


def _check_duration(d: object, what: str, step: int | None = None,
                    clause: str | None = None) -> None:
    if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d) \
            or not 0 < d <= LIMITS.span_s:
        raise PatternError("E_PATTERN_VALUE", f"{what} must be above 0 and at most 24h",
                           "write e.g. 30s, 5m or 1h", step=step, clause=clause)


def _validate(p: Pattern) -> None:
    if not isinstance(p.name, str) or not _PATTERN_NAME.fullmatch(p.name):
        raise PatternError("E_PATTERN_VALUE", f"{p.name!r} is not a pattern name",
                           "lower-case letters, digits and -, starting with a letter")
    _check_duration(p.within, "within", clause="within")
    if not 0 < len(p.steps) <= LIMITS.steps:
        raise PatternError("E_PATTERN_MISSING", f"pattern {p.name} needs 1 to "
                           f"{LIMITS.steps} steps", "add 'step LABEL: CHANNEL/KIND ...'")
    if p.cells not in CELL_RELATIONS:
        raise _one_of("cells", p.cells, CELL_RELATIONS)
    if p.severity not in SEVERITIES:
        raise _one_of("severity", p.severity, SEVERITIES)
    if p.response not in RESPONSES:
        raise _one_of("response", p.response, RESPONSES)
    if len(p.tags) > LIMITS.tags or not all(isinstance(t, str) and _IDENT.fullmatch(t)
                                            for t in p.tags):
        raise PatternError("E_PATTERN_VALUE", "tags are up to 16 lower-case words",
                           "write e.g. tag master net", clause="tag")
    if not isinstance(p.about, str) or len(p.about) > LIMITS.text:
        raise PatternError("E_PATTERN_VALUE", "about is one line of text", "shorten it",
                           clause="about")
    if len(p.until) > LIMITS.until:
        raise PatternError("E_PATTERN_VALUE", f"more than {LIMITS.until} until clauses",
                           "merge them with 'in {...}'", clause="until")
    seen: set[str] = set()
    labels = tuple(s.label for s in p.steps)
    for i, s in enumerate(p.steps):
        if not isinstance(s.label, str) or not _IDENT.fullmatch(s.label) \
                or s.label in PSEUDO_ATTRS:
            raise PatternError("E_PATTERN_VALUE", f"{s.label!r} is not a step label",
                               "lower-case letters, digits and _ (not cell, channel, kind "
                               "or severity)", step=i)
        if s.label in seen:
            raise PatternError("E_PATTERN_DUPLICATE", f"two steps are labelled {s.label}",
                               "give each step its own label", step=i)
        seen.add(s.label)
        _check_selector(s.on, i, None)
        if len(s.where) > LIMITS.conds:
            raise PatternError("E_PATTERN_VALUE", f"more than {LIMITS.conds} conditions",
                               "split the step", step=i)
        for c in s.where:
            check_cond(c, labels, i, i)
        if s.count is not None:
            _check_count(s.count, p, i)
    for k, u in enumerate(p.until):
        _check_selector(u.on, k, "until")
        for c in u.where:
            check_cond(c, labels, None, k, "until")


def _check_count(c: Count, p: Pattern, i: int) -> None:
    if isinstance(c.n, bool) or not isinstance(c.n, int) or not 2 <= c.n <= LIMITS.count:
        raise PatternError("E_PATTERN_VALUE", f"count {c.n!r}: between 2 and "
                           f"{LIMITS.count}", "count 1 is the step itself: drop 'count'",
                           step=i, clause="count")
    _check_duration(c.within, "the count's window", i, "count")
    if c.within > p.within:
        raise PatternError("E_PATTERN_VALUE", f"the count's window ({c.within:g}s) is longer "
                           f"than the pattern's span ({p.within:g}s)", "shorten the window "
                           "or lengthen 'within' of the pattern", step=i, clause="count")
    if c.distinct is not None:
        _check_attr(c.distinct, "count distinct", i, "count")
    for a in c.per:
        _check_attr(a, "count per", i, "count")
    if c.per and i:
        raise PatternError("E_PATTERN_VALUE", "'per' is only for a count at the first step",
                           "later steps count per partial match already; add conditions "
                           "such as cell == first.cell", step=i, clause="count")
