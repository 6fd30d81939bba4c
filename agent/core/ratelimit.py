"""Rate limits that keep one cell from taking the agent's time or memory (pure).

:class:`TokenBucket` meters one flow (a cell's output bytes, its trapped syscalls): it
holds ``burst`` tokens, refills at ``rate`` per second, and :meth:`TokenBucket.take`
answers how long the caller must wait before the amount is covered.  The spawner uses
that answer for back-pressure: it stops reading the cell's pipe or seccomp listener for
that long, so the cell blocks in the kernel and nobody else waits.

:class:`Coalescer` meters events per key (cell, channel, kind): the first ``burst`` of a
key pass at once, then at most ``rate`` per second; the rest are counted, not kept, and
:meth:`Coalescer.due` returns one summary per key whose window closed ("1,532 more
`trap` in 1.0 s").  Time is monotonic seconds, passed in; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

__all__ = ["Coalescer", "Summary", "TokenBucket"]


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # most tokens held
    tokens: float | None = None  # None: full at the first take
    at: float = 0.0  # when ``tokens`` was last brought up to date

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")

    def _refill(self, now: float) -> float:
        if self.tokens is None:
            self.tokens, self.at = self.burst, now
        elif now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        return self.tokens

    def take(self, now: float, amount: float = 1.0) -> float:
        """Spend ``amount`` (it may overdraw: what was done is done); the seconds to wait
        before the balance is positive again, 0.0 if it still is."""
        tokens = self._refill(now) - amount
        self.tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        """Spend ``amount`` if the balance covers it (True), else spend nothing (False)."""
        tokens = self._refill(now)
        if tokens < amount:
            return False
        self.tokens = tokens - amount
        return True

    def wait(self, now: float) -> float:
        """The seconds until the balance is positive (0.0: go ahead), spending nothing."""
        tokens = self._refill(now)
        return 0.0 if tokens >= 0 else -tokens / self.rate


@dataclass(frozen=True)
class Summary:
    """``count`` events of ``key`` were suppressed between ``first`` and ``last``."""

    key: Hashable
    count: int
    first: float
    last: float


@dataclass
class _Window:
    bucket: TokenBucket
    suppressed: int = 0
    first: float = 0.0
    last: float = 0.0


@dataclass
class Coalescer:
    """Per-key limit with summaries; at most ``max_keys`` keys are tracked (the idlest
    go first, their pending summary with them: it is returned by :meth:`due`)."""

    rate: float = 10.0
    burst: float = 20.0
    window: float = 1.0  # a suppressed run is summarised this long after it began
    max_keys: int = 4096
    _keys: dict[Hashable, _Window] = field(default_factory=dict)
    suppressed_total: int = 0
    _evicted: list[Summary] = field(default_factory=list)
    _earliest: float | None = None  # the first window to close (cached: admit is hot)

    def admit(self, key: Hashable, now: float) -> bool:
        """True: pass the event on; False: it was counted into the key's summary."""
        w = self._keys.get(key)
        if w is None:
            if len(self._keys) >= self.max_keys:
                self._evict()
            w = self._keys[key] = _Window(TokenBucket(self.rate, self.burst))
        else:  # most recently used last: dicts keep insertion order
            del self._keys[key]
            self._keys[key] = w
        if w.bucket.try_take(now):
            return True
        if not w.suppressed:
            w.first = now
            if self._earliest is None or now + self.window < self._earliest:
                self._earliest = now + self.window
        w.suppressed += 1
        w.last = now
        self.suppressed_total += 1
        return False

    def _evict(self) -> None:
        key = next(iter(self._keys))
        w = self._keys.pop(key)
        if w.suppressed:
            self._evicted.append(Summary(key, w.suppressed, w.first, w.last))

    def next_due(self) -> float | None:
        """When :meth:`due` next has something to return (None: nothing pending)."""
        return 0.0 if self._evicted else self._earliest

    def due(self, now: float) -> list[Summary]:
        """Summaries of the runs whose window has closed; their counts start again."""
        out, self._evicted = self._evicted, []
        if self._earliest is None or now < self._earliest:
            return out
        self._earliest = None
        for key, w in self._keys.items():
            if not w.suppressed:
                continue
            if now >= w.first + self.window:
                out.append(Summary(key, w.suppressed, w.first, w.last))
                w.suppressed = 0
            elif self._earliest is None or w.first + self.window < self._earliest:
                self._earliest = w.first + self.window
        return out

    def pending(self) -> int:
        """Events counted but not yet summarised."""
        return sum(w.suppressed for w in self._keys.values()) + sum(
            s.count for s in self._evicted)
