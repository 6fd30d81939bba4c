"""The reclaim loop against cells that come and go while it scans and collects (issue 10).

A start failed under load with ``route add default via ...: ENETUNREACH``: the loop had
collected, by name, the veth of a cell being started.  Each test here stages one
interleaving of the scan (a worker thread), the pass's decision and the collection with a
cell's destroy and next start, deterministically; the real thing under load is
tests/guest/test_start_race.py.  The loop must never collect what a journaled cell owns:

* a scan overlapping a destroy sees objects whose cell is gone at the pass: a stale
  sighting, not an orphan (the names come back with the cell's next start);
* a start admitted while the pass collects (the manager holds the cell's lock from
  admission to the end of its create plan): the objects of that name are the new cell's;
* a veth between ``link add`` and the alias that names its cell has no owner in its
  alias but has one in its name.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from test_reclaimd import FakeObjects, env, run
from test_tunerd import make_cell, manifest

from agent.core.names import veth_names
from agent.core.reclaim import CollectOrphan, ReclaimConfig

__all__ = ["env"]  # the fixture, imported for use here

GRACE = ReclaimConfig().orphan_grace_s
OBJECTS = [("netns", "a", "a"), ("cgroup", "a", "a")]


def scan(rec: Any) -> list[tuple[str, str]]:
    """A pass with a scan (as after a lifecycle event); the orphans it collected."""
    rec.attach()
    rec.host.bus.emit("lifecycle", "state", cell="x", severity="info")
    return [(x.object_kind, x.name) for x in run(rec) if isinstance(x, CollectOrphan)]


def test_a_destroy_during_the_scan_leaves_no_orphan(env: Any) -> None:
    root, host, _, rec, clock, _, objs = env
    make_cell(root, host, manifest("a"))
    objs.found = list(OBJECTS)
    for _ in range(3):  # "a" runs: its objects are seen, owned, scan after scan
        assert scan(rec) == []
        clock.now += GRACE + 1

    class DestroyedMeanwhile(FakeObjects):
        def scan(self, vlan_owner: Any) -> list[tuple[str, str, str | None]]:
            out = list(self.found)  # seen before the destroy removed them ...
            host.cells.pop("a")     # ... which ends, and the cell leaves, while we scan
            self.found = []
            return out

    stale = DestroyedMeanwhile(objs.backend)
    stale.found = list(OBJECTS)
    rec.objects = stale
    assert scan(rec) == []
    assert stale.collected == []


def test_a_start_while_the_pass_collects_keeps_its_objects(env: Any) -> None:
    """Orphans of "a" (left by a crash: seen with no journaled owner for the grace period)
    are being collected when "a" is started again: the pass collects an earlier orphan in
    a thread meanwhile, the start takes the cell's lock and makes objects of the same
    names.  What the start made stays."""
    root, host, _, rec, clock, _, _ = env
    loop = rec.loop
    started = threading.Event()
    release = asyncio.Event()

    class Objects(FakeObjects):
        def collect(self, a: CollectOrphan) -> None:
            super().collect(a)
            if a.name == "vc-ghost":  # the first one: "a" is started while it runs
                loop.call_soon_threadsafe(lambda: loop.create_task(start_a()))
                started.wait(5)

    async def start_a() -> None:  # what CellManager.run does: lock, journal, create
        async with host.cell_lock("a"):
            make_cell(root, host, manifest("a"))
            started.set()
            await asyncio.sleep(0.05)  # the create plan, in a thread
        release.set()

    objs = Objects(rec.objects.backend)  # type: ignore[union-attr]
    rec.objects = objs
    objs.found = [("veth", "vc-ghost", None), *OBJECTS]
    assert scan(rec) == []  # first seen: no journaled owner
    clock.now += GRACE + 1
    assert scan(rec) == [("veth", "vc-ghost")]
    loop.run_until_complete(asyncio.wait_for(release.wait(), 5))
    assert objs.collected == [("veth", "vc-ghost")]
    assert "a" in host.cells


def test_a_veth_before_its_alias_belongs_to_its_cell(env: Any) -> None:
    root, host, _, rec, clock, _, objs = env
    make_cell(root, host, manifest("a"))
    host_side, peer = veth_names("a")
    objs.found = [("veth", host_side, "a")]
    assert scan(rec) == []  # seen with its alias
    clock.now += GRACE + 1
    objs.found = [("veth", host_side, None), ("veth", peer, None)]  # "a" started again
    assert scan(rec) == []
    clock.now += GRACE + 1
    assert scan(rec) == []
    assert objs.collected == []
    clock.now += GRACE + 1
    objs.found = [("veth", "vc-000000000000", None)]  # no cell's: collected after its grace
    assert scan(rec) == []
    clock.now += GRACE + 1
    assert scan(rec) == [("veth", "vc-000000000000")]
