"""The reclaim loop in the box: orphans left by a killed agentd are collected.

agentd is killed with SIGKILL while a networked cell runs; its journal is removed, so the
next agentd knows nothing of the cell: its cgroup leaf (with live processes), pinned
netns, veth on the bridge and VLAN gateway are orphans.  The reclaim loop (fast settings:
1 s passes, 3 s grace) must collect all of them, and say so in ``reclaim`` events.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cellkit import JOURNAL, ctl, kill9_agentd, leftovers, restart_agentd, sh, wait_for
from test_tuner_box import fast, manifest

__all__ = ["fast"]  # the fixture, imported for use here

# What the orphans of a cell are made of (cellkit.leftovers has more: the journal, removed
# here on purpose, and the run dir and mounts, which this scenario does not check).
KERNEL_OBJECTS = ("cgroups", "links", "vlans", "netns")


def kernel_objects() -> dict[str, Any]:
    return {k: v for k, v in leftovers().items() if k in KERNEL_OBJECTS}


def test_orphans_of_a_killed_agentd_are_collected(fast: list[str]) -> None:
    before = kernel_objects()
    manifest("rec-orphan", "while :; do sleep 1; done", mem=("8M", "16M"), tmpfs="1M",
             network=True)
    fast.append("rec-orphan")
    pid = ctl("run", "rec-orphan")["pid"]
    during = kernel_objects()
    assert "rec-orphan" in during["cgroups"] and "cell-rec-orphan" in during["netns"]
    assert len(during["links"]) > len(before["links"])  # the veth and the VLAN gateway
    kill9_agentd()
    JOURNAL.unlink()
    t0 = time.monotonic()
    restart_agentd()
    assert ctl("ps") == []  # the new agentd knows nothing of the cell
    wait_for(lambda: kernel_objects() == before, "the orphans to be collected", timeout=60,
             every=0.5)
    took = time.monotonic() - t0
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
        f"/proc/{pid}/stat").read_text().split()[2]  # the cell's processes were killed
    evs = ctl("events", "-n", "200", "--channel", "reclaim", "--kind", "collectorphan")
    kinds = {e["attrs"]["object_kind"] for e in evs}
    # The VLAN gateway goes too: by the reclaim loop, or already when agentd started
    # (a gateway no journaled cell holds is removed at start: master._drop_unheld_gateways).
    at_start = ctl("events", "-n", "200", "--channel", "master", "--kind", "gateway-collected")
    assert {"cgroup", "netns", "veth"} <= kinds, evs
    assert "vlan" in kinds or at_start, (evs, at_start)
    summary = [e for e in ctl("events", "-n", "200", "--channel", "reclaim", "--kind", "pass")
               if e["attrs"]["orphans"]]
    assert summary
    print(f"orphans collected {took:.1f} s after the restart: "
          f"{sorted((e['attrs']['object_kind'], e['attrs']['name']) for e in evs)}")
    sh("agentctl", "stop", "rec-orphan", check=False)
