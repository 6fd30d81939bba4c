"""A cell's start and stop change the host's firewall tables by the same commands with
none or eight other cells running (functional: agentd's own count of the commands it
sent to nft, never a time).

The host's tables (``inet agent_host``, ``bridge agent_l2``) used to be rewritten whole at
each start and stop, so that step grew with the cells running (issue 14).  They now change
by sections (agent.core.nftsections): a cell's chains and map elements only.  The
control: the same tables made whole for the nine cells are many times that size.
"""

from __future__ import annotations

from typing import Any

from cellkit import SERVICES, clean, ctl, ps, write_manifest  # noqa: F401  (fixture)

from agent.core import firewall as fw
from agent.core import l2fw
from agent.core.firewall import CellFw


def firewall() -> dict[str, int]:
    st: dict[str, Any] = ctl("status")
    assert isinstance(st.get("firewall"), dict), st.get("firewall")
    return st["firewall"]


def cycle(name: str) -> dict[str, int]:
    """What one run and stop of ``name`` cost the host tables."""
    before = firewall()
    ctl("run", name)
    ctl("stop", name)
    after = firewall()
    return {k: after[k] - before[k] for k in ("host_runs", "host_commands", "host_whole")}


def test_a_start_and_stop_cost_the_host_tables_the_same_with_more_cells(
        clean: dict[str, Any]) -> None:  # noqa: F811
    names = ["ff-a", "ff-probe", *(f"ff-bg{i}" for i in range(8))]
    try:
        for n in names:
            write_manifest(n, ["sleep", "100000"], network={"vlan": 100 if n != "ff-a" else 101})
        ctl("run", "ff-a")  # the tables exist: the probe's cycle is a change, not a creation
        alone = cycle("ff-probe")
        for n in names[2:]:
            ctl("run", n)
        crowded = cycle("ff-probe")
        print(f"host table changes of one start and stop: alone {alone}, "
              f"with 9 cells {crowded}")
        assert alone == crowded, (alone, crowded)
        assert alone["host_whole"] == 0 and alone["host_runs"] >= 2  # in and out, by parts
        # the control: made whole, the same tables for these cells are far larger
        cells = [CellFw(n, 100, f"10.77.0.{i + 2}") for i, n in enumerate(names)]
        whole = len(fw.host_ruleset(cells, "agbr0")) + len(l2fw.l2_ruleset(cells))
        assert whole > 4 * alone["host_commands"], (whole, alone)
    finally:
        running = ps()
        for n in names:
            if n in running:
                ctl("stop", n)
            (SERVICES / f"{n}.toml").unlink(missing_ok=True)
