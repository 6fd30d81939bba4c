"""After a power cut the journal says the cells ran, but their processes are gone: the
restarted manager adopts and destroys them, and the boot's S60agent-cells asks for the
boot-time cells again at once.  A ``run`` of a cell on its way out waits for it to be gone
and starts it anew (it answered E_EXISTS, and the boot-time cell then vanished).

The manager runs against the recording fakes of test_master; the host-side power-cut test
(tests/powercut) does it for real."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from test_master import arun, env, manager, until

from agent.core.cell import State
from agent.core.errors import AgentError

__all__ = ["env"]  # the fixture


def test_run_after_a_power_cut_waits_for_the_old_cell_and_starts_it_again(
        env: dict[str, Any]) -> None:
    async def main() -> None:
        mgr, _ = await manager(env)
        await mgr.run("demo-web", 0, 0)
        assert mgr.journal is not None
        mgr.journal.journal.abandon()
        k = env["kernel"]
        k.procs.clear()  # the power went: no process survives, the rest is re-made anew
        k.leaves.clear()
        k.netns.clear()
        k.links.clear()
        k.gateways.clear()
        mgr2, _ = await manager(env)  # adoption: processes gone, so stop and destroy
        assert mgr2.cells["demo-web"].state in (State.STOPPING, State.DESTROYING,
                                                State.DESTROYED)
        out = await mgr2.run("demo-web", 0, 0)  # what S60agent-cells asks at once
        assert out["state"] == "running" and mgr2.cells["demo-web"].state is State.RUNNING
        assert "demo-web" in k.leaves and k.procs["demo-web"]
        with pytest.raises(AgentError) as ei:  # a running one is still E_EXISTS
            await mgr2.run("demo-web", 0, 0)
        assert ei.value.code == "E_EXISTS"
        await mgr2.stop("demo-web", 0, 0)

    arun(main)


def test_run_while_a_stop_is_under_way_waits_for_it(env: dict[str, Any]) -> None:
    """The same for an operator's stop (there the per-name lock already serializes)."""
    async def main() -> None:
        mgr, fake = await manager(env)
        await mgr.run("demo-web", 0, 0)
        gate = threading.Event()  # the destroy plan waits in its worker thread
        real = fake.destroy_link

        def slow(cell: str) -> None:
            gate.wait(10)
            real(cell)
        fake.destroy_link = slow  # type: ignore[method-assign]
        stop = asyncio.get_running_loop().create_task(mgr.stop("demo-web", 0, 0))
        await until(lambda: mgr.cells["demo-web"].state is State.DESTROYING)
        run = asyncio.get_running_loop().create_task(mgr.run("demo-web", 0, 0))
        await asyncio.sleep(0.2)
        assert not run.done()  # waiting for the old cell, not E_EXISTS
        gate.set()
        assert (await stop)["state"] == "destroyed"
        out = await run
        assert out["state"] == "running" and out["pid"] == 1001
        await mgr.stop("demo-web", 0, 0)
        assert env["kernel"].cells() == ({}, {}, set(), {})

    arun(main)
