"""The event bus: every observation and decision of the agent is an :class:`Event`.

``EventBus.publish`` fans an event out to

* a bounded in-memory ring (``recent()``, behind ``agentctl events``);
* *sinks*: synchronous callbacks.  By default a sink sees only events worth persisting
  (severity notice/alert, or a kind marked as a state change); ``add_sink(cb,
  all_events=True)`` sees everything (the correlation engine).  A failing sink is logged
  and counted, never propagated: publishing cannot fail because of a consumer;
* live subscribers: bounded ``asyncio.Queue``\\ s that drop their oldest event when full
  and count what they dropped.

The bus is not thread-safe: publish from the event-loop thread.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from agent.errors import ProtocolError

__all__ = [
    "SEVERITIES",
    "Event",
    "EventBus",
    "Severity",
    "Sink",
    "Subscription",
]

log = logging.getLogger(__name__)

Severity = Literal["info", "notice", "alert"]
SEVERITIES: tuple[Severity, ...] = ("info", "notice", "alert")
_NAME_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_WIRE_KEYS = frozenset({"ts", "cell", "channel", "kind", "attrs", "severity"})

Sink = Callable[["Event"], None]


def _bad(message: str) -> ProtocolError:
    return ProtocolError("E_EVENT", message,
                         "events carry ts, cell, channel, kind, attrs and severity")


@dataclass(frozen=True)
class Event:
    """One observation.  ``channel`` is e.g. "master", "tuner", "reclaim", "lifecycle",
    "seccomp"; ``kind`` a short identifier such as "started" or "resize"."""

    ts: float
    cell: str | None
    channel: str
    kind: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    severity: Severity = "info"

    def __post_init__(self) -> None:
        if isinstance(self.ts, bool) or not isinstance(self.ts, int | float) \
                or not math.isfinite(self.ts):
            raise _bad(f"event ts must be a finite number, got {self.ts!r}")
        if self.cell is not None and (not isinstance(self.cell, str) or not self.cell):
            raise _bad("event cell must be a non-empty string or null")
        for name in ("channel", "kind"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
                raise _bad(f"event {name} must be a short lower-case identifier, got {value!r}")
        if self.severity not in SEVERITIES:
            raise _bad(f"event severity must be one of {', '.join(SEVERITIES)}")
        if not isinstance(self.attrs, Mapping) or not all(isinstance(k, str) for k in self.attrs):
            raise _bad("event attrs must be a map with string keys")

    def to_wire(self) -> dict[str, Any]:
        return {"ts": float(self.ts), "cell": self.cell, "channel": self.channel,
                "kind": self.kind, "attrs": dict(self.attrs), "severity": self.severity}

    @classmethod
    def from_wire(cls, obj: object) -> Event:
        """Inverse of :meth:`to_wire`; raises ProtocolError (E_EVENT) on a malformed record."""
        if not isinstance(obj, dict):
            raise _bad("event record must be a map")
        extra = set(obj) - _WIRE_KEYS
        if extra:
            raise _bad(f"unknown event key(s): {', '.join(sorted(map(repr, extra)))}")
        try:
            return cls(ts=obj["ts"], cell=obj.get("cell"), channel=obj["channel"],
                       kind=obj["kind"], attrs=dict(obj.get("attrs", {})),
                       severity=cast(Severity, obj.get("severity", "info")))
        except KeyError as exc:
            raise _bad(f"event record lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise _bad(f"malformed event record: {exc}") from None


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


def _matcher(cell: str | None, channel: str | None, kind: str | None,
             min_severity: Severity | None) -> Callable[[Event], bool]:
    floor = SEVERITIES.index(min_severity) if min_severity is not None else 0

    def match(e: Event) -> bool:
        return ((cell is None or e.cell == cell)
                and (channel is None or fnmatch.fnmatchcase(e.channel, channel))
                and (kind is None or fnmatch.fnmatchcase(e.kind, kind))
                and SEVERITIES.index(e.severity) >= floor)

    return match
