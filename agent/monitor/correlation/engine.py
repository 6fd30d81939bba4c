"""The correlation engine: events in, matches out (pure, single-threaded).

``Engine.feed(event)`` returns the matches that event completes.  What a match is, is
written down in docs/patterns.md and, executably, in :mod:`.reference`; in short:

* every event that satisfies a pattern's first step begins a partial match (a first
  step that counts begins one when its count is reached);
* a partial match binds, for each later step, the first event after the previous step
  that satisfies it (skip till next match), within the pattern's span of its first
  event; an until event that comes after its first event cancels it;
* an event completes every partial awaiting the last step that it satisfies; of those,
  the one that began last is the match reported (the tightest chain), the others are
  counted as shadowed.

An event touches only the patterns that await its (channel, kind) (and, behind a gate,
its value of an attribute they test: :mod:`.dispatch`), only the partials that await
it, and among those, when the step joins by equality, only the ones bound to its value.
Partial matches are bounded per pattern and per cell (the first event's): the oldest
is evicted, and counted.  Time is the events' monotonic clock (``mono``), which must
not go backwards from one event to the next (the bus stamps ``seq`` and ``mono``
together).

:meth:`Engine.swap` installs another set of patterns; a pattern whose name and digest
are unchanged keeps its partial matches and counters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.monitor.correlation.compiled import compile_pattern, norm
from agent.monitor.correlation.dispatch import Plan, build, merge
from agent.monitor.correlation.event import EventLike
from agent.monitor.correlation.match import Match
from agent.monitor.correlation.model import Pattern
from agent.monitor.correlation.partial import Partial
from agent.monitor.correlation.runner import Limits, Runner

__all__ = ["Engine", "EngineStats", "Limits", "PatternStats", "SwapReport"]


@dataclass(frozen=True)
class PatternStats:
    name: str
    digest: str
    partials: int  # live now
    started: int
    matches: int
    shadowed: int  # completed by the same event as a match that began later
    expired: int
    cancelled: int
    merged: int
    evicted: dict[str | None, int]  # per cell of the evicted partial's first event


@dataclass(frozen=True)
class EngineStats:
    events: int  # fed so far
    partials: int  # live now, all patterns
    matches: int
    patterns: tuple[PatternStats, ...] = field(default=())

    def to_wire(self) -> dict[str, Any]:
        return {"events": self.events, "partials": self.partials, "matches": self.matches,
                "patterns": [{**vars(p), "evicted": {("-" if c is None else c): n
                                                      for c, n in p.evicted.items()}}
                             for p in self.patterns]}


@dataclass(frozen=True)
class SwapReport:
    kept: tuple[str, ...]  # same name and digest: partials and counters kept
    added: tuple[str, ...]
    changed: tuple[str, ...]  # same name, new digest: begins afresh
    removed: tuple[str, ...]
    retired: int  # partial matches dropped with changed and removed patterns


class Engine:
    """See the module doc.  ``limits`` bounds partial matches; ``sweep_every``: seconds
    of event time between two sweeps of expired partials (a partial past its span can
    never complete; the sweep only frees it)."""

    def __init__(self, patterns: Iterable[Pattern] = (), limits: Limits | None = None,
                 *, sweep_every: float = 1.0) -> None:
        self.limits = limits or Limits()
        self.sweep_every = sweep_every
        self.events = 0
        self._runners: list[Runner] = []
        self._plans: dict[str, dict[str, Plan]] = {}
        self._last_sweep = float("-inf")
        self.swap(patterns)

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return tuple(r.cp.pattern for r in self._runners)

    @property
    def live(self) -> int:
        """Partial matches alive now (all patterns)."""
        return sum(r.live for r in self._runners)

    # ------------------------------------------------------------------------ feeding
    def feed(self, e: EventLike) -> list[Match]:
        """The matches ``e`` completes, in the order of the patterns."""
        self.events += 1
        if e.mono - self._last_sweep >= self.sweep_every:
            self.expire(e.mono)
        kinds = self._plans.get(e.channel)
        plan = kinds.get(e.kind) if kinds is not None else None
        if plan is None:
            plan = self._plan(e.channel, e.kind)
        roles, gates = plan
        for get, table in gates:
            hit = table.get(norm(get(e)))
            if hit is not None:
                roles = merge(roles, hit)
        untils, advances, starts = roles
        for r, i in untils:
            if r.live:
                r.until(e, i)
        hits: list[Runner] | None = None
        for _, waiting, r, k in advances:
            if waiting and r.advance(e, k):
                if hits is None:
                    hits = [r]
                elif r not in hits:
                    hits.append(r)
        for r in starts:
            if r.start(e):
                if hits is None:
                    hits = [r]
                elif r not in hits:
                    hits.append(r)
        if hits is None:
            return []
        if len(hits) > 1:
            hits.sort(key=lambda r: r.index)
        return [r.finish() for r in hits]

    def expire(self, now: float) -> int:
        """Free every partial past its span at monotonic time ``now``; how many."""
        self._last_sweep = now
        return sum(r.sweep(now) for r in self._runners)

    def _plan(self, channel: str, kind: str) -> Plan:
        kinds = self._plans.setdefault(channel, {})
        if len(kinds) >= 4096:  # kinds are few; a flood of new ones must not grow this
            kinds.clear()
        kinds[kind] = plan = build(self._runners, channel, kind)
        return plan

    # ------------------------------------------------------------------------ patterns
    def swap(self, patterns: Iterable[Pattern]) -> SwapReport:
        """Install ``patterns`` (unique names) in one step; unchanged ones keep their
        partial matches and counters."""
        new = list(patterns)
        names = [p.name for p in new]
        if len(set(names)) != len(names):
            raise ValueError("pattern names must be unique")
        old = {r.cp.pattern.name: r for r in self._runners}
        runners: list[Runner] = []
        kept: list[str] = []
        added: list[str] = []
        changed: list[str] = []
        for p in new:
            r = old.get(p.name)
            if r is not None and r.cp.digest == p.digest:
                kept.append(p.name)
                runners.append(r)
                continue
            (changed if r is not None else added).append(p.name)
            runners.append(Runner(compile_pattern(p), self.limits))
        keep = set(kept)
        retired = sum(r.retire() for name, r in old.items() if name not in keep)
        removed = tuple(n for n in old if n not in set(names))
        for i, r in enumerate(runners):
            r.index = i
        self._runners = runners
        self._plans = {}
        return SwapReport(tuple(kept), tuple(added), tuple(changed), removed, retired)

    # ------------------------------------------------------------------------ counters
    def stats(self) -> EngineStats:
        per = tuple(PatternStats(
            name=r.cp.pattern.name, digest=r.cp.digest, partials=r.live, started=r.started,
            matches=r.matches, shadowed=r.shadowed, expired=r.expired,
            cancelled=r.cancelled, merged=r.merged, evicted=dict(r.evicted))
            for r in self._runners)
        return EngineStats(self.events, sum(p.partials for p in per),
                           sum(p.matches for p in per), per)

    def partials(self, pattern: str) -> list[Partial]:
        """The live partial matches of ``pattern``, oldest first (for tests and views)."""
        for r in self._runners:
            if r.cp.pattern.name == pattern:
                return sorted((p for d in r.by_cell.values() for p in d.values()),
                              key=lambda p: p.ident)
        raise KeyError(pattern)

