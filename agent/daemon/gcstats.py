"""The cyclic garbage collector's pauses in agentd: how many collections of each
generation ran and how long they held the loop (``agentctl status``: ``gc``).

A full collection (generation 2) walks every tracked object agentd holds: the pattern
library's compiled patterns, the event rings, the cells' records.  On the emulated box
one costs a few hundred milliseconds: a pause that every event, trap and request waiting
on the loop shares.  :func:`freeze_now` moves every object alive at that moment out of
the collector's passes (``gc.freeze``): agentd calls it once started and after each
pattern bundle is in place, when what is alive is what stays (modules, the library).  The
price: a reference cycle among those objects that later becomes garbage is never freed
(a replaced library's, if it has cycles: one per bundle update, rare and bounded).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

__all__ = ["GcPauses", "freeze_now"]


class GcPauses:
    """A ``gc.callbacks`` entry: per generation, the collections and their time."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = self.clock()
            return
        g = min(2, max(0, int(info.get("generation", 0))))
        took = self.clock() - self._t0
        self.count[g] += 1
        self.total[g] += took
        self.longest[g] = max(self.longest[g], took)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def status(self) -> dict[str, Any]:
        return {"collections": list(self.count),
                "total_ms": [round(t * 1000, 1) for t in self.total],
                "longest_ms": [round(t * 1000, 1) for t in self.longest],
                "frozen": gc.get_freeze_count()}


def freeze_now() -> None:
    """Every object alive now leaves the collector's passes (see the module doc)."""
    gc.freeze()
