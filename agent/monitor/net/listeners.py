"""Channel 3's listener watch (pure): which TCP ports each cell listens on, and a
``net/listen`` event for each one newly seen.

The service dumps a cell's listeners (agent.monitor.net.adapter.DiagSocket) every
:data:`POLL_S` and, at once, before it reports a flow to a port of a cell that this
watch has not seen listening: a listener that is reached is therefore reported before
its flow, however briefly it lived.  One that lives less than a poll and is never
reached may go unseen; nothing reached it.  A port seen again after it was closed is
new again.  A dump cut short (more listeners than the adapter reads) forgets nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent.monitor.net.diagwire import Listener
from agent.monitor.net.rules import NetEvent, uid_attrs

__all__ = ["POLL_S", "ListenWatch"]

POLL_S = 2.0

Key = tuple[str, int]  # (proto, port)


class ListenWatch:
    def __init__(self) -> None:
        self.known: dict[str, frozenset[Key]] = {}

    def knows(self, cell: str, proto: str, port: int) -> bool:
        return (proto, port) in self.known.get(cell, frozenset())

    def seen(self, cell: str, listeners: Iterable[Listener], whole: bool,
             uid_base: int | None) -> list[NetEvent]:
        """One dump of ``cell``'s listeners: the events of the ports new since the last."""
        now: dict[Key, Listener] = {}
        for lis in listeners:
            now.setdefault((lis.proto, lis.port), lis)
        before = self.known.get(cell, frozenset())
        self.known[cell] = frozenset(now) if whole else before | frozenset(now)
        return [NetEvent(cell, "listen", "info",
                         {"proto": lis.proto, "port": lis.port, "address": lis.address,
                          **uid_attrs(uid_base, lis.uid)})
                for key, lis in sorted(now.items()) if key not in before]

    def forget(self, cell: str) -> None:
        self.known.pop(cell, None)
