"""The cell manager when its journal cannot take a record (docs/reliability.md).

Two ways to be full: the journal's own bound (``journal_max``: new cells are refused early
with E_JOURNAL_FULL, existing ones can still be stopped in the room kept for them) and a
full file system under the state dir (every write to the journal fails with ENOSPC: a
request is refused with E_JOURNAL_FULL, nothing is done that the journal does not record,
and once there is room the journal catches up with memory).  agentd keeps serving reads
throughout, and a restart finds everything that was acknowledged.

The manager runs against the recording fakes of test_master (cgroup, net, spawner); the
journal is the real one, on a real file.  The full file system is a fault injected on
``os.write``/``os.fdatasync`` for descriptors of files in the state dir only; the box
tier does it for real (tests/guest/test_soak_faults.py).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_master import arun, env, manager

from agent.core.cell import State
from agent.core.errors import AgentError
from agent.core.plan import recover
from agent.kernel.journal import read_journal

__all__ = ["env"]  # the fixture


class FullDisk:
    """ENOSPC for writes (and fdatasync) to files under ``root`` while ``full``."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.full = False
        self.refused = 0
        self._write = os.write
        self._fdatasync = os.fdatasync

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.root)
        except OSError:
            return False

    def write(self, fd: int, data: Any) -> int:
        if self.full and self._ours(fd):
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._write(fd, data)

    def fdatasync(self, fd: int) -> None:
        if self.full and self._ours(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._fdatasync(fd)


@pytest.fixture
def disk(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    d = FullDisk(env["cfg"].state_dir)
    monkeypatch.setattr(os, "write", d.write)
    monkeypatch.setattr(os, "fdatasync", d.fdatasync)
    yield d


def journaled(env: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """Each journaled cell's state, and the open plans, as a restart would read them."""
    from agent.core.cellrecord import replay

    recs = read_journal(env["cfg"].state_dir / "agent.journal").records
    cells = {n: str(d["cell"]["state"]) for n, d in replay(recs).cells.items()}
    return cells, sorted(p.target for p in recover(recs))


def test_a_full_file_system_refuses_requests_and_loses_nothing(
        env: dict[str, Any], disk: FullDisk) -> None:
    async def main() -> None:
        mgr, _ = await manager(env)
        k = env["kernel"]
        await mgr.run("demo-web", 0, 0)  # acknowledged: running
        free, leases = mgr.budget.free, mgr.pool.leases()
        calls = len(k.calls)
        disk.full = True

        with pytest.raises(AgentError) as ei:  # a new cell: refused, nothing held
            await mgr.run("demo-client", 0, 0)
        assert ei.value.code == "E_JOURNAL_FULL" and "df " in (ei.value.hint or "")
        assert len(k.calls) == calls and "demo-client" not in mgr.cells
        assert mgr.budget.free == free and mgr.pool.leases() == leases

        with pytest.raises(AgentError) as ei:  # a pin: refused, not applied
            mgr.keep_pin("demo-web", {"cpu": 100, "memory_high": 8 << 20,
                                      "memory_max": 9 << 20})
        assert ei.value.code == "E_JOURNAL_FULL" and mgr.cells["demo-web"].pin is None

        # reads keep working
        assert mgr.cells["demo-web"].state is State.RUNNING
        assert mgr.journal is not None and mgr.journal.replay()

        # a stop: the service is stopped, but the destroy cannot be journaled, so it is
        # not done: the cell keeps its kernel objects, FAILED, and the reply says why
        with pytest.raises(AgentError) as ei:
            await mgr.stop("demo-web", 0, 0)
        assert "E_JOURNAL_FULL" in str(ei.value)
        assert "demo-web" in k.leaves and "demo-web" in k.netns and "demo-web" in k.links
        assert mgr.cells["demo-web"].state is State.FAILED
        assert [e.kind for e in env["bus"].recent(None, kind="journal-failed")]
        assert disk.refused > 0
        # the journal holds what was acknowledged, no more: demo-web running, no plan open
        assert journaled(env) == ({"demo-web": "running"}, [])

        disk.full = False  # room again: the same stop finishes, the journal catches up
        assert (await mgr.stop("demo-web", 0, 0))["state"] == "destroyed"
        assert k.cells() == ({}, {}, set(), {}) and mgr.cells == {}
        assert journaled(env) == ({}, [])
        assert mgr.journal.journal.stats.rewrites >= 1
        await mgr.run("demo-client", 0, 0)
        await mgr.stop("demo-client", 0, 0)
        assert k.cells() == ({}, {}, set(), {})

    arun(main)


def test_a_restart_on_a_full_file_system_adopts_and_serves(
        env: dict[str, Any], disk: FullDisk) -> None:
    """agentd killed and restarted while the disk is full: it still adopts what runs
    (reads only), serves, and refuses what it cannot journal."""
    async def main() -> None:
        mgr, _ = await manager(env)
        await mgr.run("demo-web", 0, 0)
        assert mgr.journal is not None
        mgr.journal.journal.abandon()  # kill -9
        disk.full = True
        mgr2, fake2 = await manager(env)  # the start's compaction fails: not fatal
        assert mgr2.cells["demo-web"].state is State.RUNNING
        assert fake2.adopted == [("demo-web", 1000)]
        with pytest.raises(AgentError) as ei:
            await mgr2.run("demo-client", 0, 0)
        assert ei.value.code == "E_JOURNAL_FULL"
        disk.full = False
        await mgr2.stop("demo-web", 0, 0)
        assert env["kernel"].cells() == ({}, {}, set(), {})

    arun(main)


def test_the_journal_bound_refuses_new_cells_and_keeps_room_to_stop_them(
        env: dict[str, Any]) -> None:
    names = [f"small-{i}" for i in range(40)]
    for n in names:
        (env["cfg"].services_dir / f"{n}.toml").write_text(
            f'name = "{n}"\n[service]\ncommand = "/bin/busybox"\nargs = ["sleep", "99"]\n'
            '[image]\nroot = "/usr/share/agent/images/demo"\n'
            '[network]\nvlan = "auto"\n[resources]\nmemory_max = "8M"\n')
    env["cfg"] = replace(env["cfg"], journal_max_bytes=64 << 10)

    async def main() -> None:
        mgr, _ = await manager(env)
        path = env["cfg"].state_dir / "agent.journal"
        running: list[str] = []
        refusal = None
        for n in names:
            try:
                await mgr.run(n, 0, 0)
            except AgentError as exc:
                refusal = exc
                break
            running.append(n)
            assert path.stat().st_size <= 64 << 10
        assert refusal is not None and refusal.code == "E_JOURNAL_FULL", refusal
        assert "journal_max" in (refusal.hint or "") and len(running) >= 3, running
        print(f"{len(running)} cells admitted")
        assert n not in mgr.cells and n not in env["kernel"].leaves
        # every running cell can still be pinned, stopped and started again, many times
        for round_ in range(3):
            for r in running:
                mgr.keep_pin(r, {"cpu": 100 + round_, "memory_high": 7 << 20,
                                 "memory_max": 8 << 20})
            await asyncio.gather(*(mgr.stop(r, 0, 0) for r in running))
            assert path.stat().st_size <= 64 << 10
            for r in running:
                await mgr.run(r, 0, 0)
        assert mgr.journal is not None and mgr.journal.journal.stats.compactions > 3
        mgr.journal.journal.abandon()  # and a restart finds them all
        mgr2, _ = await manager(env)
        assert sorted(mgr2.cells) == sorted(running)
        assert {e.state for e in mgr2.cells.values()} == {State.RUNNING}
        await asyncio.gather(*(mgr2.stop(r, 0, 0) for r in running))
        assert env["kernel"].cells() == ({}, {}, set(), {})

    arun(main)
