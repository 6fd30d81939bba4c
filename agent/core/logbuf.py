"""A cell's output kept in memory: the last lines of stdout and stderr, bounded in bytes.

The spawner feeds raw chunks as they come from the cell's pipes.  Feeding does no work
per line: a chunk's complete lines are kept as one raw *block* (the bytes up to its last
newline, joined to the stream's waiting partial line), and only their number is counted
(``bytes.count``, in C).  Lines are split, decoded and cut when somebody reads them
(:meth:`LogBuffer.tail`), and only as many as asked for.  So a cell printing empty lines
as fast as it can costs agentd a memory copy per chunk, not an object per line (a 64 KiB
chunk of newlines used to make 65,536 objects: 137 ms of the loop).

The bound is in bytes: each block is charged its length plus ``LINE_OVERHEAD`` per line;
the oldest blocks go first, and the oldest lines of a block that alone exceeds the bound.
A partial line longer than ``max_line`` is cut there and marked, so one runaway line
cannot hold everything; a complete line longer than ``max_line`` is cut when read.
Every line keeps the time its block completed.  Pure: no I/O, the clock is a parameter.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
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
    raw: bytes  # as the cell wrote it, without the newline (and a trailing CR)
    cut: bool = False

    @property
    def text(self) -> str:
        """The line decoded (invalid UTF-8 replaced), marked when it was cut."""
        return self.raw.decode("utf-8", errors="replace") + (_CUT if self.cut else "")

    def to_wire(self, raw: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"ts": self.ts, "stream": self.stream, "line": self.text}
        if raw:
            out["raw"] = self.raw
        return out


@dataclass
class _Block:
    """Complete lines of one stream, newline-terminated, completed at ``ts``."""

    ts: float
    stream: Stream
    data: bytes
    lines: int
    cut: bool = False  # one line cut at max_line (a partial that grew too long)

    @property
    def cost(self) -> int:
        return len(self.data) + LINE_OVERHEAD * self.lines


class LogBuffer:
    """Last lines of a cell's stdout and stderr, at most ``max_bytes`` in total."""

    def __init__(self, max_bytes: int = 64 << 10, *, max_line: int = 4096,
                 clock: Callable[[], float] = time.time) -> None:
        if max_bytes < 256:
            raise ValueError("max_bytes must be at least 256")
        self.max_bytes = max_bytes
        self.max_line = min(max_line, max_bytes // 2)
        self.clock = clock
        self._blocks: collections.deque[_Block] = collections.deque()
        self.size = 0
        self.dropped = 0  # lines evicted to stay within max_bytes
        self.total = 0  # lines ever completed
        self.fed = 0  # bytes ever fed
        self._partial: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}

    def feed(self, stream: Stream, data: bytes) -> None:
        """Add raw output of ``stream``; complete lines are stored, a tail waits."""
        self.fed += len(data)
        buf = self._partial[stream]
        nl = data.rfind(b"\n")
        if nl >= 0:
            if buf:
                block = bytes(buf) + data[: nl + 1]
                buf.clear()
            else:
                block = data[: nl + 1]
            self._store(_Block(self.clock(), stream, block, block.count(b"\n")))
            data = data[nl + 1:]
        buf += data
        while len(buf) > self.max_line:
            self._store(_Block(self.clock(), stream, bytes(buf[: self.max_line]) + b"\n", 1,
                               cut=True))
            del buf[: self.max_line]

    def flush(self, stream: Stream | None = None) -> None:
        """The stream ended: keep its unterminated last line."""
        names: tuple[Stream, ...] = (stream,) if stream else ("stdout", "stderr")
        for name in names:
            buf = self._partial[name]
            if buf:
                self._store(_Block(self.clock(), name, bytes(buf) + b"\n", 1))
                buf.clear()

    def _store(self, block: _Block) -> None:
        self.total += block.lines
        if block.cost > self.max_bytes:
            self._trim(block)
        self._blocks.append(block)
        self.size += block.cost
        while self.size > self.max_bytes:
            old = self._blocks.popleft()
            self.size -= old.cost
            self.dropped += old.lines

    def _trim(self, block: _Block) -> None:
        """Keep only the newest lines of a block that alone exceeds the bound (its newest
        line cut to ``max_line`` if even that one does not fit).  The cut is found by a
        binary search over byte offsets (each probe a ``bytes.count`` in C), not by
        walking the lines: a 64 KiB block of empty lines holds 65,536 of them."""
        data, before = block.data, block.lines  # data ends with b"\n"

        def cost(pos: int) -> int:  # of the lines that start at or after pos
            return len(data) - pos + LINE_OVERHEAD * data.count(b"\n", pos)

        lo, hi = 0, len(data)  # cost(hi) == 0 fits; find the smallest fitting offset
        while lo < hi:
            mid = (lo + hi) // 2
            if cost(mid) <= self.max_bytes:
                hi = mid
            else:
                lo = mid + 1
        # lines begin after a newline: move up to the next line start (or keep none)
        start = lo if lo == 0 or data[lo - 1:lo] == b"\n" else data.find(b"\n", lo) + 1
        if start >= len(data):  # not even the newest line fits: keep it cut
            last = data.rfind(b"\n", 0, len(data) - 1) + 1
            block.data, block.lines, block.cut = data[last:last + self.max_line] + b"\n", 1, True
        else:
            block.data = data[start:]
            block.lines = block.data.count(b"\n")
        self.dropped += before - block.lines

    def _lines(self, stream: Stream | None, n: int) -> Iterator[LogLine]:
        """Lines newest first, split lazily from the blocks: at most ``n`` lines are split
        out of any block (``rsplit`` with a limit), however many it holds."""
        for block in reversed(self._blocks):
            if (stream is not None and block.stream != stream) or not block.lines:
                continue
            k = min(n, block.lines)
            for raw in reversed(block.data[:-1].rsplit(b"\n", k)[-k:]):
                yield from reversed(self._cut(block, raw))

    def _cut(self, block: _Block, raw: bytes) -> list[LogLine]:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) <= self.max_line:
            return [LogLine(block.ts, block.stream, raw, block.cut)]
        pieces = [raw[i:i + self.max_line] for i in range(0, len(raw), self.max_line)]
        return [LogLine(block.ts, block.stream, p, i < len(pieces) - 1 or block.cut)
                for i, p in enumerate(pieces)]

    def tail(self, n: int, stream: Stream | None = None) -> list[LogLine]:
        """The last ``n`` lines (of one stream, or both interleaved), oldest first."""
        if n <= 0:
            return []
        out: list[LogLine] = []
        for line in self._lines(stream, n):
            out.append(line)
            if len(out) >= n:
                break
        out.reverse()
        return out

    def __len__(self) -> int:
        """Complete lines held now."""
        return sum(b.lines for b in self._blocks)
