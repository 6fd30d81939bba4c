"""The words of the pattern language: tokens, values, durations, selectors, conditions.

:class:`Lexer` reads one file's lines into pattern pieces; :mod:`.language` puts the
pieces together into patterns.  Errors name ``FILE:LINE`` and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.monitor.correlation.model import Cond, PatternError, Ref, Scalar, Selector

__all__ = ["Lexer", "Tok", "open_braces", "parse_duration"]

_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\["\\])*")
  | (?P<op>==|!=|<=|>=|!~|<|>|~)
  | (?P<punct>[{},])
  | (?P<word>[^\s{}",=!<>~]+)
""", re.X)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_INT = re.compile(r"-?\d+")
_FLOAT = re.compile(r"-?\d+\.\d+")
_REF = re.compile(r"([a-z_][a-z0-9_]*)\.([a-z_][a-z0-9_]*)")


@dataclass(frozen=True)
class Tok:
    kind: str  # str, op, punct, word
    text: str

    def is_word(self, *words: str) -> bool:
        return self.kind == "word" and self.text in words


class Lexer:
    """Tokens, values, durations, selectors and conditions of one file."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.line = 0

    def err(self, code: str, message: str, hint: str, line: int | None = None
            ) -> PatternError:
        return PatternError(code, f"{self.file}:{line or self.line}: {message}", hint)

    # -- tokens ------------------------------------------------------------------------------
    def tokens(self, text: str) -> list[Tok]:
        out: list[Tok] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                ch = text[pos]
                if ch == '"':
                    raise self.err("E_PATTERN_SYNTAX", "a text is not closed",
                                   'end it with " (write \\" for a quote inside)')
                hint = "write == to compare" if ch == "=" else "write != or !~"
                raise self.err("E_PATTERN_SYNTAX", f"unexpected {ch!r}", hint)
            pos = m.end()
            kind = m.lastgroup or "ws"
            if kind == "ws":
                continue
            if kind == "word" and m.group().startswith("#"):
                break  # a comment to the end of the line
            val = m.group()
            if kind == "str":
                val = re.sub(r"\\([\"\\])", r"\1", val[1:-1])
            out.append(Tok(kind, val))
        return out

    # -- values ------------------------------------------------------------------------------
    def value(self, tok: Tok) -> Scalar | Ref:
        if tok.kind == "str":
            return tok.text
        if tok.kind != "word":
            raise self.err("E_PATTERN_SYNTAX", f"expected a value, found {tok.text!r}",
                           'a value is a number, a word, a "text" or STEP.ATTR')
        t = tok.text
        if t in ("true", "false"):
            return t == "true"
        if t == "null":
            return None
        if _INT.fullmatch(t):
            return int(t)
        if _FLOAT.fullmatch(t):
            return float(t)
        m = _REF.fullmatch(t)
        if m:
            return Ref(m.group(1), m.group(2))
        return t

    def duration(self, toks: list[Tok], what: str) -> float:
        if len(toks) != 1 or toks[0].kind != "word":
            raise self.err("E_PATTERN_SYNTAX", f"{what} needs one duration",
                           "write e.g. 30s, 5m, 1h or 500ms")
        d = parse_duration(toks[0].text)
        if d is None:
            raise self.err("E_PATTERN_VALUE", f"{toks[0].text!r} is not a duration",
                           "a number and a unit: 500ms, 30s, 5m, 1h")
        return d

    def selector(self, tok: Tok | None) -> Selector:
        if tok is None or tok.kind != "word" or tok.text.count("/") != 1:
            raise self.err("E_PATTERN_SYNTAX", "expected CHANNEL/KIND",
                           "write e.g. net/flow or exec/exec-denied|exec-unverified "
                           "(docs/events.md lists them)")
        channel, kinds = tok.text.split("/")
        return Selector(channel, tuple(kinds.split("|")))

    def conds(self, toks: list[Tok], prev: str | None) -> list[Cond]:
        """``COND [and COND]...``; ``same ATTR`` means ATTR == PREV.ATTR."""
        out: list[Cond] = []
        groups: list[list[Tok]] = [[]]
        for t in toks:
            if t.is_word("and"):
                groups.append([])
            else:
                groups[-1].append(t)
        for g in groups:
            if not g:
                raise self.err("E_PATTERN_SYNTAX", "an empty condition",
                               "write ATTR OP VALUE between the 'and's")
            out.append(self.cond(g, prev))
        return out

    def cond(self, g: list[Tok], prev: str | None) -> Cond:
        if g[0].is_word("same"):
            if len(g) != 2 or g[1].kind != "word":
                raise self.err("E_PATTERN_SYNTAX", "'same' takes one attribute",
                               "write e.g. same hash")
            if prev is None:
                raise self.err("E_PATTERN_REF", f"same {g[1].text}: there is no step before",
                               "'same' compares with the previous step; in the first step "
                               "or an until clause write ATTR == STEP.ATTR")
            return Cond(g[1].text, "==", Ref(prev, g[1].text))
        attr = g[0].text if g[0].kind == "word" else ""
        if len(g) >= 3 and g[1].is_word("not") and g[2].is_word("in"):
            return Cond(attr, "not in", self.set_(g[3:], attr))
        if len(g) >= 2 and g[1].is_word("in"):
            return Cond(attr, "in", self.set_(g[2:], attr))
        if len(g) != 3 or g[1].kind != "op":
            shown = " ".join(t.text for t in g)
            raise self.err("E_PATTERN_SYNTAX", f"cannot read the condition {shown!r}",
                           "write ATTR OP VALUE (OP: == != < <= > >= ~ !~), "
                           "ATTR in {A, B}, or same ATTR; join conditions with 'and'")
        return Cond(attr, g[1].text, self.value(g[2]))

    def set_(self, toks: list[Tok], attr: str) -> tuple[Scalar, ...]:
        if len(toks) < 3 or toks[0].text != "{" or toks[-1].text != "}":
            raise self.err("E_PATTERN_SYNTAX", f"{attr} in: expected a set in braces",
                           "write e.g. syscall in {mount, umount2}")
        vals: list[Scalar] = []
        inner = toks[1:-1]
        for i, t in enumerate(inner):
            if i % 2:
                if t.text != ",":
                    raise self.err("E_PATTERN_SYNTAX", f"{attr} in: expected ',' before "
                                   f"{t.text!r}", "separate the values with commas")
                continue
            v = self.value(t)
            if isinstance(v, Ref):
                raise self.err("E_PATTERN_VALUE", f"{attr} in: a set holds values, not "
                               "steps' attributes", "compare with == STEP.ATTR instead")
            vals.append(v)
        if len(inner) % 2 == 0:
            raise self.err("E_PATTERN_SYNTAX", f"{attr} in: a value is missing",
                           "write e.g. {a, b}")
        return tuple(vals)


def open_braces(toks: list[Tok]) -> bool:
    depth = 0
    for t in toks:
        if t.kind == "punct":
            depth += {"{": 1, "}": -1}.get(t.text, 0)
    return depth > 0


def parse_duration(text: str) -> float | None:
    """``500ms``, ``30s``, ``5m``, ``1h`` in seconds; None if it is not a duration."""
    m = _DURATION.fullmatch(text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None
