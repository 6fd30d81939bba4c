"""The partial matches of one pattern and what one event does to them (engine's inner loop).

A :class:`Runner` holds, for its pattern, the live :class:`~.partial.Partial`\\ s three
ways: by the step they await and their probe value (``buckets``: what an event looks
up), by step and signature (``sigs``: the duplicates a newer partial makes useless), and
by the cell of their first event in creation order (``by_cell``: the bounds, oldest
first).  Every phase change goes through the partial's transition table.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from agent.monitor.correlation.compiled import NA, CompiledPattern, CStep, join_holds, norm
from agent.monitor.correlation.event import EventLike
from agent.monitor.correlation.match import Link, Match
from agent.monitor.correlation.partial import Input, Partial

__all__ = ["Limits", "Runner"]


@dataclass(frozen=True)
class Limits:
    """Bounds on live partial matches (a first step's count window is one too)."""

    per_cell: int = 32  # per pattern and cell of the first event
    per_pattern: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.per_cell <= self.per_pattern:
            raise ValueError("need 1 <= per_cell <= per_pattern")


_Bucket = dict[int, Partial]


class Runner:
    def __init__(self, cp: CompiledPattern, limits: Limits) -> None:
        self.cp = cp
        self.name = cp.pattern.name
        self.span = cp.pattern.within
        self.limits = limits
        n = len(cp.steps)
        self.n = n
        self.buckets: list[dict[Any, _Bucket]] = [{} for _ in range(n)]
        self.sigs: list[dict[tuple[Any, ...], Partial]] = [{} for _ in range(n)]
        self.by_cell: dict[str | None, OrderedDict[int, Partial]] = {}
        self.live = 0
        self.next_ident = 0
        self.started = self.matches = self.shadowed = 0
        self.expired = self.cancelled = self.merged = 0
        self.evicted: Counter[str | None] = Counter()
        self.done: list[Partial] = []  # completed by the current event
        self.index = 0  # its place in the engine's library (the order of matches)

    # ------------------------------------------------------------------ placing
    def _birth(self, e: EventLike) -> Partial:
        """A new partial for first event ``e``, within the bounds (oldest evicted)."""
        lim = self.limits
        cell = e.cell
        mine = self.by_cell.get(cell)
        if mine is not None and len(mine) >= lim.per_cell:
            self._drop(next(iter(mine.values())), Input.CAP)
        if self.live >= lim.per_pattern:
            oldest = min((d[next(iter(d))] for d in self.by_cell.values()),
                         key=lambda q: q.ident)
            self._drop(oldest, Input.CAP)
        mine = self.by_cell.get(cell)
        if mine is None:
            mine = self.by_cell[cell] = OrderedDict()
        self.next_ident += 1
        p = Partial(self.name, self.next_ident, self.n, cell)
        mine[p.ident] = p
        self.live += 1
        self.started += 1
        return p

    def _enter(self, p: Partial, k: int) -> None:
        """Place ``p`` (already transitioned) as awaiting step ``k``."""
        st = self.cp.steps[k]
        p.step = k
        binds = p.binds
        p.want = tuple(norm(g(binds[j])) for j, g in st.jrefs)
        p.key = p.want[st.probe] if st.probe >= 0 else None
        if st.count is not None:
            p.window = OrderedDict() if st.dget is not None else deque()
            p.sig = None
        else:
            p.window = None
            p.sig = sig = tuple(norm(g(binds[j])) for j, g in st.sig)
            other = self.sigs[k].get(sig)
            if other is not None:
                if other.start_seq <= p.start_seq and other.start_mono <= p.start_mono:
                    self._drop(other, Input.SAME)
                elif p.start_seq <= other.start_seq and p.start_mono <= other.start_mono:
                    self._drop(p, Input.SAME, placed=False)
                    return
            self.sigs[k][sig] = p
        bucket = self.buckets[k].get(p.key)
        if bucket is None:
            bucket = self.buckets[k][p.key] = {}
        bucket[p.ident] = p

    def _unplace(self, p: Partial) -> None:
        k = p.step
        bucket = self.buckets[k].get(p.key)
        if bucket is not None and bucket.pop(p.ident, None) is not None and not bucket:
            del self.buckets[k][p.key]
        if p.sig is not None and self.sigs[k].get(p.sig) is p:
            del self.sigs[k][p.sig]

    def _drop(self, p: Partial, inp: Input, placed: bool = True) -> None:
        """End ``p`` with ``inp`` (span, until, cap, same, swap or last) and forget it."""
        p.to(inp)
        if placed:
            self._unplace(p)
        mine = self.by_cell[p.cell]
        del mine[p.ident]
        if not mine:
            del self.by_cell[p.cell]
        self.live -= 1
        if inp is Input.SPAN:
            self.expired += 1
        elif inp is Input.UNTIL:
            self.cancelled += 1
        elif inp is Input.SAME:
            self.merged += 1
        elif inp is Input.CAP:
            self.evicted[p.cell] += 1

    # ------------------------------------------------------------------ one event
    def finish(self) -> Match:
        """The match of the partials the current event completed: the one that began
        last (the others are shadowed)."""
        done, self.done = self.done, []
        best = max(done, key=lambda q: q.start_seq)
        self.matches += 1
        self.shadowed += len(done) - 1
        return self._match(best)

    def until(self, e: EventLike, i: int) -> None:
        """Until clause ``i`` on ``e``: cancel the partials it names."""
        u = self.cp.until[i]
        if u.static is not None and not u.static(e):
            return
        ev = tuple(norm(g(e)) for g in u.jget)
        for mine in list(self.by_cell.values()):
            for p in list(mine.values()):
                if p.step == 0:
                    continue  # a first step's count window: no match has begun
                if all(j < p.step and join_holds(op, v, norm(g(p.binds[j])))
                       for op, v, (j, g) in zip(u.jops, ev, u.jrefs, strict=True)):
                    self._drop(p, Input.UNTIL)

    def advance(self, e: EventLike, k: int) -> bool:
        """``e`` at step ``k``: advance (or count in) the partials awaiting it; whether it
        completed one (in ``done``, for :meth:`finish`)."""
        st = self.cp.steps[k]
        if st.static is not None and not st.static(e):
            return False
        ev = st.jvals(e)
        if NA in ev:
            return False  # a join on a missing attribute holds for no partial
        if st.count is not None and st.dget is not None and norm(st.dget(e)) is NA:
            return False  # counts only events that carry the counted attribute
        bucket = self.buckets[st.index].get(ev[st.probe] if st.probe >= 0 else None)
        if not bucket:
            return False
        mono = e.mono
        span = self.span
        completed = False
        for p in list(bucket.values()):
            if mono - p.start_mono > span:
                self._drop(p, Input.SPAN)
                continue
            if st.all_eq:
                if ev != p.want:
                    continue
            elif not all(join_holds(op, v, w)
                         for op, v, w in zip(st.jops, ev, p.want, strict=True)):
                continue
            if st.count is not None and not self._count(p, e, st):
                p.to(Input.COUNTED)
                continue
            p.binds[st.index] = e
            self._unplace(p)
            if st.last:
                self._drop(p, Input.LAST, placed=False)
                self.done.append(p)
                completed = True
            else:
                nxt = self.cp.steps[st.index + 1]
                p.to(Input.STEP, nxt.count is not None)
                self._enter(p, st.index + 1)
        return completed

    def _count(self, p: Partial, e: EventLike, st: CStep) -> bool:
        """Count ``e`` in ``p``'s window; True when the count is reached (the window's
        summary goes to ``p.infos``)."""
        assert st.count is not None
        mono, win, within = e.mono, p.window, st.count.within
        if isinstance(win, OrderedDict):
            assert st.dget is not None
            raw = st.dget(e)
            key = norm(raw)
            win.pop(key, None)
            win[key] = (mono, raw)
            while mono - next(iter(win.values()))[0] > within:
                win.popitem(last=False)
            if len(win) < st.count.n:
                return False
            first = next(iter(win.values()))[0]
            p.infos[st.index] = (len(win), first, tuple(r for _, r in win.values()))
        else:
            assert win is not None
            win.append(mono)
            while mono - win[0] > within:
                win.popleft()
            if len(win) < st.count.n:
                return False
            p.infos[st.index] = (len(win), win[0], ())
        p.window = None
        return True

    def _renew(self, q: Partial, e: EventLike) -> None:
        """``e`` begins a partial equal to ``q`` (awaiting step 1 with the same keys) but
        later: ``q`` would be merged into it.  Done in place: ``q`` becomes the newest,
        in ``e``'s cell."""
        old = self.by_cell[q.cell]
        del old[q.ident]
        if not old:
            del self.by_cell[q.cell]
        mine = self.by_cell.get(e.cell)
        if mine is not None and len(mine) >= self.limits.per_cell:
            self._drop(next(iter(mine.values())), Input.CAP)
            mine = self.by_cell.get(e.cell)
        if mine is None:
            mine = self.by_cell[e.cell] = OrderedDict()
        bucket = self.buckets[1][q.key]
        del bucket[q.ident]
        self.next_ident += 1
        q.ident = self.next_ident
        mine[q.ident] = bucket[q.ident] = q
        q.cell = e.cell
        q.binds[0] = e
        q.start_mono, q.start_seq = e.mono, e.seq
        self.started += 1
        self.merged += 1

    def start(self, e: EventLike) -> bool:
        """``e`` at the first step: begin a partial (or count in a first step's window);
        whether that completed a match (a one-step pattern)."""
        st = self.cp.steps[0]
        if st.static is not None and not st.static(e):
            return False
        if st.count is None:
            if self.n == 1:  # matched at once: no partial to keep
                p = Partial(self.name, 0, 1, e.cell)
                self.started += 1
                p.to(Input.LAST)
            else:
                nxt = self.cp.steps[1]
                if nxt.count is None:
                    same = self.sigs[1].get(nxt.sig0(e))
                    if same is not None:
                        self._renew(same, e)
                        return False
                p = self._birth(e)
                p.to(Input.START, nxt.count is not None)
            p.binds[0] = e
            p.start_mono, p.start_seq = e.mono, e.seq
            if self.n == 1:
                self.done.append(p)
                return True
            self._enter(p, 1)
            return False
        group = st.pvals(e)
        if NA in group or (st.dget is not None and norm(st.dget(e)) is NA):
            return False
        bucket = self.buckets[0].get(group)
        if bucket:
            p = next(iter(bucket.values()))
        else:
            p = self._birth(e)
            p.to(Input.START, True)
            p.step, p.key, p.sig = 0, group, None
            p.window = OrderedDict() if st.dget is not None else deque()
            self.buckets[0][group] = {p.ident: p}
        if not self._count(p, e, st):
            p.to(Input.COUNTED)
            return False
        self._unplace(p)
        info = p.infos[0]
        assert info is not None
        p.binds[0] = e
        p.start_mono, p.start_seq = info[1], e.seq
        if self.n == 1:
            self._drop(p, Input.LAST, placed=False)
            self.done.append(p)
            return True
        p.to(Input.STEP, self.cp.steps[1].count is not None)
        self._enter(p, 1)
        return False

    # ------------------------------------------------------------------ time, swap
    def sweep(self, now: float) -> int:
        """Free the partials past their span (first-step windows: emptied) at ``now``."""
        if not self.live:
            return 0
        n = 0
        first = self.cp.steps[0]
        for mine in list(self.by_cell.values()):
            for p in list(mine.values()):
                if first.count is None:
                    # a plain first step: a cell's partials are in the order of their
                    # start (a birth or a renewal appends), so the expired ones lead
                    if now - p.start_mono <= self.span:
                        break
                elif p.step == 0:
                    w = p.window
                    assert w is not None
                    newest = next(reversed(w.values()))[0] if isinstance(w, OrderedDict) \
                        else w[-1]
                    if now - newest <= first.count.within:
                        continue
                elif now - p.start_mono <= self.span:
                    continue
                self._drop(p, Input.SPAN)
                n += 1
        return n

    def retire(self) -> int:
        """Drop every partial (the pattern changed or left); how many."""
        n = self.live
        for mine in list(self.by_cell.values()):
            for p in list(mine.values()):
                self._drop(p, Input.SWAP)
        return n

    # ------------------------------------------------------------------ the match
    def _match(self, p: Partial) -> Match:
        links = []
        for st, ev, info in zip(self.cp.steps, p.binds, p.infos, strict=True):
            keys = tuple((a, v) for a, g in st.keys if (v := g(ev)) is not NA)
            links.append(Link(st.label, ev.seq, ev.mono, ev.ts, ev.cell, ev.channel,
                              ev.kind, keys, *(info if info is not None else ())))
        pat = self.cp.pattern
        return Match(pat.name, self.cp.digest, pat.severity, pat.response, pat.tags,
                     tuple(links))
