"""The persistent event history: the bus's alerts and state changes written to the event
log (:class:`agent.kernel.eventlog.EventLog`) through a bounded queue, the ``events.log``
op that reads them back (also those of earlier agentd instances: a respawn or a crash
does not lose them), and the ``event_bus`` status field (numbered, kept, suppressed,
each sink's queue, drops and errors).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from agent.core.errors import AgentError
from agent.core.events import SEVERITIES
from agent.core.protocol import Handler, Peer, arg, check_args
from agent.daemon.bus import EventBus
from agent.kernel.eventlog import EventLog

__all__ = ["SINK_QUEUE", "EventHistory"]

SINK_QUEUE = 4096  # events waiting for the log; beyond, the oldest are dropped and counted
_REPLY_EVENTS = 200  # at most this many per reply (a reply is one frame)


class EventHistory:
    """Owns the event log sink on ``bus`` and serves it."""

    def __init__(self, bus: EventBus, log: EventLog) -> None:
        self.bus = bus
        self.log = log
        bus.add_sink(log.add, queue=SINK_QUEUE, batch=256, name="event-log",
                     after_batch=log.flush)

    def close(self) -> None:
        self.bus.close()
        self.log.close()

    def handlers(self) -> dict[str, Handler]:
        return {"events.log": self.op_events_log}

    def status(self) -> dict[str, Any]:
        return {"boot": self.bus.boot, "published": self.bus.published,
                "kept": self.bus.kept, "suppressed": self.bus.limiter.suppressed_total,
                "sinks": self.bus.sink_stats(), "log_written": self.log.written,
                "log_failed": self.log.failed}

    async def op_events_log(self, peer: Peer, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The newest ``n`` persisted events matching the filters, oldest first."""
        check_args(args, ("n", "cell", "channel", "kind", "severity"))
        n = arg(args, "n", int, 50)
        if n is None or not 0 <= n <= _REPLY_EVENTS:
            raise AgentError("E_ARGS", f"argument `n` must be 0..{_REPLY_EVENTS}")
        cell, channel, kind = arg(args, "cell", str), arg(args, "channel", str), \
            arg(args, "kind", str)
        sev = arg(args, "severity", str)
        if sev is not None and sev not in SEVERITIES:
            raise AgentError("E_ARGS", f"unknown severity `{sev}`",
                             f"use one of {', '.join(SEVERITIES)}")
        floor = next((i for i, s in enumerate(SEVERITIES) if s == sev), 0)
        self.log.flush()
        out = [e for e in self.log.read()
               if (cell is None or e.get("cell") == cell)
               and (channel is None or fnmatch.fnmatchcase(str(e.get("channel")), channel))
               and (kind is None or fnmatch.fnmatchcase(str(e.get("kind")), kind))
               and e.get("severity") in SEVERITIES
               and SEVERITIES.index(e["severity"]) >= floor]
        return out[-n:] if n else []
