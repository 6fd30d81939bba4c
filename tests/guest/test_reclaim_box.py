"""The reclaim loop in the box: orphans left by a killed agentd are collected.

agentd is killed with SIGKILL while a networked cell runs; its journal is removed, so the
next agentd knows nothing of the cell: its cgroup leaf (with live processes), pinned
netns, veth on the bridge and VLAN gateway are orphans.  The reclaim loop (fast settings:
1 s passes, 3 s grace) must collect all of them, and say so in ``reclaim`` events.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from test_tuner_box import CG, ctl, fast, manifest, restart_agentd, sh, wait_for

NETNS = Path("/run/netns")
PIDFILE = Path("/var/run/agentd.pid")
JOURNAL = Path("/var/lib/agent/agent.journal")

__all__ = ["fast"]  # the fixture, imported for use here


def leftovers() -> dict[str, Any]:
    vlans = json.loads(subprocess.run(["bridge", "-j", "vlan", "show"], capture_output=True,
                                      text=True).stdout or "[]")
    return {"cgroups": sorted(p.name for p in CG.iterdir() if p.is_dir()),
            "links": sorted(p.name for p in Path("/sys/class/net").iterdir()),
            "vlans": vlans,
            "netns": sorted(p.name for p in NETNS.iterdir()) if NETNS.exists() else []}


def test_orphans_of_a_killed_agentd_are_collected(fast: list[str]) -> None:
    before = leftovers()
    manifest("rec-orphan", "while :; do sleep 1; done", mem=("8M", "16M"), tmpfs="1M",
             network=True)
    fast.append("rec-orphan")
    pid = ctl("run", "rec-orphan")["pid"]
    during = leftovers()
    assert "rec-orphan" in during["cgroups"] and "cell-rec-orphan" in during["netns"]
    assert len(during["links"]) > len(before["links"])  # the veth and the VLAN gateway
    daemon = int(PIDFILE.read_text().strip())
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{daemon}").exists()
             or "Z" in Path(f"/proc/{daemon}/stat").read_text().split()[2], "agentd to die")
    JOURNAL.unlink()
    t0 = time.monotonic()
    restart_agentd()
    assert ctl("ps") == []  # the new agentd knows nothing of the cell
    wait_for(lambda: leftovers() == before, "the orphans to be collected", timeout=60,
             step=0.5)
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
