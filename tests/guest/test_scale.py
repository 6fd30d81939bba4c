"""Scale (issue 3, Checks): 20 cells on 20 VLANs at once; 200 create/destroy cycles leave
nothing behind (interfaces, bridge VLAN entries, cgroups, root-ns mounts, netns pins,
run dirs, the nftables ruleset, live cells/leases/open plans in the journal).

The cycles go through agent.client in this process (the same requests agentctl sends;
starting a python per request would measure the box's interpreter start-up instead).
"""

from __future__ import annotations

import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cellkit import CG, call, clean, diff, leftovers, ps, stop_all, write_manifest

__all__ = ["clean"]

HTTPD = ["httpd", "-f", "-p", "8080", "-h", "/www"]
CYCLES = 200
WORKERS = 4


def http_get(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}:8080/", timeout=10) as r:
        return str(r.read().decode())


def test_twenty_cells_on_twenty_vlans(clean: dict[str, Any]) -> None:
    names = [f"scale-{v}" for v in range(101, 121)]
    for name, vlan in zip(names, range(101, 121), strict=True):
        write_manifest(name, HTTPD, uid=1000, network={"vlan": vlan},
                       resources={"memory_max": "8M", "pids_max": 4})
    t = time.monotonic()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(lambda n: call("run", name=n), names))
    started = time.monotonic() - t
    rows = ps()
    assert sorted(rows) == sorted(names)
    assert {r["state"] for r in rows.values()} == {"running"}
    assert sorted(r["vlan"] for r in rows.values()) == list(range(101, 121))
    for name in names:  # each answers through its own VLAN's gateway on the host
        assert (CG / name).is_dir()
        assert "hello" in http_get(rows[name]["address"]), name
    t = time.monotonic()
    stop_all(parallel=WORKERS)  # one cell per VLAN: each stop is its VLAN's last
    print(f"20 cells: started in {started:.1f} s, stopped in {time.monotonic() - t:.1f} s")
    assert ps() == {}


def test_200_create_destroy_cycles_leave_nothing_behind(clean: dict[str, Any]) -> None:
    for w in range(WORKERS):
        write_manifest(f"cycle-{w}", ["sleep", "100000"], network={"vlan": "auto"},
                       resources={"memory_max": "8M", "pids_max": 4})

    def worker(w: int) -> list[float]:
        took = []
        for _ in range(CYCLES // WORKERS):
            t = time.monotonic()
            assert call("run", name=f"cycle-{w}")["state"] == "running"
            assert call("stop", name=f"cycle-{w}")["state"] == "destroyed"
            took.append(time.monotonic() - t)
        return took

    t = time.monotonic()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        cycles = [x for xs in pool.map(worker, range(WORKERS)) for x in xs]
    total = time.monotonic() - t
    cycles.sort()
    print(f"{len(cycles)} create+destroy cycles ({WORKERS} at once) in {total:.1f} s: "
          f"{len(cycles) / total:.2f}/s, per cycle median {cycles[len(cycles) // 2]:.2f} s, "
          f"p90 {cycles[int(len(cycles) * 0.9)]:.2f} s")
    assert len(cycles) == CYCLES
    after = leftovers()
    assert after == clean, "left behind:\n" + diff(clean, after)


def test_concurrent_stops_on_one_vlan_leave_nothing_behind(clean: dict[str, Any]) -> None:
    for n in ("samevlan-a", "samevlan-b"):
        write_manifest(n, ["sleep", "100000"], network={"vlan": 160},
                       resources={"memory_max": "8M", "pids_max": 4})
        call("run", name=n)
    stop_all(parallel=2)
    after = leftovers()
    if after != clean:  # leave the box clean for the next test, then report
        call("run", name="samevlan-a")
        call("stop", name="samevlan-a")
    assert after == clean, "left behind:\n" + diff(clean, after)
