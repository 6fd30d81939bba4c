"""The process channel on the host's real proc connector (root only).

A "cell" here is a cgroup v2 directory of our own (``<unified>/proc-test-N/web``), its
processes attributed by ``/proc/PID/cgroup`` exactly as agentd's backend does; the process
that joins it is a child of the test (as a cell's set-up child is agentd's), moved into
the cgroup before it execs.  Everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.cgroup import cell_from_proc_cgroup
from agent.core.errors import KernelError
from agent.kernel.cgroup import read_proc_cgroup
from agent.monitor.proc.adapter import ProcReader, close_connector, open_connector
from agent.monitor.proc.rules import tree_order
from agent.monitor.proc.service import ProcMonitor


def unified_root() -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        sep = f.index("-")
        if f[sep + 1] == "cgroup2":
            return Path(f[4])
    return None


@pytest.fixture
def cgroup() -> Iterator[tuple[Path, str]]:
    root = unified_root()
    if root is None:
        pytest.skip("no cgroup v2 hierarchy mounted on the host")
    try:
        close_connector(open_connector())
    except KernelError as exc:
        pytest.skip(f"no proc connector: {exc}")
    top = root / f"proc-test-{os.getpid()}"
    (top / "web").mkdir(parents=True)
    prefix = "/" + top.relative_to(root).as_posix()
    own = Path("/proc/self/cgroup").read_text()
    # the unified line of our own cgroup: paths below it are what /proc/PID/cgroup shows
    base = next(x[3:] for x in own.splitlines() if x.startswith("0::"))
    if base != "/":
        pytest.skip("the test runs in a cgroup v2 namespace or sub-tree")
    yield top, prefix
    for d in (top / "web", top):
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


class Bus:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None, str, dict[str, Any]]] = []

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: str = "info", **attrs: Any) -> object:
        self.events.append((channel, kind, cell, severity, attrs))
        return None


def cell_of(prefix: str):  # type: ignore[no-untyped-def]
    def look(pid: int) -> str | None:
        text = read_proc_cgroup(pid)
        return None if text is None else cell_from_proc_cgroup(text, prefix)
    return look


SCRIPT = ("i=0; while [ $i -lt 3 ]; do /bin/true; i=$((i+1)); done; "
          "(sleep 0.2; exit 4) & wait; exit 3")


def spawn_in(cg: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    procs = str(cg / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write("0\n")
    return subprocess.Popen(argv, preexec_fn=join)


def test_a_cells_forks_execs_and_exits_are_events_of_that_cell(
        cgroup: tuple[Path, str]) -> None:
    top, prefix = cgroup

    async def scenario() -> tuple[Bus, int, ProcMonitor]:
        bus = Bus()
        mon = ProcMonitor(bus, cell_of(prefix))
        assert await mon.start()
        try:
            outsider = subprocess.Popen(["/bin/sh", "-c", "/bin/true; exit 5"])
            p = spawn_in(top / "web", ["/bin/sh", "-c", SCRIPT])
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                if p.poll() is not None and outsider.poll() is not None and any(
                        e[1] == "exit" and e[4]["hpid"] == p.pid for e in bus.events):
                    break
            assert p.returncode == 3
            return bus, p.pid, mon
        finally:
            await mon.close()

    bus, pid, mon = asyncio.run(scenario())
    assert mon.sock is None  # closed
    assert all(e[0] == "proc" and e[2] == "web" and e[3] == "info" for e in bus.events), \
        bus.events  # the outsider (a host process) made none
    kinds = [e[1] for e in bus.events]
    kinds = [e[1] for e in bus.events]
    assert bus.events[0][1] == "exec" and bus.events[0][4]["hpid"] == pid  # the cell starts
    assert kinds.count("fork") == 5 and kinds.count("exec") == 5  # 3 x true, (...), sleep
    # lookups happen when a message is read: a short-lived process may be gone by then,
    # so what it ran may be unknown (""); its parent never is (the cache keeps it)
    trues = [e[4] for e in bus.events if e[1] == "exec" and e[4]["ppid"] == pid]
    assert len(trues) == 3 and all(t["comm"] in ("true", "") for t in trues)
    exits = {e[4]["hpid"]: e[4] for e in bus.events if e[1] == "exit"}
    assert exits[pid]["code"] == 3 and exits[pid]["signal"] == 0
    assert any(x["code"] == 4 for x in exits.values())  # the subshell
    forks = [e[4] for e in bus.events if e[1] == "fork"]
    assert all(f["comm"] and f["exe"] for f in forks)
    assert mon.tracker.cells() == {}  # every process exited: nothing cached for the cell
    assert mon.counts["overruns"] == 0


def test_the_tree_of_a_live_cell_from_proc(cgroup: tuple[Path, str]) -> None:
    top, prefix = cgroup
    p = spawn_in(top / "web", ["/bin/sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        reader = ProcReader(cell_of(prefix))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until both children have exec'd sleep
            pids = [int(x) for x in (top / "web" / "cgroup.procs").read_text().split()]
            if sorted(r["comm"] for r in reader.tree_rows(pids, 64)[0]) == [
                    "sh", "sleep", "sleep"]:
                break
            time.sleep(0.05)
        assert all(reader.cell_of(h) == "web" for h in pids)
        assert reader.cell_of(os.getpid()) is None
        rows, more = reader.tree_rows(pids, 64)
        tree = tree_order(rows)
        assert not more and [r["depth"] for r in tree] == [0, 1, 1]
        assert tree[0]["hpid"] == p.pid and tree[0]["comm"] == "sh"
        assert [r["comm"] for r in tree[1:]] == ["sleep", "sleep"]
        assert all(r["ppid"] == p.pid and r["uid"] == 0 for r in tree[1:])
        rows, more = reader.tree_rows(pids, 2)
        assert more and len(rows) == 2
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(p.pid)], check=False)
        p.kill()
        p.wait()
