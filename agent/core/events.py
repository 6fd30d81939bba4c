"""Events: every observation and decision of the agent is one :class:`Event` record.

An event carries a per-boot sequence number (``seq``, given by the bus; ``boot`` names
the agentd instance that numbered it, so numbers from before a restart or a respawn are
not mistaken for new ones), a monotonic time (``mono``: spans and windows are measured on
it, since the wall clock can be set) and a wall-clock time (``ts``), the cell (or None for
the host), the channel (``lifecycle``, ``tuner``, ``reclaim``, ``master``, the monitors'
``exec``, ``syscall``, ``proc``, ``host``, ``net``, ``correlation``), a short kind, a
severity and attributes (docs/events.md lists them).  Readers see a gap in ``seq`` where
events were evicted, dropped by a full queue or coalesced (the bus then publishes a
``suppressed`` event with the count).  Records are CBOR-encodable (:meth:`Event.to_wire`).
The bus that numbers, limits and fans them out is :mod:`agent.daemon.bus`.
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
_WIRE_KEYS = frozenset({"ts", "cell", "channel", "kind", "attrs", "severity", "seq", "mono",
                        "boot"})

Sink = Callable[["Event"], None]


def _bad(message: str) -> ProtocolError:
    return ProtocolError("E_EVENT", message,
                         "events carry ts, cell, channel, kind, attrs, severity (and the "
                         "bus's seq, mono and boot)")


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
    seq: int = 0  # given by the bus: 1, 2, ... per agentd instance (0: not published)
    mono: float = 0.0  # monotonic seconds, given by the bus
    boot: str = ""  # the agentd instance that numbered it

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
        if isinstance(self.seq, bool) or not isinstance(self.seq, int) or self.seq < 0:
            raise _bad(f"event seq must be a non-negative integer, got {self.seq!r}")
        if isinstance(self.mono, bool) or not isinstance(self.mono, int | float) \
                or not math.isfinite(self.mono):
            raise _bad(f"event mono must be a finite number, got {self.mono!r}")
        if not isinstance(self.boot, str) or len(self.boot) > 64:
            raise _bad("event boot must be a short string")

    def to_wire(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": float(self.ts), "mono": float(self.mono),
                "boot": self.boot, "cell": self.cell, "channel": self.channel,
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
                       severity=cast(Severity, obj.get("severity", "info")),
                       seq=obj.get("seq", 0), mono=obj.get("mono", 0.0),
                       boot=obj.get("boot", ""))
        except KeyError as exc:
            raise _bad(f"event record lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise _bad(f"malformed event record: {exc}") from None


