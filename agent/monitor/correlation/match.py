"""What the engine returns: a :class:`Match`, the whole chain of a completed pattern.

Each :class:`Link` is one step: its event's sequence number, monotonic and wall time,
cell, channel, kind and the values of the attributes the pattern looks at in that step
(its "keys").  A counting step's link is the event that completed the count, with how
many were counted, when the earliest counted event came and, for ``count N distinct
ATTR``, the distinct values.  :meth:`Match.attrs` is the attribute map of the
``correlation/alert`` event (docs/events.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Link", "Match"]


@dataclass(frozen=True, slots=True)
class Link:
    step: str
    seq: int
    mono: float
    ts: float
    cell: str | None
    channel: str
    kind: str
    keys: tuple[tuple[str, Any], ...] = ()
    count: int | None = None  # a counting step: how many events (or distinct values)
    first_mono: float | None = None  # ... and when the earliest of those came
    values: tuple[Any, ...] = ()  # ... and which distinct values (count N distinct ATTR)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"step": self.step, "seq": self.seq, "mono": self.mono,
                             "ts": self.ts, "cell": self.cell, "channel": self.channel,
                             "kind": self.kind, "keys": dict(self.keys)}
        if self.count is not None:
            d.update(count=self.count, first_mono=self.first_mono, values=list(self.values))
        return d


@dataclass(frozen=True, slots=True)
class Match:
    """A completed pattern.  ``digest`` identifies the pattern's content (model.Pattern)."""

    pattern: str
    digest: str
    severity: str
    response: str
    tags: tuple[str, ...]
    chain: tuple[Link, ...]

    @property
    def seq(self) -> int:
        """The sequence number of the event that completed the match."""
        return self.chain[-1].seq

    @property
    def cells(self) -> tuple[str | None, ...]:
        """The cells of the chain, each once, in the order they first appear."""
        return tuple(dict.fromkeys(link.cell for link in self.chain))

    def attrs(self) -> dict[str, Any]:
        """The attributes of the ``correlation/alert`` event."""
        return {"pattern": self.pattern, "digest": self.digest, "response": self.response,
                "tags": list(self.tags), "cells": list(self.cells),
                "chain": [link.to_wire() for link in self.chain]}
