"""A full state disk, and the journal's own bound reached (issue 10): agentd keeps serving,
refuses what it cannot record with E_JOURNAL_FULL, and loses nothing it acknowledged,
across a kill -9 too.  docs/reliability.md has the figures.

* Full disk: agentd's state dir is a small tmpfs (mounted over /var/lib/agent while
  agentd is stopped), filled by a file until the kernel says ENOSPC.  A cell that ran
  before stays running and readable; new cells and pins are refused (nothing of them is
  left in the kernel, and a refused pin is not applied); agentd killed and restarted
  while the disk is still full comes up, adopts the cell with its last acknowledged pin,
  and serves.  Once there is room, everything works again and nothing is left behind.
* The bound: ``journal_max`` so small that only a few cells fit.  More are refused
  (E_JOURNAL_FULL, the hint names journal_max) before anything is held; the ones admitted
  can be pinned, stopped and started again, many times, without a refusal, and the file
  never passes the bound; a kill -9 and restart finds them all.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cellkit import (
    CG,
    JOURNAL,
    NETNS,
    kill9_agentd,
    log_tail,
    sh,
    wait_for,
    write_manifest,
)
from soakkit import call, journal_max, ps, quiet_box, start_agentd, stop_agentd

__all__ = ["quiet_box"]

STATE = JOURNAL.parent
FILLER = STATE / "filler"


@contextlib.contextmanager
def state_on_tmpfs(size: str) -> Iterator[None]:
    """agentd with its state dir on a fresh tmpfs of ``size``; the real one after."""
    stop_agentd()
    sh("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "agent-state", str(STATE))
    try:
        start_agentd()
        yield
    finally:
        stop_agentd()
        sh("umount", str(STATE))
        start_agentd()


def fill() -> int:
    """Write a file until the file system is full; the bytes written."""
    n = 0
    with FILLER.open("wb", buffering=0) as f:
        for chunk in (65536, 4096, 512, 1):
            try:
                while True:
                    n += f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return n


def agentctl(*args: str) -> tuple[int, str]:
    """``agentctl --json ARGS``: exit status and output (a loaded box may take minutes)."""
    r = sh("agentctl", "--json", "--timeout", "600", *args, check=False, timeout=900)
    return r.returncode, r.stdout + r.stderr


def ok(*args: str) -> Any:
    rc, out = agentctl(*args)
    assert rc == 0, f"agentctl {' '.join(args)} exited {rc}: {out}\n{log_tail()}"
    return json.loads(out)


def journal_status() -> dict[str, Any]:
    return dict(call("status")["journal"])


def objects(name: str) -> dict[str, bool]:
    return {"cgroup": (CG / name).exists(), "netns": (NETNS / f"cell-{name}").exists()}


def test_a_full_state_disk_refuses_what_it_cannot_record_and_loses_nothing(
        quiet_box: dict[str, Any]) -> None:
    a, b = "full-a", "full-b"
    for n in (a, b):
        write_manifest(n, ["sleep", "100000"], network={"vlan": "auto"},
                       resources={"cpu_max": "500m", "memory_max": "32M", "pids_max": 8})
    with state_on_tmpfs("512k"):
        row = ok("run", a)
        pid = row["pid"]
        pinned = ok("pin", a, "--cpu", "200m", "--memory", "20M")  # acknowledged
        filled = fill()
        pid_agentd = int(Path("/var/run/agentd.pid").read_text())

        # pins are refused once the journal's last page is used up; a refused pin is not
        # applied: the cgroup keeps the last acknowledged one
        refusals: list[str] = []
        for cpu in range(210, 300, 10):
            rc, out = agentctl("pin", a, "--cpu", f"{cpu}m", "--memory", "20M")
            if rc == 0:
                pinned = json.loads(out)
                continue
            assert "E_JOURNAL_FULL" in out and "No space left" in out, out
            refusals.append(out)
            break
        assert refusals, "no pin was refused on a full disk"
        assert (CG / a / "cpu.max").read_text().split()[0] == str(pinned["cpu_max"] * 100)

        # a new cell: refused before anything is made
        rc, out = agentctl("run", b)
        assert rc == 1 and "E_JOURNAL_FULL" in out and "df " in out, out
        assert objects(b) == {"cgroup": False, "netns": False} and b not in ps()

        # reads are served, by the same agentd
        assert ps()[a]["state"] == "running" and ps()[a]["pid"] == pid
        assert call("inspect", name=a)["name"] == a
        st = journal_status()
        assert st["refused"] >= 2, st
        assert int(Path("/var/run/agentd.pid").read_text()) == pid_agentd

        # killed and restarted while still full: it comes up, adopts, keeps the pin
        kill9_agentd()
        start_agentd()
        row = ps()[a]
        assert row["state"] == "running" and row["pid"] == pid, row
        top = wait_for(lambda: (r := {x["name"]: x for x in call("top")["cells"]}.get(a))
                       and r.get("tuned") and r, "the adopted cell to be tuned", timeout=90)
        assert top["pinned"] and top["cpu_max"] == pinned["cpu_max"], (top, pinned)
        rc, out = agentctl("run", b)
        assert rc == 1 and "E_JOURNAL_FULL" in out, out

        # room again: everything works, the journal catches up
        FILLER.unlink()
        ok("run", b)
        ok("stop", b)
        sh("agentctl", "stop", a, check=False, timeout=120)  # FAILED if refused before
        if a in ps():
            ok("stop", a)
        assert ps() == {} and objects(a) == objects(b) == {"cgroup": False, "netns": False}
        print(f"full disk: {filled} bytes of filler; {len(refusals)} pin and 2 run "
              f"requests refused with E_JOURNAL_FULL; journal {journal_status()}")


def test_the_journal_bound_refuses_new_cells_and_keeps_room_for_the_others(
        quiet_box: dict[str, Any]) -> None:
    names = [f"bound-{i}" for i in range(8)]
    for n in names:
        write_manifest(n, ["sleep", "100000"], network={"vlan": "auto"},
                       resources={"cpu_max": "500m", "memory_max": "32M", "pids_max": 8})
    size = 80 << 10
    with journal_max("80K"):
        admitted: list[str] = []
        refusal = ""
        for n in names:
            rc, out = agentctl("run", n)
            if rc:
                refusal = out
                break
            admitted.append(n)
            assert JOURNAL.stat().st_size <= size
        assert "E_JOURNAL_FULL" in refusal and "journal_max" in refusal, refusal
        assert len(admitted) >= 2, (admitted, refusal)
        refused = names[len(admitted)]
        assert objects(refused) == {"cgroup": False, "netns": False}
        for round_ in range(2):  # what was admitted can change, go and come back
            for n in admitted:
                ok("pin", n, "--cpu", f"{100 + round_ * 10}m", "--memory", "16M")
                assert JOURNAL.stat().st_size <= size
            with ThreadPoolExecutor(len(admitted)) as pool:  # all their plans at once
                list(pool.map(lambda n: ok("stop", n), admitted))
            for n in admitted:
                ok("run", n)
                assert JOURNAL.stat().st_size <= size
        pids = {n: ps()[n]["pid"] for n in admitted}
        kill9_agentd()
        start_agentd()
        rows = ps()
        assert {n: rows[n]["pid"] for n in admitted} == pids, (rows, log_tail())
        st = journal_status()
        assert st["max_bytes"] == size and st["size"] <= size and st["compactions"] >= 1
        for n in admitted:
            ok("stop", n)
        print(f"journal bound {size} bytes: {len(admitted)} cells admitted, the next refused "
              f"(E_JOURNAL_FULL); 2 rounds of pin/stop/run of all of them without a refusal; "
              f"all adopted after kill -9")
    assert os.path.exists(JOURNAL)
