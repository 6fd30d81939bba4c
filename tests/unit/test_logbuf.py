"""agent.logbuf: line splitting per stream, byte bound, cut of runaway lines."""

from __future__ import annotations

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


def test_invalid_utf8_is_replaced() -> None:
    b = LogBuffer(1024)
    b.feed("stderr", b"\xff\xfeok\n")
    assert b.tail(1)[0].text.endswith("ok")


@given(st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.binary(max_size=300)),
                max_size=40), st.integers(256, 2048))
def test_size_invariant(chunks: list[tuple[str, bytes]], limit: int) -> None:
    b = LogBuffer(limit)
    for stream, data in chunks:
        b.feed(stream, data)  # type: ignore[arg-type]
    b.flush()
    assert b.size == sum(x.cost for x in b.lines) <= limit
    assert all(x.cost >= LINE_OVERHEAD for x in b.lines)
