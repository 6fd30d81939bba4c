"""The pattern language: line-based text in, validated :class:`~.model.Pattern`\\ s out.

Written to be read over a serial console (docs/patterns.md has the reference)::

    # A file written by one cell into a shared data directory, then run by another.
    pattern shared-drop-exec
      about a program written by one cell is run or loaded by another
      severity alert
      response isolate
      within 1h
      cells distinct
      step drop: exec/file-written source != null
      step run: exec/exec-denied|exec-unverified same hash
    end

Every error is a :class:`~.model.PatternError` whose message starts with ``FILE:LINE:``
and says what is wrong, with a hint saying how to fix it; the first error stops the
parse.  Pure: the caller reads the files.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.monitor.correlation.model import (
    CELL_RELATIONS,
    RESPONSES,
    SEVERITIES,
    Cond,
    Count,
    Pattern,
    PatternError,
    Selector,
    Step,
    Until,
    check_cond,
)
from agent.monitor.correlation.syntax import Lexer, Tok, open_braces, parse_duration

__all__ = ["CLAUSES", "ONE_STEP_SPAN", "parse", "parse_duration", "parse_sources"]

ONE_STEP_SPAN = 1.0  # the span of a one-step pattern without 'within' (it has no use)
CLAUSES = ("about", "severity", "response", "tag", "within", "cells", "step", "and",
           "count", "until", "end")
_INT = re.compile(r"-?\d+")
_LABEL = re.compile(r"([a-z_][a-z0-9_]*):?")


@dataclass
class _Target:
    """A step or until clause being read, with the line of each of its conditions."""

    line: int
    on: Selector
    conds: list[tuple[Cond, int]] = field(default_factory=list)
    label: str = ""
    count: Count | None = None
    count_line: int = 0


@dataclass
class _Draft:
    name: str
    line: int
    values: dict[str, tuple[object, int]] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    steps: list[_Target] = field(default_factory=list)
    until: list[_Target] = field(default_factory=list)
    last: _Target | None = None


class _Parser(Lexer):
    # -- clauses -----------------------------------------------------------------------------
    def once(self, d: _Draft, key: str, value: object) -> None:
        if key in d.values:
            raise self.err("E_PATTERN_DUPLICATE", f"{key} is given twice in {d.name}",
                           f"keep one (the other is on line {d.values[key][1]})")
        d.values[key] = (value, self.line)

    def word_of(self, toks: list[Tok], key: str, allowed: tuple[str, ...]) -> str:
        if len(toks) != 1 or not toks[0].is_word(*allowed):
            got = " ".join(t.text for t in toks) or "nothing"
            raise self.err("E_PATTERN_VALUE", f"{key} {got}: not one of "
                           f"{', '.join(allowed)}", f"write e.g. {key} {allowed[-1]}")
        return toks[0].text

    def clause(self, d: _Draft, key: str, toks: list[Tok], raw: str) -> None:
        if key == "about":
            text = raw.strip()
            if not text:
                raise self.err("E_PATTERN_SYNTAX", "about needs a text",
                               "write about WHAT THE PATTERN STANDS FOR")
            self.once(d, key, text[1:-1] if len(text) > 1 and text[0] == text[-1] == '"'
                      else text)
        elif key == "severity":
            self.once(d, key, self.word_of(toks, key, SEVERITIES))
        elif key == "response":
            self.once(d, key, self.word_of(toks, key, RESPONSES))
        elif key == "cells":
            self.once(d, key, self.word_of(toks, key, CELL_RELATIONS))
        elif key == "within":
            self.once(d, key, self.duration(toks, "within"))
        elif key == "tag":
            if not toks or any(t.kind != "word" for t in toks):
                raise self.err("E_PATTERN_SYNTAX", "tag needs one or more words",
                               "write e.g. tag master")
            d.tags += [t.text for t in toks]
        elif key == "step":
            self.step(d, toks)
        elif key == "until":
            target = _Target(self.line, self.selector(toks[0] if toks else None))
            target.conds = [(c, self.line) for c in self.conds(toks[1:], None)] \
                if len(toks) > 1 else []
            d.until.append(target)
            d.last = target
        elif key == "and":
            if d.last is None:
                raise self.err("E_PATTERN_SYNTAX", "'and' before any step",
                               "'and' adds conditions to the step or until clause above")
            prev = self.prev_label(d, d.last)
            d.last.conds += [(c, self.line) for c in self.conds(toks, prev)]
        elif key == "count":
            self.count(d, toks)

    def prev_label(self, d: _Draft, t: _Target) -> str | None:
        if t not in d.steps:
            return None
        i = d.steps.index(t)
        return d.steps[i - 1].label if i else None

    def step(self, d: _Draft, toks: list[Tok]) -> None:
        if not toks or toks[0].kind != "word" or not _LABEL.fullmatch(toks[0].text):
            raise self.err("E_PATTERN_SYNTAX", "a step needs a label",
                           "write step LABEL: CHANNEL/KIND [CONDITIONS]")
        label = toks[0].text.rstrip(":")
        rest = toks[1:]
        if not toks[0].text.endswith(":"):
            if not rest or rest[0].text != ":":
                raise self.err("E_PATTERN_SYNTAX", f"step {label}: ':' after the label",
                               f"write step {label}: CHANNEL/KIND")
            rest = rest[1:]
        if rest and rest[0].text.startswith(":"):  # "label :net/flow"
            rest = [Tok("word", rest[0].text[1:]), *rest[1:]]
        for s in d.steps:
            if s.label == label:
                raise self.err("E_PATTERN_DUPLICATE", f"step {label} is defined twice",
                               f"the first is on line {s.line}; give each step its own label")
        target = _Target(self.line, self.selector(rest[0] if rest else None), label=label)
        prev = d.steps[-1].label if d.steps else None
        if len(rest) > 1:
            target.conds = [(c, self.line) for c in self.conds(rest[1:], prev)]
        d.steps.append(target)
        d.last = target

    def count(self, d: _Draft, toks: list[Tok]) -> None:
        """``count N [distinct ATTR] within DURATION [per ATTR[,ATTR]]``"""
        t = d.last
        if t is None or t not in d.steps:
            raise self.err("E_PATTERN_SYNTAX", "'count' must follow a step",
                           "put it on the line after the step it counts")
        if t.count is not None:
            raise self.err("E_PATTERN_DUPLICATE", f"step {t.label} counts twice",
                           f"keep one count (the other is on line {t.count_line})")
        words = [x.text for x in toks]
        usage = "write count N [distinct ATTR] within DURATION [per ATTR,ATTR]"
        if len(words) < 3 or not _INT.fullmatch(words[0]):
            raise self.err("E_PATTERN_SYNTAX", "count needs a number and a window", usage)
        n, rest = int(words[0]), words[1:]
        distinct = None
        if rest[0] == "distinct":
            if len(rest) < 2:
                raise self.err("E_PATTERN_SYNTAX", "distinct needs an attribute", usage)
            distinct, rest = rest[1], rest[2:]
        if len(rest) < 2 or rest[0] != "within":
            raise self.err("E_PATTERN_SYNTAX", "count needs 'within DURATION'", usage)
        within = self.duration([Tok("word", rest[1])], "count ... within")
        rest = rest[2:]
        per: tuple[str, ...] = ()
        if rest:
            if rest[0] != "per" or len(rest) < 2:
                raise self.err("E_PATTERN_SYNTAX", f"unexpected {rest[0]!r} after the "
                               "window", usage)
            per = tuple(a for a in rest[1:] if a != ",")
        t.count = Count(n, within, distinct, per)
        t.count_line = self.line

    # -- patterns ----------------------------------------------------------------------------
    def build(self, d: _Draft) -> Pattern:
        if not d.steps:
            raise self.err("E_PATTERN_MISSING", f"pattern {d.name} has no step",
                           "add e.g. 'step a: net/scan'", d.line)
        if "within" not in d.values:
            if len(d.steps) > 1:
                raise self.err("E_PATTERN_MISSING", f"pattern {d.name} has no span",
                               "add e.g. 'within 60s': the longest time from its first "
                               "event to its last", d.line)
            cnt = d.steps[0].count  # one step: the span is its count's window, if any
            d.values["within"] = (cnt.within if cnt is not None else ONE_STEP_SPAN, d.line)
        labels = tuple(s.label for s in d.steps)
        for i, t in enumerate([*d.steps, *d.until]):
            for c, line in t.conds:
                try:
                    check_cond(c, labels, i if i < len(d.steps) else None)
                except PatternError as exc:
                    raise self.err(exc.code, exc.message, exc.hint or "", line) from None
        v = {k: val for k, (val, _) in d.values.items()}
        try:
            return Pattern(
                name=d.name, within=float(v["within"]),  # type: ignore[arg-type]
                steps=tuple(Step(s.label, s.on, tuple(c for c, _ in s.conds), s.count)
                            for s in d.steps),
                until=tuple(Until(u.on, tuple(c for c, _ in u.conds)) for u in d.until),
                cells=str(v.get("cells", "any")), severity=str(v.get("severity", "alert")),
                response=str(v.get("response", "record")), tags=tuple(d.tags),
                about=str(v.get("about", "")))
        except PatternError as exc:
            if exc.clause == "until" and exc.step is not None:
                line = d.until[exc.step].line
            elif exc.clause == "count" and exc.step is not None:
                line = d.steps[exc.step].count_line
            elif exc.step is not None:
                line = d.steps[exc.step].line
            elif exc.clause in d.values:
                line = d.values[exc.clause][1]
            else:
                line = d.line
            raise self.err(exc.code, f"{d.name}: {exc.message}", exc.hint or "", line) \
                from None

    def parse(self, text: str) -> list[Pattern]:
        out: list[Pattern] = []
        draft: _Draft | None = None
        lines = text.splitlines()
        i = 0
        while i < len(lines):
            raw = lines[i]
            i += 1
            self.line = i
            about = raw.split(None, 1)
            if draft is not None and about and about[0] == "about":
                self.clause(draft, "about", [], about[1] if len(about) > 1 else "")
                continue  # the rest of the line, as it is
            toks = self.tokens(raw)
            first = i
            while open_braces(toks) and i < len(lines):  # a set goes on to the next line
                self.line = i + 1
                toks += self.tokens(lines[i])
                i += 1
            self.line = first  # errors name the line the clause begins on
            if not toks:
                continue
            head = toks[0].text if toks[0].kind == "word" else ""
            if head == "pattern":
                if draft is not None:
                    raise self.err("E_PATTERN_SYNTAX", f"pattern {draft.name} (line "
                                   f"{draft.line}) has no 'end'", "end it before the next")
                if len(toks) != 2 or toks[1].kind != "word":
                    raise self.err("E_PATTERN_SYNTAX", "pattern needs one name",
                                   "write pattern NAME (lower-case, digits and -)")
                draft = _Draft(toks[1].text, self.line)
                continue
            if draft is None:
                raise self.err("E_PATTERN_SYNTAX", f"{head or toks[0].text!r} outside a "
                               "pattern", "start a pattern with 'pattern NAME'")
            if head == "end":
                if len(toks) != 1:
                    raise self.err("E_PATTERN_SYNTAX", "'end' stands alone", "write end")
                out.append(self.build(draft))
                draft = None
                continue
            if head not in CLAUSES:
                close = difflib.get_close_matches(head, CLAUSES, 1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.err("E_PATTERN_SYNTAX", f"unknown clause {head or toks[0].text!r}",
                               hint + "clauses: " + ", ".join(CLAUSES))
            self.clause(draft, head, toks[1:], "")
        if draft is not None:
            raise self.err("E_PATTERN_SYNTAX", f"pattern {draft.name} has no 'end'",
                           "add a line 'end' after its last clause", draft.line)
        return out


def parse(text: str, file: str = "<text>") -> tuple[Pattern, ...]:
    """The patterns of one text; raises :class:`PatternError` naming ``file:line``."""
    return parse_sources([(file, text)])


def parse_sources(sources: Iterable[tuple[str, str]]) -> tuple[Pattern, ...]:
    """The patterns of several ``(file, text)``; a name may be used once in all of them."""
    out: list[Pattern] = []
    where: dict[str, str] = {}
    for file, text in sources:
        p = _Parser(file)
        lines: dict[str, int] = {}
        for i, raw in enumerate(text.splitlines(), 1):
            parts = raw.split()
            if len(parts) == 2 and parts[0] == "pattern":
                lines.setdefault(parts[1], i)
        for pat in p.parse(text):
            here = f"{file}:{lines.get(pat.name, 0)}"
            if pat.name in where:
                raise PatternError("E_PATTERN_DUPLICATE", f"{here}: pattern {pat.name} is "
                                   "defined twice", f"the first is at {where[pat.name]}; "
                                   "rename one")
            where[pat.name] = here
            out.append(pat)
    return tuple(out)
