"""agent.monitor.proc.service on a loop, fed by a packet socket pair standing in for the
connector (the real one: tests/privileged/test_proc_connector_host.py): bounded work per
wake-up, an overflow clears the cache with one notice, a connector that cannot be had is
one ``master/monitor-failed`` and no crash."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from pathlib import Path
from typing import Any

from agent.core.errors import KernelError
from agent.kernel.nlsock import McastSocket, Read
from agent.monitor.proc.rules import EXEC, EXIT, FORK, parse
from agent.monitor.proc.service import SLICE, ProcMonitor


def datagram(what: int, data: bytes) -> bytes:
    """One message of the connector (the layout is tested in test_proc_rules)."""
    ev = struct.pack("=IIQ", what, 0, 0) + data
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(ev), 0) + ev
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def fork(ppid: int, pid: int) -> bytes:
    return datagram(FORK, struct.pack("=IIII", ppid, ppid, pid, pid))


def exec_(pid: int) -> bytes:
    return datagram(EXEC, struct.pack("=II", pid, pid))


def exit_(pid: int) -> bytes:
    return datagram(EXIT, struct.pack("=IIiiII", pid, pid, 0, 17, 1, 1))


class Bus:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None, str, dict[str, Any]]] = []

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: str = "info", **attrs: Any) -> object:
        self.events.append((channel, kind, cell, severity, attrs))
        return None


def fake_proc(tmp: Path, pids: range, cell: str) -> dict[int, str | None]:
    for hpid in pids:
        d = tmp / str(hpid)
        d.mkdir()
        (d / "status").write_text(f"Name:\tsh\nPPid:\t{pids[0]}\nUid:\t0\t0\t0\t0\n"
                                  f"NSpid:\t{hpid}\t{hpid - pids[0] + 1}\n")
    return {hpid: cell for hpid in pids}


def test_a_wake_up_reads_one_slice_and_the_loop_comes_back_for_the_rest(
        tmp_path: Path) -> None:
    cells = fake_proc(tmp_path, range(2000, 2300), "web")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)

    async def scenario() -> tuple[Bus, ProcMonitor, list[int]]:
        bus = Bus()
        mon = ProcMonitor(bus, cells.get, proc=tmp_path, self_pid=1,
                          opener=lambda: McastSocket(a, "fake"))
        assert await mon.start()
        sent = 0
        for hpid in range(2001, 2300):
            try:
                b.send(fork(2000, hpid))
            except BlockingIOError:  # the pair's buffer is full: enough for two slices
                break
            sent += 1
        assert sent > 2 * SLICE
        mon._on_readable()  # one wake-up, as the loop makes it
        after_one = [len(bus.events)]
        for _ in range(100):
            await asyncio.sleep(0)
            if mon.counts["messages"] == sent:
                break
        after_one.append(len(bus.events))
        after_one.append(sent)
        await mon.close()
        return bus, mon, after_one

    bus, mon, seen = asyncio.run(scenario())
    assert seen[0] == SLICE  # the first wake-up: one slice, then back to the loop
    assert seen[1] == seen[2] and mon.counts["wakeups"] >= seen[2] // SLICE
    assert all(e[:4] == ("proc", "fork", "web", "info") for e in bus.events)
    assert bus.events[0][4]["ppid"] is None and bus.events[1][4]["ppid"] is None
    b.close()


def test_an_overflow_clears_the_cache_and_says_so_once(tmp_path: Path) -> None:
    cells = fake_proc(tmp_path, range(100, 103), "web")
    bus = Bus()
    mon = ProcMonitor(bus, cells.get, proc=tmp_path, self_pid=1)
    [m] = parse(exec_(100))
    mon.tracker.handle(m)
    assert len(mon.tracker) == 1

    class Overflowing(McastSocket):
        def read(self, max_datagrams: int) -> Read:
            self.lost += 1
            return Read([exit_(101)], True, False)

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mon.sock = Overflowing(a, "fake")
    mon._on_readable()
    assert len(mon.tracker) == 0 and mon.tracker.counts["resets"] == 1
    assert [e[:4] for e in bus.events] == [("proc", "lost", None, "notice")]
    assert mon.status()["lost"] == 1 and mon.status()["overruns"] == 1
    a.close()
    b.close()


def test_no_connector_is_one_event_and_the_daemon_goes_on() -> None:
    def refuse() -> McastSocket:
        raise KernelError("bind", "proc connector", errno.EPERM, "needs root")

    async def scenario() -> tuple[bool, Bus, ProcMonitor]:
        bus = Bus()
        mon = ProcMonitor(bus, lambda pid: None, opener=refuse)
        ok = await mon.start()
        await mon.close()
        return ok, bus, mon

    ok, bus, mon = asyncio.run(scenario())
    assert not ok and mon.status()["running"] is False and mon.problem
    [(channel, kind, cell, sev, attrs)] = bus.events
    assert (channel, kind, cell, sev) == ("master", "monitor-failed", None, "notice")
    assert attrs["monitor"] == "proc" and attrs["hint"] == "needs root"
