"""Channel 2 across an agentd restart (issue 11): a cell's trapped syscalls keep reaching
a master.  The listener keeper holds a copy of every cell's seccomp listener, so while
agentd is dead a trapped call waits in the kernel (it does not fail ENOSYS), and the next
agentd answers it.  The same cell is granted ``reboot``: the master runs init's
``reboot`` for it (a stand-in on agentd's PATH, set through /etc/default/agentd, so the
box stays up), and that too works after the restart.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cellkit import (
    call,
    clean,
    kill9_agentd,
    logs,
    py_image,
    restart_agentd,
    sh,
    start_probe,
    up,
    wait_for,
)
from test_attacks_syscall import NRS, SYSCALL

__all__ = ["clean"]

WORK = Path("/var/lib/agent-tests")
FAKEBIN = WORK / "fakebin"
MARK = WORK / "rebooted"
DEFAULT = Path("/etc/default/agentd")
WAITER = NRS + SYSCALL + r'''
result({"round": -1})
n = 0
while True:  # one round of trapped calls for each /probes/go-<n> the host makes
    if os.path.exists(f"/probes/go-{n}"):
        h = sc(NR["sethostname"], b"x", 1)
        b = sc(NR["reboot"], 0xfee1dead, 672274793, 0x01234567, 0)
        result({"round": n, "hostname": h, "reboot": b, "t": time.time()})
        n += 1
    time.sleep(0.2)
'''


def _round(n: int) -> dict[str, Any] | None:
    for line in reversed(logs("sc-restart")):
        if line.startswith("RESULT "):
            r = json.loads(line.removeprefix("RESULT "))
            if r["round"] == n:
                return dict(r)
    return None


def _go(n: int) -> None:
    (Path(py_image()) / "probes" / f"go-{n}").write_text("")


def test_traps_reach_the_next_agentd_and_a_granted_reboot_runs_init(
        clean: dict[str, Any]) -> None:  # fmt: skip
    saved = DEFAULT.read_text() if DEFAULT.exists() else None
    FAKEBIN.mkdir(parents=True, exist_ok=True)
    (FAKEBIN / "reboot").write_text(f'#!/bin/sh\necho "reboot $*" >> {MARK}\n')
    (FAKEBIN / "reboot").chmod(0o755)
    MARK.unlink(missing_ok=True)
    for n in range(2):
        (Path(py_image()) / "probes" / f"go-{n}").unlink(missing_ok=True)
    DEFAULT.write_text((saved or "") + f'\nPATH="{FAKEBIN}:$PATH"; export PATH\n')
    try:
        restart_agentd()
        start_probe("sc-restart", WAITER, extra='[privileges]\nops = ["reboot"]\n')
        _go(0)
        r0 = wait_for(lambda: _round(0), "round 0", timeout=60)
        assert (r0["hostname"], r0["reboot"]) == ("EPERM", "ok"), r0
        wait_for(lambda: MARK.exists() and MARK.read_text().count("reboot") == 1,
                 "the master to run reboot")
        # agentd dies; the cell traps meanwhile: the call must wait, not fail ENOSYS
        kill9_agentd()
        _go(1)
        time.sleep(3)
        restarted = time.time()
        sh("/etc/init.d/S50agentd", "start")
        wait_for(up, "agentd restarted", timeout=120)
        r1 = wait_for(lambda: _round(1), "round 1, answered by the new agentd", timeout=120)
        assert (r1["hostname"], r1["reboot"]) == ("EPERM", "ok"), r1
        assert r1["t"] >= restarted - 1  # it waited for the new master
        wait_for(lambda: MARK.read_text().count("reboot") == 2, "reboot run again")
        evs = call("events", n=100, cell="sc-restart")
        kinds = [(e["channel"], e["kind"]) for e in evs]
        assert ("master", "listener-lost") not in kinds, kinds
        traps = [e["attrs"] for e in evs if (e["channel"], e["kind"]) == ("syscall", "trap")]
        assert {(t["syscall"], t["verdict"]) for t in traps} == {("sethostname", "denied"),
                                                               ("reboot", "allowed")}, traps
        status = call("status")["syscall"]
        assert status["keeper"] is True and status["listeners"] >= 1, status
    finally:
        if saved is None:
            DEFAULT.unlink(missing_ok=True)
        else:
            DEFAULT.write_text(saved)
        restart_agentd()
