"""The event bus of agentd: every observation and decision is published here once and fanned
out to the bounded ring behind ``agentctl events``, the sinks (the persistent log; with
``all_events`` the correlation engine) and live subscribers (bounded queues that drop their
oldest event and count it).  The record itself is :class:`agent.core.events.Event`.  Not
thread-safe: publish from the loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.core.events import SEVERITIES, Event, Severity, Sink

__all__ = ["EventBus", "Subscription"]

log = logging.getLogger(__name__)


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


class EventBus:
    """Fan-out of events to the ring, sinks and subscribers (see module doc)."""

    def __init__(self, *, ring_size: int = 1024, clock: Callable[[], float] = time.time,
                 state_change_kinds: Iterable[str] = ()) -> None:
        if ring_size < 1:
            raise ValueError("ring_size must be at least 1")
        self.clock = clock
        self.published = 0
        self.sink_errors = 0
        self._ring: collections.deque[Event] = collections.deque(maxlen=ring_size)
        self._state_kinds: set[str] = set(state_change_kinds)
        self._sinks: list[tuple[Sink, bool]] = []
        self._subs: list[Subscription] = []

    # ----------------------------------------------------------------- configuration
    def mark_state_change(self, *kinds: str) -> None:
        """Events of these kinds go to the persistent sinks whatever their severity."""
        self._state_kinds.update(kinds)

    def is_persistent(self, event: Event) -> bool:
        return event.severity != "info" or event.kind in self._state_kinds

    def add_sink(self, sink: Sink, *, all_events: bool = False) -> None:
        self._sinks.append((sink, all_events))

    def remove_sink(self, sink: Sink) -> None:
        self._sinks = [(s, a) for s, a in self._sinks if s is not sink]

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
    def publish(self, event: Event) -> None:
        self.published += 1
        self._ring.append(event)
        persistent = self.is_persistent(event)
        for sink, all_events in list(self._sinks):
            if all_events or persistent:
                try:
                    sink(event)
                except Exception:
                    self.sink_errors += 1
                    log.exception("event sink %r failed on %s/%s", sink, event.channel,
                                  event.kind)
        for sub in list(self._subs):
            sub._offer(event)

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: Severity = "info", **attrs: Any) -> Event:
        """Build an event stamped with the bus clock, publish it and return it."""
        event = Event(self.clock(), cell, channel, kind, attrs, severity)
        self.publish(event)
        return event

    # ----------------------------------------------------------------- reading
    def recent(self, n: int | None = None, *, cell: str | None = None,
               channel: str | None = None, kind: str | None = None,
               min_severity: Severity | None = None, since: float | None = None,
               ) -> list[Event]:
        """The last ``n`` (all if None) ring events matching every given filter, oldest
        first.  ``kind`` and ``channel`` are shell-style patterns ("resize*")."""
        match = _matcher(cell, channel, kind, min_severity)
        out = [e for e in self._ring if match(e) and (since is None or e.ts >= since)]
        if n is not None:
            out = out[-n:] if n > 0 else []
        return out

    def __len__(self) -> int:
        return len(self._ring)


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
