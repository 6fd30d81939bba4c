"""The pattern language: what it reads, and errors that name the line and the fix."""

from __future__ import annotations

import pytest

from agent.monitor.correlation.language import ONE_STEP_SPAN, parse, parse_sources
from agent.monitor.correlation.model import Cond, Count, PatternError, Ref, Selector
from agent.monitor.correlation.wire import pattern_from_wire

FULL = '''\
# a comment
pattern full-one   # a comment after a clause
  about "quoted": and = odd # characters, verbatim
  severity notice
  response freeze
  tag master net
  tag extra
  within 2m
  cells distinct
  step a: net/scan ports >= 20 and window_s < 10.5 and addrs != 0
  step b: net/listen|flow-denied port in {22, 23, "x y", true, null}
    and proto not in {udp}
    and src ~ "10.1.*" and dst !~ 10.2.*
  step c: exec/* same port and hash == b.hash and uid < a.uid
  count 4 distinct path within 30s
  until lifecycle/destroyed cell == b.cell
  until agent/signal
end
'''


def test_a_full_pattern() -> None:
    (p,) = parse(FULL, "f.pat")
    assert p.name == "full-one" and p.severity == "notice" and p.response == "freeze"
    assert p.about == '"quoted": and = odd # characters, verbatim'
    assert p.tags == ("master", "net", "extra") and p.within == 120.0 and p.cells == "distinct"
    a, b, c = p.steps
    assert a.on == Selector("net", ("scan",)) and a.where == (
        Cond("ports", ">=", 20), Cond("window_s", "<", 10.5), Cond("addrs", "!=", 0))
    assert b.on == Selector("net", ("listen", "flow-denied"))
    assert b.where == (Cond("port", "in", (22, 23, "x y", True, None)),
                       Cond("proto", "not in", ("udp",)), Cond("src", "~", "10.1.*"),
                       Cond("dst", "!~", "10.2.*"))
    assert c.on == Selector("exec", ("*",))
    assert c.where == (Cond("port", "==", Ref("b", "port")), Cond("hash", "==", Ref("b", "hash")),
                       Cond("uid", "<", Ref("a", "uid")))
    assert c.count == Count(4, 30.0, "path") and a.count is None
    assert [u.on for u in p.until] == [Selector("lifecycle", ("destroyed",)),
                                       Selector("agent", ("signal",))]
    assert p.until[0].where == (Cond("cell", "==", Ref("b", "cell")),)
    assert pattern_from_wire(p.to_wire()) == p


def test_sets_over_several_lines_counts_and_defaults() -> None:
    (p, q, r) = parse('''
pattern one
  step x: syscall/denied syscall in {mount,
      umount2,
                                 ptrace}
  count 3 distinct cell within 5m per syscall, arch
end
pattern two
  step x: agent/integrity
end
pattern three
  within 10s
  step x: a/b
  step y: a/c
  count 2 within 5s
end
''')
    assert p.steps[0].where == (Cond("syscall", "in", ("mount", "umount2", "ptrace")),)
    assert p.steps[0].count == Count(3, 300.0, "cell", ("syscall", "arch"))
    assert p.within == 300.0  # one step: the count's window
    assert q.within == ONE_STEP_SPAN and q.severity == "alert" and q.response == "record"
    assert q.cells == "any" and q.tags == () and q.about == ""
    assert r.steps[1].count == Count(2, 5.0)


def test_values() -> None:
    (p,) = parse('pattern v\n  step x: a/b i == -3 and f == 2.5 and t == true and '
                 'n == null and w == 10.0.0.1 and q == "a\\"b\\\\c" and d == "s.x"\nend\n')
    assert [c.value for c in p.steps[0].where] == [-3, 2.5, True, None, "10.0.0.1", 'a"b\\c',
                                                   "s.x"]


def test_digest_is_the_content() -> None:
    a, = parse("pattern p\n  step x: a/b k == 1\nend\n")
    b, = parse("pattern p\n  # the same, written otherwise\n  step   x:  a/b   k==1\nend\n")
    c, = parse("pattern p\n  step x: a/b k == 2\nend\n")
    assert a.digest == b.digest != c.digest


def _err(text: str, file: str = "lib.pat") -> PatternError:
    with pytest.raises(PatternError) as exc:
        parse(text, file)
    return exc.value


# (text, line, code, in the message, in the hint)
BAD = [
    ("pattern p\n  severty alert\n  step a: x/y\nend\n", 2, "E_PATTERN_SYNTAX",
     "unknown clause 'severty'", "did you mean 'severity'"),
    ("pattern p\n  severity high\n  step a: x/y\nend\n", 2, "E_PATTERN_VALUE",
     "severity high", "severity alert"),
    ("pattern p\n  response kil\n  step a: x/y\nend\n", 2, "E_PATTERN_VALUE",
     "not one of record, kill", "response stop"),
    ("pattern p\n  cells some\n  step a: x/y\nend\n", 2, "E_PATTERN_VALUE", "cells some",
     "cells distinct"),
    ("\npattern p\n  step a: x/y\n  step b: x/z\nend\n", 2, "E_PATTERN_MISSING",
     "has no span", "within 60s"),
    ("pattern p\n  within 1m\nend\n", 1, "E_PATTERN_MISSING", "has no step", "step a:"),
    ("pattern p\n  step a: x/y\n", 1, "E_PATTERN_SYNTAX", "has no 'end'", "add a line 'end'"),
    ("pattern p\n  step a: x/y\npattern q\n", 3, "E_PATTERN_SYNTAX", "(line 1) has no 'end'",
     "end it"),
    ("  step a: x/y\n", 1, "E_PATTERN_SYNTAX", "outside a pattern", "pattern NAME"),
    ("pattern p\n  within 1m\n  step a: x/y\n  step b: x/y k == c.k\nend\n", 4,
     "E_PATTERN_REF", "there is no step 'c'", 'quote it ("c.k")'),
    ("pattern p\n  within 1m\n  step a: x/y k == b.k\n  step b: x/y\nend\n", 3,
     "E_PATTERN_REF", "step b is not before this step", "earlier steps"),
    ("pattern p\n  step a: x/y same k\nend\n", 2, "E_PATTERN_REF", "no step before",
     "ATTR == STEP.ATTR"),
    ("pattern p\n  within 1m\n  step a: x/y\n  until x/z same k\nend\n", 4, "E_PATTERN_REF",
     "no step before", "until clause"),
    ("pattern p\n  step a: x/y k = 1\nend\n", 2, "E_PATTERN_SYNTAX", "unexpected '='",
     "write =="),
    ('pattern p\n  step a: x/y k == "open\nend\n', 2, "E_PATTERN_SYNTAX", "not closed",
     'end it with "'),
    ("pattern p\n  within 1m\n  step a: x/y\n  step a: x/z\nend\n", 4, "E_PATTERN_DUPLICATE",
     "step a is defined twice", "line 3"),
    ("pattern p\n  within 10s\n  step a: x/y\n  count 2 within 1m\nend\n", 4, "E_PATTERN_VALUE",
     "longer than the pattern's span", "lengthen 'within'"),
    ("pattern p\n  step a: x/y\n  count 1 within 1m\nend\n", 3, "E_PATTERN_VALUE",
     "count 1", "drop 'count'"),
    ("pattern p\n  within 1m\n  step a: x/y\n  step b: x/y\n  count 2 within 1s per k\nend\n",
     5, "E_PATTERN_VALUE", "'per' is only for a count at the first step", "cell == first"),
    ("pattern p\n  within 10\n  step a: x/y\nend\n", 2, "E_PATTERN_VALUE",
     "'10' is not a duration", "500ms, 30s, 5m, 1h"),
    ("pattern p\n  step a: x/y k < abc\nend\n", 2, "E_PATTERN_VALUE", "a number is needed",
     "uid < 1000"),
    ("pattern p\n  step a: x/y k ~ 5\nend\n", 2, "E_PATTERN_VALUE", "a glob needs a text",
     "/data/shared/*"),
    ("pattern p\n  and k == 1\n  step a: x/y\nend\n", 2, "E_PATTERN_SYNTAX",
     "'and' before any step", "adds conditions"),
    ("pattern p\n  count 2 within 1s\n  step a: x/y\nend\n", 2, "E_PATTERN_SYNTAX",
     "'count' must follow a step", "on the line after the step"),
    ("pattern p\n  step a: x/y k in {1 2}\nend\n", 2, "E_PATTERN_SYNTAX", "expected ','",
     "commas"),
    ("pattern p\n  step a: x/y k in 1, 2\nend\n", 2, "E_PATTERN_SYNTAX", "set in braces",
     "{mount, umount2}"),
    ("pattern p\n  step a: x/y k in {1, 1}\nend\n", 2, "E_PATTERN_VALUE", "repeated",
     "each value once"),
    ("pattern p\n  step a: net.flow\nend\n", 2, "E_PATTERN_SYNTAX", "expected CHANNEL/KIND",
     "net/flow"),
    ("pattern p\n  step a: Net/flow\nend\n", 2, "E_PATTERN_VALUE", "not a channel name",
     "CHANNEL/KIND"),
    ("pattern p\n  severity alert\n  severity info\n  step a: x/y\nend\n", 3,
     "E_PATTERN_DUPLICATE", "severity is given twice", "line 2"),
    ("pattern Bad_Name\n  step a: x/y\nend\n", 1, "E_PATTERN_VALUE", "not a pattern name",
     "lower-case"),
    ("pattern p\n  step a: x/y k == \nend\n", 2, "E_PATTERN_SYNTAX",
     "cannot read the condition", "ATTR OP VALUE"),
    ("pattern p\n  step a: x/y k == 1 and\nend\n", 2, "E_PATTERN_SYNTAX", "empty condition",
     "between the 'and's"),
    ("pattern p\n  step a x/y\nend\n", 2, "E_PATTERN_SYNTAX", "':' after the label",
     "step a: CHANNEL/KIND"),
    ("pattern p\n  step a: x/y\n  count 2 within 1s\n  count 3 within 1s\nend\n", 4,
     "E_PATTERN_DUPLICATE", "counts twice", "line 3"),
    ("pattern p\n  step a: x/y\n  count 2 distinct within 1s\nend\n", 3, "E_PATTERN_SYNTAX",
     "count needs 'within DURATION'", "count N [distinct ATTR]"),
    ("pattern p\n  about\n  step a: x/y\nend\n", 2, "E_PATTERN_SYNTAX", "about needs a text",
     "about WHAT"),
    ("pattern p\n  step cell: x/y\nend\n", 2, "E_PATTERN_VALUE", "not a step label",
     "not cell, channel"),
    ("pattern p\n  within 25h\n  step a: x/y\nend\n", 2, "E_PATTERN_VALUE",
     "at most 24h", "30s, 5m"),
    ("pattern p\n  step a: x/y k in {b.k}\nend\n", 2, "E_PATTERN_VALUE",
     "a set holds values", "== STEP.ATTR"),
    ("pattern p\n  step a: x/y k ~ a.k\nend\n", 2, "E_PATTERN_VALUE",
     "cannot take a step's attribute", "== != <"),
    ("pattern p\n  end extra\n", 2, "E_PATTERN_SYNTAX", "'end' stands alone", "write end"),
]


@pytest.mark.parametrize(("text", "line", "code", "what", "fix"), BAD,
                         ids=[b[3][:30] for b in BAD])
def test_errors_name_the_line_and_the_fix(text: str, line: int, code: str, what: str,
                                          fix: str) -> None:
    err = _err(text)
    assert err.code == code, str(err)
    assert err.message.startswith(f"lib.pat:{line}: "), str(err)
    assert what in err.message, str(err)
    assert err.hint and fix in err.hint, str(err)
    assert str(err).startswith(f"error[{code}]: lib.pat:{line}: ")


def test_a_name_is_defined_once_across_files() -> None:
    with pytest.raises(PatternError) as exc:
        parse_sources([("a.pat", "pattern p\n  step a: x/y\nend\n"),
                       ("b.pat", "\n\npattern p\n  step a: x/z\nend\n")])
    assert exc.value.code == "E_PATTERN_DUPLICATE"
    assert exc.value.message.startswith("b.pat:3: pattern p is defined twice")
    assert exc.value.hint and "a.pat:1" in exc.value.hint
