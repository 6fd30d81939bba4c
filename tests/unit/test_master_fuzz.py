"""The cell manager against what the control fuzz (bench/fuzz.py) sends it."""

from __future__ import annotations

from typing import Any

import pytest
from test_master import arun, env, manager

from agent.core.errors import AgentError

__all__ = ["env"]


def test_stop_of_names_that_are_no_cell_keeps_nothing(env: dict[str, Any]) -> None:
    """``stop`` of a well-formed name that is no cell made and kept a lock for it: the
    fuzz's random names grew agentd by one asyncio.Lock each, for good."""
    async def main() -> None:
        mgr, _ = await manager(env)
        for i in range(300):
            with pytest.raises(AgentError) as exc:
                await mgr.stop(f"fz-{i}", 0, 0)
            assert exc.value.code == "E_NOT_FOUND"
        assert len(mgr._locks) == 0
        await mgr.run("demo-echo", 0, 0)
        assert (await mgr.stop("demo-echo", 0, 0))["state"] == "destroyed"
        assert set(mgr._locks) == {"demo-echo"}  # a name that was a cell: one lock

    arun(main)
