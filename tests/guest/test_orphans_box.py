"""The reclaim loop in the box collects orphan mounts and nftables tables, end to end.

With agentd's fast settings (test_tuner_box's ``fast``: 1 s passes, 2 s scans, 3 s grace)
a networked cell ``orph-owned`` runs; then, as a crashed create or a host-side helper
would leave them, the test makes in the box's host namespaces:

* a table ``inet agent_cell_orph-ghost`` and a tmpfs on ``/run/agent/cells/orph-ghost/usb``
  for a cell the journal has never heard of: the running agentd's loop must collect both
  (the table deleted, the tmpfs unmounted and its empty mount point removed) and say so
  in ``reclaim``/``collectorphan`` events;
* the same for ``orph-owned``: kept, as is agentd's own ``inet agent_host`` table.

Afterwards the box is exactly as before (cellkit.leftovers: mounts, ruleset, run dirs...).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from cellkit import RUN_CELLS, ctl, diff, leftovers, ps, sh, wait_for, warm_up
from test_tuner_box import fast, manifest

from agent.kernel.nft import Nft
from agent.kernel.orphans import host_cell_table

__all__ = ["fast"]  # the fixture, imported for use here

GHOST, OWNED = "orph-ghost", "orph-owned"


def tables() -> set[tuple[str, str]]:
    out = sh("nft", "-j", "list", "tables").stdout
    return {(t["table"]["family"], t["table"]["name"])
            for t in json.loads(out)["nftables"] if "table" in t}


def mounted(point: Path) -> bool:
    return any(line.split()[4] == str(point)
               for line in Path("/proc/self/mountinfo").read_text().splitlines())


def collected() -> set[tuple[str, str]]:
    evs = ctl("events", "-n", "500", "--channel", "reclaim", "--kind", "collectorphan")
    return {(e["attrs"]["object_kind"], e["attrs"]["name"]) for e in evs}


def make(cell: str) -> tuple[str, Path]:
    table, point = host_cell_table(cell), RUN_CELLS / cell / "usb"
    Nft().apply([{"add": {"table": {"family": "inet", "name": table}}}])
    point.mkdir(parents=True, exist_ok=True)
    sh("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(point))
    return table, point


def unmake(cell: str) -> None:
    table, point = host_cell_table(cell), RUN_CELLS / cell / "usb"
    Nft().delete_table(table)
    while mounted(point):
        sh("umount", "-l", str(point))
    with contextlib.suppress(FileNotFoundError):
        point.rmdir()


def test_orphan_table_and_mount_are_collected_and_owned_ones_kept(fast: list[str]) -> None:
    warm_up()
    before = leftovers()
    manifest(OWNED, "while :; do sleep 1; done", mem=("8M", "16M"), tmpfs="1M", network=True)
    fast.append(OWNED)
    ctl("run", OWNED)
    try:
        owned_table, owned_point = make(OWNED)
        t0 = time.monotonic()
        ghost_table, ghost_point = make(GHOST)
        assert {("inet", ghost_table), ("inet", owned_table), ("inet", "agent_host")} \
            <= tables()
        wait_for(lambda: ("inet", ghost_table) not in tables() and not mounted(ghost_point),
                 "the ghost's table and mount to be collected", timeout=60, every=0.5)
        took = time.monotonic() - t0
        assert not ghost_point.exists()  # the empty mount point went too
        assert (RUN_CELLS / GHOST).is_dir()  # ... and only it
        events = collected()
        assert {("nftables", ghost_table), ("mount", str(ghost_point))} <= events, events
        # two more scans after the grace: the owned cell's objects and agentd's table stay
        time.sleep(2 * 2.0 + 1.0)
        assert {("inet", owned_table), ("inet", "agent_host")} <= tables()
        assert mounted(owned_point) and ps()[OWNED]["state"] == "running"
        assert not {o for o in collected() if OWNED in o[1]}, collected()
        print(f"ghost table and mount collected {took:.1f} s after they appeared "
              "(grace 3 s, scans every 2 s)")
    finally:
        for cell in (OWNED, GHOST):
            unmake(cell)
        with contextlib.suppress(OSError):
            (RUN_CELLS / GHOST).rmdir()
        sh("agentctl", "stop", OWNED, check=False)
        wait_for(lambda: OWNED not in ps(), f"{OWNED} to be destroyed")
    after = leftovers()
    assert after == before, "left behind:\n" + diff(before, after)

