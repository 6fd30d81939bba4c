"""The event bus of agentd: every observation and decision is published here once.

:meth:`EventBus.publish` numbers each event (``seq``, per agentd instance ``boot``),
stamps its monotonic time, and fans it out:

1. to the *raw* sinks (``add_sink(..., raw=True)``: the correlation engine), which see
   every event, before any limit, through a bounded queue;
2. through the per-(cell, channel, kind, sub-kind) limit
   (:class:`agent.core.ratelimit.Coalescer`; the sub-kind is the event's ``syscall`` or
   ``reason``, see :data:`SUBKIND_ATTRS`): past its burst a noisy key is counted, not
   kept, and once its window closes one ``suppressed`` event says how many ("1,532 more
   `trap` of `mount`": ``kind``, ``syscall``, ``count`` in ``attrs``).  State changes are
   never limited;
3. to the rings behind ``agentctl events``: one per cell and one for the host, each
   bounded, so a noisy cell evicts only its own events;
4. to the sinks (by default only events worth persisting: severity notice/alert, or a
   kind marked as a state change), each called inline or, with ``queue=N``, through a
   bounded queue drained in batches by the loop (slow sinks such as the persistent log
   never run inside ``publish``); a full queue drops its oldest event and counts it;
5. to live subscribers: bounded ``asyncio.Queue``\\ s that drop their oldest event when
   full and count what they dropped.

A failing sink is logged and counted, never propagated: publishing cannot fail because
of a consumer.  Not thread-safe: publish from the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import fnmatch
import heapq
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from agent.core.events import SEVERITIES, Event, Severity, Sink
from agent.core.ratelimit import Coalescer

__all__ = ["EventBus", "Subscription"]

log = logging.getLogger(__name__)

HOST_RING = 1024  # events of the host (cell None) kept for `agentctl events`
CELL_RING = 256  # events kept per cell
CELL_RINGS = 128  # cells whose events are kept (the least recently heard-of go first)


class Subscription:
    """A live subscriber: a bounded queue that drops its oldest event when full."""

    def __init__(self, bus: EventBus, maxsize: int, match: Callable[[Event], bool]) -> None:
        self.queue: asyncio.Queue[Event] = asyncio.Queue(maxsize)
        self.dropped = 0
        self._bus = bus
        self._match = match

    def _offer(self, event: Event) -> None:
        if not self._match(event):
            return
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)

    async def get(self) -> Event:
        return await self.queue.get()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(eq=False)
class _Sink:
    fn: Sink
    all_events: bool
    raw: bool
    channel: str | None
    queue: collections.deque[Event] | None  # None: called inline
    batch: int
    name: str
    after_batch: Callable[[], None] | None = None
    dropped: int = 0
    errors: int = 0
    scheduled: bool = False

    def wants(self, event: Event, persistent: bool) -> bool:
        return ((self.raw or self.all_events or persistent)
                and (self.channel is None or fnmatch.fnmatchcase(event.channel, self.channel)))


@dataclass
class _Rings:
    """The events kept for readers: the host's ring and one ring per cell."""

    host_size: int
    cell_size: int
    max_cells: int
    host: collections.deque[Event] = field(init=False)
    cells: dict[str, collections.deque[Event]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.host = collections.deque(maxlen=self.host_size)

    def add(self, event: Event) -> None:
        if event.cell is None:
            self.host.append(event)
            return
        ring = self.cells.pop(event.cell, None)  # re-inserted last: least recent first
        if ring is None:
            if len(self.cells) >= self.max_cells:
                del self.cells[next(iter(self.cells))]
            ring = collections.deque(maxlen=self.cell_size)
        ring.append(event)
        self.cells[event.cell] = ring

    def select(self, cell: str | None) -> list[collections.deque[Event]]:
        if cell is not None:
            ring = self.cells.get(cell)
            return [ring] if ring is not None else []
        return [self.host, *self.cells.values()]

    def __len__(self) -> int:
        return len(self.host) + sum(len(r) for r in self.cells.values())


class EventBus:
    """Numbering, limits and fan-out of events (see module doc)."""

    def __init__(self, *, ring_size: int = HOST_RING, cell_ring_size: int = CELL_RING,
                 clock: Callable[[], float] = time.time,
                 mono: Callable[[], float] = time.monotonic,
                 state_change_kinds: Iterable[str] = (),
                 limiter: Coalescer | None = None, boot: str | None = None) -> None:
        if ring_size < 1 or cell_ring_size < 1:
            raise ValueError("ring sizes must be at least 1")
        self.clock = clock
        self.mono = mono
        self.boot = boot if boot is not None else os.urandom(6).hex()
        self.published = 0  # events numbered (= the last seq)
        self.kept = 0  # events that passed the limit
        self.sink_errors = 0
        self.limiter = limiter if limiter is not None else Coalescer()
        self._rings = _Rings(ring_size, cell_ring_size, CELL_RINGS)
        self._state_kinds: set[str] = set(state_change_kinds)
        self._sinks: list[_Sink] = []
        self._subs: list[Subscription] = []
        self._summary_timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- configuration
    def mark_state_change(self, *kinds: str) -> None:
        """Events of these kinds go to the persistent sinks whatever their severity, and
        are never limited."""
        self._state_kinds.update(kinds)

    def is_persistent(self, event: Event) -> bool:
        return event.severity != "info" or event.kind in self._state_kinds

    def add_sink(self, sink: Sink, *, all_events: bool = False, raw: bool = False,
                 channel: str | None = None, queue: int = 0, batch: int = 256,
                 name: str | None = None, after_batch: Callable[[], None] | None = None
                 ) -> None:
        """``sink`` gets the events worth persisting (``all_events``: every kept event;
        ``raw``: every event, before the limit), of ``channel`` (a shell pattern) if
        given.  ``queue=N``: through a bounded queue of N, drained ``batch`` at a time by
        the loop, instead of inline; ``after_batch`` is called after each batch."""
        q: collections.deque[Event] | None = \
            collections.deque(maxlen=queue) if queue > 0 else None
        label = name or str(getattr(sink, "__qualname__", None) or repr(sink))
        self._sinks.append(_Sink(sink, all_events, raw, channel, q, max(1, batch), label,
                                 after_batch))

    def remove_sink(self, sink: Sink) -> None:
        self._sinks = [s for s in self._sinks if s.fn is not sink]

    def sink_stats(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "queued": len(s.queue) if s.queue is not None else 0,
                 "dropped": s.dropped, "errors": s.errors} for s in self._sinks]

    def subscribe(self, *, maxsize: int = 256, cell: str | None = None,
                  channel: str | None = None, kind: str | None = None,
                  min_severity: Severity | None = None) -> Subscription:
        """A live queue of future events matching the filters (see :meth:`recent`)."""
        sub = Subscription(self, maxsize, _matcher(cell, channel, kind, min_severity))
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    # ----------------------------------------------------------------- publishing
    def publish(self, event: Event) -> Event:
        """Number, limit and fan out ``event``; returns it as numbered."""
        self.published += 1
        now = self.mono()
        event = dataclasses.replace(event, seq=self.published, mono=event.mono or now,
                                    boot=self.boot)
        persistent = self.is_persistent(event)
        for s in self._sinks:
            if s.raw and s.wants(event, persistent):
                self._deliver(s, event)
        self._flush_summaries(now)
        if event.kind in self._state_kinds or event.kind == "suppressed" or \
                self.limiter.admit((event.cell, event.channel, event.kind,
                                    _subkind(event)), now):
            self._keep(event, persistent)
        else:
            self._arm_summaries()
        return event

    def _keep(self, event: Event, persistent: bool) -> None:
        self.kept += 1
        self._rings.add(event)
        for s in self._sinks:
            if not s.raw and s.wants(event, persistent):
                self._deliver(s, event)
        for sub in list(self._subs):
            sub._offer(event)

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: Severity = "info", **attrs: Any) -> Event:
        """Build an event stamped with the bus clocks, publish it and return it."""
        return self.publish(Event(self.clock(), cell, channel, kind, attrs, severity))

    # ----------------------------------------------------------------- sinks
    def _deliver(self, s: _Sink, event: Event) -> None:
        if s.queue is None:
            self._call(s, event)
            return
        if len(s.queue) == s.queue.maxlen:
            s.dropped += 1  # the deque drops its oldest on append
        s.queue.append(event)
        if not s.scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.drain(s)  # no loop (tests, shutdown): deliver now
                return
            s.scheduled = True
            loop.call_soon(self.drain, s)

    def drain(self, s: _Sink) -> None:
        """Deliver one batch of a queued sink; reschedule while more wait."""
        s.scheduled = False
        assert s.queue is not None
        for _ in range(min(s.batch, len(s.queue))):
            self._call(s, s.queue.popleft())
        self._after(s)
        if s.queue:
            try:
                asyncio.get_running_loop().call_soon(self.drain, s)
                s.scheduled = True
            except RuntimeError:
                self.drain(s)

    def _after(self, s: _Sink) -> None:
        if s.after_batch is not None:
            try:
                s.after_batch()
            except Exception:
                s.errors += 1
                self.sink_errors += 1
                log.exception("event sink %s failed after a batch", s.name)

    def _call(self, s: _Sink, event: Event) -> None:
        try:
            s.fn(event)
        except Exception:
            s.errors += 1
            self.sink_errors += 1
            log.exception("event sink %s failed on %s/%s", s.name, event.channel, event.kind)

    # ----------------------------------------------------------------- summaries
    def _arm_summaries(self) -> None:
        if self._summary_timer is not None:
            return
        due = self.limiter.next_due()
        if due is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # flushed by the next publish
        delay = max(0.0, due - self.mono())
        self._summary_timer = loop.call_later(delay, self._on_summary_timer)

    def _on_summary_timer(self) -> None:
        self._summary_timer = None
        self._flush_summaries(self.mono())
        self._arm_summaries()

    def _flush_summaries(self, now: float) -> None:
        due = self.limiter.next_due()
        if due is None or now < due:
            return
        for s in self.limiter.due(now):
            cell, channel, kind, sub = cast(tuple[str | None, str, str, tuple[str, str] | None],
                                            s.key)
            attrs: dict[str, Any] = {"kind": kind, "count": s.count,
                                     "span_s": round(s.last - s.first, 3)}
            if sub is not None:
                attrs[sub[0]] = sub[1]
            self.publish(Event(self.clock(), cell, channel, "suppressed", attrs, "info"))

    def close(self) -> None:
        """Deliver what the queued sinks hold (agentd stops)."""
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        for s in self._sinks:
            while s.queue:
                self._call(s, s.queue.popleft())
            if s.queue is not None:
                self._after(s)

    # ----------------------------------------------------------------- reading
    def recent(self, n: int | None = None, *, cell: str | None = None,
               channel: str | None = None, kind: str | None = None,
               min_severity: Severity | None = None, since: float | None = None,
               ) -> list[Event]:
        """The last ``n`` (all if None) kept events matching every given filter, oldest
        first (by ``seq``).  ``kind`` and ``channel`` are shell-style patterns."""
        match = _matcher(cell, channel, kind, min_severity)
        rings = self._rings.select(cell)
        merged = heapq.merge(*rings, key=lambda e: e.seq) if len(rings) > 1 else \
            iter(rings[0] if rings else ())
        out = [e for e in merged if match(e) and (since is None or e.ts >= since)]
        if n is not None:
            out = out[-n:] if n > 0 else []
        return out

    def __len__(self) -> int:
        return len(self._rings)


# An event's sub-kind, by the first of these attributes it has: coalesced apart, so a
# flood of one (``trap`` of ``sethostname``, an ``l2-drop`` for ``ip4``) never hides the
# first of another (``trap`` of ``mount``, ``l2-drop`` for ``ip6``).  The values come from
# the agent's own tables (syscall names, reasons); the limiter bounds the keys anyway.
SUBKIND_ATTRS = ("syscall", "reason")


def _subkind(event: Event) -> tuple[str, str] | None:
    for name in SUBKIND_ATTRS:
        value = event.attrs.get(name)
        if isinstance(value, str):
            return name, value[:64]
    return None


def _glob(pattern: str | None) -> Callable[[str], object] | None:
    """A shell pattern compiled for one filter.  Not ``fnmatch.fnmatchcase``: it keeps
    every pattern it ever saw compiled in a cache of 32768, which a client sending new
    patterns grows by megabytes (the ``re`` module's own cache holds 512)."""
    return None if pattern is None else re.compile(fnmatch.translate(pattern)).match


def _matcher(cell: str | None, channel: str | None, kind: str | None,
             min_severity: Severity | None) -> Callable[[Event], bool]:
    floor = SEVERITIES.index(min_severity) if min_severity is not None else 0
    chan, kin = _glob(channel), _glob(kind)

    def match(e: Event) -> bool:
        return ((cell is None or e.cell == cell)
                and (chan is None or chan(e.channel) is not None)
                and (kin is None or kin(e.kind) is not None)
                and SEVERITIES.index(e.severity) >= floor)

    return match
