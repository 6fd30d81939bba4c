"""The engine against the brute-force reference matcher, on random patterns and streams.

Both must return the same matches (pattern, chain of (step, event), count summaries,
keys) for every stream; the engine runs with bounds larger than the stream, since
eviction is the one place where it is allowed to lose matches (and counts them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from agent.monitor.correlation.engine import Engine, Limits
from agent.monitor.correlation.event import Record
from agent.monitor.correlation.language import parse
from agent.monitor.correlation.match import Match
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
from agent.monitor.correlation.reference import reference_matches

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "rootfs-overlay/etc/agent/patterns/default.pat"
BIG = Limits(per_cell=100_000, per_pattern=100_000)

KINDS = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "z")]
CELLS = ["c1", "c2", "c3", None]
# mostly a few values (so that joins and conditions hold often), and the odd ones
K_VALUES: list[Any] = [0, 1, "p"] * 4 + [1.0, 2, True, False, None, [1], float("nan")]
S_VALUES = ["/d/a", "/d/b", "/e/a", "x"]


def summary(ms: list[Match]) -> list[tuple[Any, ...]]:
    return [(m.pattern, m.digest, [(lk.step, lk.seq, lk.count, lk.first_mono,
                                    tuple(map(repr, lk.values)), repr(sorted(lk.keys)))
                                   for lk in m.chain]) for m in ms]


def run_engine(patterns: list[Pattern], events: list[Record], **kw: Any) -> list[Match]:
    eng = Engine(patterns, BIG, **kw)
    return [m for e in events for m in eng.feed(e)]


# -- strategies -------------------------------------------------------------------------------

@st.composite
def events(draw: st.DrawFn, max_size: int = 50) -> list[Record]:
    n = draw(st.integers(0, max_size))
    cells = CELLS if draw(st.booleans()) else CELLS[:2]
    out, t = [], 0.0
    for i in range(n):
        t += draw(st.sampled_from([0.0, 0.0, 0.5, 0.5, 1.0, 3.0, 10.0]))
        ch, kind = draw(st.sampled_from(KINDS))
        attrs: dict[str, Any] = {}
        if draw(st.integers(0, 7)):
            attrs["k"] = draw(st.sampled_from(K_VALUES))
        if draw(st.booleans()):
            attrs["v"] = draw(st.sampled_from([0, 1, 2, 2.5, -1]))
        if draw(st.booleans()):
            attrs["s"] = draw(st.sampled_from(S_VALUES))
        out.append(Record(i + 1, t, 1e9 + t, draw(st.sampled_from(cells)), ch, kind, attrs))
    return out


@st.composite
def selector(draw: st.DrawFn) -> Selector:
    ch = draw(st.sampled_from(["a", "b"]))
    if draw(st.integers(0, 5)) == 0:
        return Selector(ch, ("*",))
    kinds = draw(st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2, unique=True))
    return Selector(ch, tuple(kinds))


@st.composite
def cond(draw: st.DrawFn, earlier: list[str]) -> Cond:
    attr = draw(st.sampled_from(["k", "k", "v", "s", "cell"]))
    if earlier and draw(st.booleans()):
        op = draw(st.sampled_from(["==", "==", "==", "!=", "<", ">="]))
        rattr = attr if draw(st.booleans()) else draw(st.sampled_from(["k", "v", "cell"]))
        return Cond(attr, op, Ref(draw(st.sampled_from(earlier)), rattr))
    op = draw(st.sampled_from(["==", "!=", "in", "not in", "<", ">=", "~", "!~"]))
    if op in ("in", "not in"):
        return Cond(attr, op, tuple(draw(st.lists(st.sampled_from([0, 1, "p", True, None]),
                                                  min_size=1, max_size=3, unique=True))))
    if op in ("~", "!~"):
        return Cond("s", op, draw(st.sampled_from(["/d/*", "*a", "x", "/[de]/?"])))
    if op in ("<", ">="):
        return Cond(attr, op, draw(st.sampled_from([0, 1, 2.5])))
    return Cond(attr, op, draw(st.sampled_from([0, 1, "p", "c1", True, None, 1.0])))


@st.composite
def gate_cond(draw: st.DrawFn) -> Cond:
    """A condition the engine can index by value (== or in on k)."""
    if draw(st.booleans()):
        return Cond("k", "==", draw(st.sampled_from([0, 1, "p", True])))
    return Cond("k", "in", tuple(draw(st.lists(st.sampled_from([0, 1, "p", None]),
                                               min_size=1, max_size=2, unique=True))))


@st.composite
def patterns(draw: st.DrawFn, name: str = "p", gated: bool = False) -> Pattern:
    within = draw(st.sampled_from([2.0, 5.0, 20.0, 60.0, 60.0]))
    n = draw(st.sampled_from([1, 2, 2, 3, 3]))
    steps: list[Step] = []
    for i in range(n):
        label = f"s{i}"
        earlier = [s.label for s in steps]
        conds = tuple(draw(st.lists(cond(earlier), max_size=2 if earlier else 1))
                      if draw(st.booleans()) else ())
        if gated and draw(st.integers(0, 3)):
            conds = (draw(gate_cond()), *conds)
        count = None
        if draw(st.integers(0, 2)) == 0:
            count = Count(draw(st.sampled_from([2, 2, 3])), min(within, draw(st.sampled_from(
                [0.5, 1.0, 3.0, 10.0]))), draw(st.sampled_from([None, "k", "cell"])),
                tuple(draw(st.lists(st.sampled_from(["k", "v"]), max_size=1)))
                if i == 0 else ())
        steps.append(Step(label, draw(selector()), conds, count))
    labels = [s.label for s in steps]
    until = tuple(Until(draw(selector()), tuple(draw(st.lists(cond(labels), max_size=1)))
                        + ((draw(gate_cond()),) if gated and draw(st.booleans()) else ()))
                  for _ in range(draw(st.integers(0, 1))))
    try:
        return Pattern(name, within, tuple(steps), until,
                       cells=draw(st.sampled_from(["any", "any", "same", "distinct"])))
    except PatternError as exc:  # a combination the model refuses: not a test case
        raise AssertionError(f"strategy built an invalid pattern: {exc}") from None


@st.composite
def libraries(draw: st.DrawFn, most: int = 3, gated: bool = False) -> list[Pattern]:
    return [draw(patterns(f"p{i}", gated)) for i in range(draw(st.integers(1, most)))]


# -- the properties ---------------------------------------------------------------------------

@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(libraries(), events())
def test_engine_equals_reference(lib: list[Pattern], stream: list[Record]) -> None:
    want = reference_matches(lib, stream)
    # steer the search towards long chains, counts and cancellations
    target(float(sum(len(m.chain) - 1 for m in want)), label="chain links")
    target(float(sum(1 for m in want for lk in m.chain if lk.count)), label="counts")
    assert summary(run_engine(lib, stream)) == summary(want)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(libraries(most=10, gated=True), events())
def test_many_patterns_behind_gates(lib: list[Pattern], stream: list[Record]) -> None:
    """Enough patterns testing the same attributes for the engine to index them by
    value (dispatch gates): still the reference's matches."""
    assert summary(run_engine(lib, stream)) == summary(reference_matches(lib, stream))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(libraries(), events(max_size=60), st.sampled_from([0.0, 0.5, 5.0, 1e9]))
def test_sweeping_changes_no_match(lib: list[Pattern], stream: list[Record],
                                   every: float) -> None:
    """Freeing expired partials early or late (or never) changes nothing matched."""
    assert summary(run_engine(lib, stream, sweep_every=every)) == \
        summary(reference_matches(lib, stream))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(libraries(), events(), st.integers(0, 40))
def test_swap_to_the_same_patterns_changes_no_match(lib: list[Pattern],
                                                    stream: list[Record], cut: int) -> None:
    """A swap that keeps every pattern (same names and digests) keeps every partial."""
    eng = Engine(lib, BIG)
    got = [m for e in stream[:cut] for m in eng.feed(e)]
    report = eng.swap(list(lib))
    assert report.kept == tuple(p.name for p in lib) and report.retired == 0
    got += [m for e in stream[cut:] for m in eng.feed(e)]
    assert summary(got) == summary(reference_matches(lib, stream))


# -- the default library on streams of the event vocabulary (docs/events.md) ------------------

VOCAB: list[tuple[str, str, dict[str, list[Any]]]] = [
    ("exec", "file-written", {"path": ["/data/a.sh", "/data/lib.so", "/tmp/x"],
                              "hash": ["h1", "h2"], "source": ["shared", None]}),
    ("exec", "exec-denied", {"path": ["/data/a.sh"], "hash": ["h1", "h2"],
                             "reason": ["unsealed", "changed", "memfd"]}),
    ("exec", "exec-unverified", {"path": ["/data/lib.so"], "hash": ["h1", "h2"],
                                 "reason": ["unsealed", "memfd"]}),
    ("net", "scan", {"ports": [20, 3], "addrs": [1, 4], "window_s": [10]}),
    ("net", "listen", {"proto": ["tcp", "udp"], "port": [4444, 8080]}),
    ("net", "flow", {"proto": ["tcp"], "dport": [4444, 80, 8080],
                     "peer_cell": ["tv", "web", "app", None]}),
    ("net", "flow-denied", {"proto": ["tcp"], "dport": [22, 23, 4444],
                            "peer_cell": ["tv", "web"]}),
    ("syscall", "trap", {"syscall": ["mount", "init_module", "sethostname"],
                         "verdict": ["allowed", "denied"], "op": ["sysctl_net", "none"]}),
    ("syscall", "denied", {"syscall": ["ptrace", "mount", "read"], "verdict": ["denied"]}),
    ("syscall", "killed", {"syscall": ["kexec_load"], "verdict": ["killed"]}),
    ("tuner", "pressure", {"resource": ["memory", "cpu", "io"]}),
    ("agent", "control-denied", {"uid": [0, 1000], "op": ["run", "stop"]}),
    ("agent", "integrity", {"path": ["/usr/lib/python3/dist-packages/agent/x.py"]}),
    ("agent", "signal", {"sig": [9, 19], "sender_pid": [1, 77]}),
    ("host", "sysctl", {"name": ["net.ipv4.ip_forward"], "by": ["tv", "web", None]}),
    ("host", "clock-set", {"delta_s": [3600], "by": ["tv", None]}),
    ("lifecycle", "destroyed", {}),
    ("proc", "exec", {"exe": ["/bin/sh"], "comm": ["sh"]}),
]


@st.composite
def vocab_events(draw: st.DrawFn) -> list[Record]:
    out, t = [], 0.0
    for i in range(draw(st.integers(0, 80))):
        t += draw(st.sampled_from([0.0, 0.1, 1.0, 5.0, 60.0]))
        ch, kind, attrs = draw(st.sampled_from(VOCAB))
        cell = draw(st.sampled_from(["tv", "web", "app", None] if ch == "agent" else [None]
                                    if ch == "host" else ["tv", "web", "app"]))
        a = {k: draw(st.sampled_from(vs)) for k, vs in attrs.items()}
        out.append(Record(i + 1, t, 1e9 + t, cell, ch, kind, a))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vocab_events())
def test_default_library_engine_equals_reference(stream: list[Record]) -> None:
    lib = list(parse(DEFAULT.read_text(), str(DEFAULT)))
    want = reference_matches(lib, stream)
    target(float(len({m.pattern for m in want})), label="patterns matched")
    assert summary(run_engine(lib, stream)) == summary(want)
