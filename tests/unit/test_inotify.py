"""agent.kernel.inotify on the host's real kernel, in a temporary directory (no root):
a file written in place, a file renamed in, nothing when nothing happened, the watch
gone with its directory; and the parser on crafted buffers."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest

from agent.core.errors import KernelError
from agent.kernel import inotify as ino

MASK = ino.IN_CLOSE_WRITE | ino.IN_MOVED_TO | ino.IN_ONLYDIR


def test_close_write_and_moved_to_are_reported_with_their_names(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    d = tmp_path / "drop"
    d.mkdir()
    with ino.Inotify() as n:
        wd = n.add_watch(d, MASK)
        assert n.read() == []  # non-blocking: nothing yet
        (d / "a.bundle").write_bytes(b"x")  # written in place: closed after writing
        (other / ".tmp").write_bytes(b"y")
        os.rename(other / ".tmp", d / "a.bundle.sig")  # renamed in
        with open(d / "a.bundle", "rb") as f:  # a read-only open is no event
            f.read()
        got = n.read()
    assert [(e.wd, e.name) for e in got] == [(wd, "a.bundle"), (wd, "a.bundle.sig")]
    assert got[0].mask & ino.IN_CLOSE_WRITE and got[1].mask & ino.IN_MOVED_TO
    assert not any(e.overflow for e in got)


def test_the_fd_wakes_the_loop(tmp_path: Path) -> None:
    async def scenario() -> list[str]:
        loop = asyncio.get_running_loop()
        woke: asyncio.Future[list[str]] = loop.create_future()
        with ino.Inotify() as n:
            n.add_watch(tmp_path, MASK)

            def wake() -> None:
                if not woke.done():
                    woke.set_result([e.name for e in n.read()])

            loop.add_reader(n.fileno(), wake)
            loop.call_later(0.01, (tmp_path / "x.bundle").write_bytes, b"1")
            try:
                return await asyncio.wait_for(woke, 10)
            finally:
                loop.remove_reader(n.fileno())

    assert asyncio.run(scenario()) == ["x.bundle"]


def test_a_removed_directory_ends_its_watch(tmp_path: Path) -> None:
    d = tmp_path / "gone"
    d.mkdir()
    with ino.Inotify() as n:
        wd = n.add_watch(d, MASK | ino.IN_DELETE_SELF)
        d.rmdir()
        masks = [e.mask for e in n.read() if e.wd == wd]
        assert any(m & ino.IN_DELETE_SELF for m in masks)
        assert any(m & ino.IN_IGNORED for m in masks)
        n.rm_watch(wd)  # already gone: not an error


def test_errors_name_the_call_and_the_path(tmp_path: Path) -> None:
    with ino.Inotify() as n:
        with pytest.raises(KernelError) as e:
            n.add_watch(tmp_path / "missing", MASK)
        assert "inotify_add_watch" in e.value.message and "missing" in e.value.message
        assert e.value.hint and "does not exist" in e.value.hint
        (tmp_path / "file").write_text("")
        with pytest.raises(KernelError, match="ENOTDIR"):
            n.add_watch(tmp_path / "file", MASK)  # IN_ONLYDIR
    closed = ino.Inotify()
    closed.close()
    closed.close()
    with pytest.raises(ValueError):
        closed.fileno()


def _raw(wd: int, mask: int, cookie: int, name: bytes, pad: int) -> bytes:
    body = name + b"\0" * pad if name or pad else b""
    return struct.pack("iIII", wd, mask, cookie, len(body)) + body


def test_parse_events() -> None:
    buf = (_raw(1, ino.IN_MOVED_TO, 7, b"a.bundle", 8) + _raw(-1, ino.IN_Q_OVERFLOW, 0, b"", 0)
           + _raw(2, ino.IN_CLOSE_WRITE, 0, "é.sig".encode(), 2))
    got = ino.parse_events(buf)
    assert [(e.wd, e.cookie, e.name) for e in got] == [(1, 7, "a.bundle"), (-1, 0, ""),
                                                       (2, 0, "é.sig")]
    assert got[1].overflow and not got[0].overflow
    assert ino.parse_events(b"") == []
    with pytest.raises(ValueError, match="runs past"):
        ino.parse_events(_raw(1, 0, 0, b"abc", 1)[:-2])
    with pytest.raises(ValueError, match="stray"):
        ino.parse_events(_raw(1, 0, 0, b"", 0) + b"\0\0")
