"""A cell's output kept in memory: the last lines of stdout and stderr, bounded in bytes.

The spawner feeds raw chunks as they come from the cell's pipes; :class:`LogBuffer`
splits them into lines per stream (a partial line waits for its end, or for
:meth:`LogBuffer.flush` when the stream closes), stamps each with the time it completed,
and drops the oldest lines once the total exceeds ``max_bytes``.  A single line longer
than ``max_line`` is cut there and marked, so one runaway line cannot evict everything.
Pure: no I/O, the clock is a parameter.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["LINE_OVERHEAD", "LogBuffer", "LogLine", "Stream"]

Stream = Literal["stdout", "stderr"]
LINE_OVERHEAD = 32  # bytes charged per line on top of its text (timestamps, objects)
_CUT = " [...cut]"


@dataclass(frozen=True)
class LogLine:
    ts: float
    stream: Stream
    text: str

    @property
    def cost(self) -> int:
        return len(self.text.encode()) + LINE_OVERHEAD

    def to_wire(self) -> dict[str, Any]:
        return {"ts": self.ts, "stream": self.stream, "line": self.text}


class LogBuffer:
    """Last lines of a cell's stdout and stderr, at most ``max_bytes`` in total."""

    def __init__(self, max_bytes: int = 64 << 10, *, max_line: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        if max_bytes < 256:
            raise ValueError("max_bytes must be at least 256")
        self.max_bytes = max_bytes
        self.max_line = min(max_line, max_bytes // 2)
        self.clock = clock
        self.lines: collections.deque[LogLine] = collections.deque()
        self.size = 0
        self.dropped = 0  # lines evicted to stay within max_bytes
        self.total = 0  # lines ever completed
        self._partial: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    def feed(self, stream: Stream, data: bytes) -> None:
        """Add raw output of ``stream``; complete lines are stored, a tail waits."""
        buf = self._partial[stream]
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            self._add(stream, bytes(buf[:nl]))
            del buf[: nl + 1]
        while len(buf) > self.max_line:
            self._add(stream, bytes(buf[: self.max_line]), cut=True)
            del buf[: self.max_line]

    def flush(self, stream: Stream | None = None) -> None:
        """The stream ended: keep its unterminated last line."""
        for name in (stream,) if stream else ("stdout", "stderr"):
            buf = self._partial[name]
            if buf:
                self._add(name, bytes(buf))
                buf.clear()

    def _add(self, stream: Stream, raw: bytes, *, cut: bool = False) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > self.max_line:
            raw, cut = raw[: self.max_line], True
        text = raw.decode("utf-8", errors="replace") + (_CUT if cut else "")
        line = LogLine(self.clock(), stream, text)
        self.lines.append(line)
        self.size += line.cost
        self.total += 1
        while self.size > self.max_bytes and self.lines:
            self.size -= self.lines.popleft().cost
            self.dropped += 1

    def tail(self, n: int, stream: Stream | None = None) -> list[LogLine]:
        """The last ``n`` lines (of one stream, or both interleaved), oldest first."""
        if n <= 0:
            return []
        picked = [x for x in self.lines if stream is None or x.stream == stream]
        return picked[-n:]

    def __len__(self) -> int:
        return len(self.lines)
