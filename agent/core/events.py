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

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from agent.core.errors import ProtocolError

__all__ = ["SEVERITIES", "Event", "Severity", "Sink"]

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


