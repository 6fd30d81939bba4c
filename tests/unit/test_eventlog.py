"""agent.kernel.eventlog and agent.daemon.history: alerts and state changes kept across
restarts, bounded for flash, a torn tail ignored; the bus feeds the log through a bounded
queue drained by the loop."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from agent.core.events import Event
from agent.daemon.bus import EventBus
from agent.daemon.history import EventHistory
from agent.kernel.eventlog import EventLog


def _ev(i: int, severity: str = "notice") -> Event:
    return Event(1000.0 + i, "web", "syscall", "trap", {"i": i, "pad": "x" * 100},
                 severity, seq=i, mono=float(i), boot="b")  # type: ignore[arg-type]


def test_written_in_batches_and_read_back_after_a_restart(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.log")
    for i in range(1, 11):
        log.add(_ev(i))
    assert log.read() == []  # nothing before the batch ends
    log.flush()
    log.close()
    again = EventLog(tmp_path / "events.log")
    got = again.read()
    assert [e["seq"] for e in got] == list(range(1, 11)) and got[0]["boot"] == "b"
    assert Event.from_wire(got[-1]) == _ev(10)
    assert [e["seq"] for e in again.read(3)] == [8, 9, 10]


def test_bounded_by_two_files_newest_kept(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.log", max_bytes=16 << 10)
    for i in range(1, 1001):
        log.add(_ev(i))
        log.flush()
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert size <= 16 << 10
    seqs = [e["seq"] for e in log.read()]
    assert seqs[-1] == 1000 and seqs == sorted(seqs) and len(seqs) > 30
    assert seqs == list(range(seqs[0], 1001))  # a contiguous newest run


def test_a_torn_tail_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    log = EventLog(path)
    for i in range(1, 6):
        log.add(_ev(i))
    log.close()
    with open(path, "ab") as f:
        f.write(b"\xf7J\x01\x00\x00\x01\x00garbage")  # a record cut by a power cut
    assert [e["seq"] for e in EventLog(path).read()] == [1, 2, 3, 4, 5]


def test_a_broken_state_fs_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = EventLog(blocker / "events.log")  # its directory cannot be made
    log.add(_ev(1))
    log.flush()
    assert log.failed == 1 and log.written == 0


def test_history_keeps_persistent_events_and_serves_them(tmp_path: Path) -> None:
    async def scenario() -> list[dict[str, object]]:
        bus = EventBus(state_change_kinds=["started"])
        hist = EventHistory(bus, EventLog(tmp_path / "events.log"))
        bus.emit("lifecycle", "started", cell="web")
        bus.emit("tuner", "sample", cell="web")  # info: not persisted
        bus.emit("syscall", "trap", cell="web", severity="alert", syscall="mount")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        out = await hist.op_events_log(None, {"n": 10})  # type: ignore[arg-type]
        assert hist.status()["log_written"] == 2
        hist.close()
        return out

    got = asyncio.run(scenario())
    assert [(e["channel"], e["kind"]) for e in got] == [("lifecycle", "started"),
                                                        ("syscall", "trap")]
    assert os.path.getsize(tmp_path / "events.log") > 0
