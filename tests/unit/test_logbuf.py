"""agent.core.logbuf: line splitting per stream, byte bound, cut of runaway lines, and the
cost of a flood (lines are split lazily, when read)."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st

from agent.core.logbuf import LINE_OVERHEAD, LogBuffer


def test_lines_split_per_stream_and_partial_waits() -> None:
    b = LogBuffer(1024, clock=lambda: 1.0)
    b.feed("stdout", b"hel")
    b.feed("stderr", b"oops\nhalf")
    b.feed("stdout", b"lo\nworld\r\n")
    assert [(x.stream, x.text) for x in b.tail(10)] == [
        ("stderr", "oops"), ("stdout", "hello"), ("stdout", "world")]
    b.flush("stderr")
    assert b.tail(1)[0].text == "half"
    assert [x.text for x in b.tail(5, "stdout")] == ["hello", "world"]
    assert b.tail(0) == []


def test_bounded_by_bytes_oldest_dropped() -> None:
    b = LogBuffer(256)
    for i in range(100):
        b.feed("stdout", f"line {i:03d}\n".encode())
    assert b.size <= 256 and b.dropped > 0 and b.total == 100
    assert b.tail(1)[0].text == "line 099"
    assert len(b) + b.dropped == 100


def test_runaway_line_is_cut() -> None:
    b = LogBuffer(4096, max_line=100)
    b.feed("stdout", b"x" * 350)
    texts = [x.text for x in b.tail(10)]
    assert len(texts) == 3 and all(t.startswith("x" * 100) and t.endswith("[...cut]")
                                   for t in texts)
    b.flush()
    assert b.tail(1)[0].text == "x" * 50


def test_a_long_complete_line_is_cut_when_read() -> None:
    b = LogBuffer(4096, max_line=100)
    b.feed("stdout", b"y" * 250 + b"\nend\n")
    texts = [x.text for x in b.tail(10)]
    assert texts == ["y" * 100 + " [...cut]", "y" * 100 + " [...cut]", "y" * 50, "end"]


def test_a_block_larger_than_the_bound_keeps_its_newest_lines() -> None:
    b = LogBuffer(256, max_line=100)
    b.feed("stdout", b"".join(f"{i}\n".encode() for i in range(1000)))
    assert b.size <= 256 and b.total == 1000 and len(b) + b.dropped == 1000
    assert [x.text for x in b.tail(3)] == ["997", "998", "999"]
    b.feed("stdout", b"z" * 300 + b"\n")  # one line larger than the whole bound
    assert b.size <= 256 and b.tail(1)[0].text == "z" * 100 + " [...cut]"


def test_invalid_utf8_is_replaced_and_raw_bytes_are_kept() -> None:
    b = LogBuffer(1024)
    b.feed("stderr", b"\xff\xfeok\x1b[2J\n")
    line = b.tail(1)[0]
    assert line.text.endswith("ok\x1b[2J") and line.raw == b"\xff\xfeok\x1b[2J"
    assert line.to_wire(raw=True)["raw"] == b"\xff\xfeok\x1b[2J"
    assert "raw" not in line.to_wire()


def test_a_flood_of_empty_lines_costs_no_object_per_line() -> None:
    """The 2 MiB of newlines that froze agentd for seconds: fed in 64 KiB chunks, it
    must cost about as much as copying the bytes (generous bound: CI machines are
    shared; the eager version took ~137 ms per chunk, over 4 s for 2 MiB)."""
    b = LogBuffer(64 << 10)
    chunk = b"\n" * 65536
    t0 = time.process_time()
    for _ in range(32):
        b.feed("stdout", chunk)
    spent = time.process_time() - t0
    assert b.total == 32 * 65536 and b.size <= 64 << 10
    assert len(b.tail(50)) == 50
    assert spent < 1.0, f"feeding 2 MiB of newlines took {spent:.2f} s of CPU"


def _reference(data: bytes, max_line: int) -> list[bytes]:
    """Every complete line of one stream cut into max_line pieces, then the full pieces
    of the unterminated tail (the rest of it waits), oldest first."""
    out: list[bytes] = []
    *lines, partial = data.split(b"\n")
    for raw in lines:
        raw = raw.removesuffix(b"\r")
        out += [raw[i:i + max_line] for i in range(0, len(raw), max_line)] or [b""]
    full = (len(partial) - 1) // max_line if partial else 0
    return out + [partial[i * max_line:(i + 1) * max_line] for i in range(full)]


@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")), max_size=40),
       st.integers(10, 64))
def test_unbounded_tail_matches_a_plain_split(chunks: list[bytes], max_line: int) -> None:
    b = LogBuffer(1 << 20, max_line=max_line)
    for data in chunks:
        b.feed("stdout", data)
    got = [x.raw for x in b.tail(10_000)]
    assert got == _reference(b"".join(chunks), max_line)
    assert b.dropped == 0 and len(b) == b.total


@given(st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(max_size=300)),
                max_size=40), st.integers(256, 2048))
def test_size_invariant(chunks: list[tuple[str, bytes]], limit: int) -> None:
    b = LogBuffer(limit)
    for stream, data in chunks:
        b.feed(stream, data)  # type: ignore[arg-type]
    b.flush()
    assert b.size == sum(x.cost for x in b._blocks) <= limit
    assert all(x.cost >= LINE_OVERHEAD * x.lines for x in b._blocks)
    assert len(b) + b.dropped == b.total


@given(st.lists(st.binary(max_size=200), max_size=60), st.integers(256, 1024),
       st.integers(1, 80))
def test_bounded_tail_is_a_suffix_of_everything(chunks: list[bytes], limit: int,
                                                n: int) -> None:
    b = LogBuffer(limit, max_line=limit // 2)
    for data in chunks:
        b.feed("stdout", data)
    ref = LogBuffer(1 << 22, max_line=limit // 2)
    for data in chunks:
        ref.feed("stdout", data)
    everything = [x.raw for x in ref.tail(100_000)]
    got = [x.raw for x in b.tail(n)]
    assert len(got) <= n
    assert got == everything[len(everything) - len(got):]
