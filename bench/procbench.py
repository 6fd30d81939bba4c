"""The process channel's cost under a fork/exec loop: ``bench/run proc`` (in the box) or
``python3 bench/procbench.py`` as root on any Linux with a cgroup v2 hierarchy.  Prints
figures, never pass/fail.

A "cell" is a cgroup v2 directory of the bench's own, attributed as agentd attributes
(``/proc/PID/cgroup`` below a prefix).  The workload is a shell in that cgroup running
``--n`` (2,000) times ``/bin/true``: a fork and an exec each, the worst case of a busy
benign service.  It runs ``--rounds`` (3) times with the channel off and on, alternating;
with it on, the channel (agent.monitor.proc.service.ProcMonitor with the real proc
connector, publishing on a real agent.daemon.bus.EventBus that coalesces per cell and
kind) runs in a process of its own, whose CPU time (utime + stime) is read before and
after.  Printed, as medians:

* the workload's wall time off and on, and their ratio (the slowdown the workload sees:
  on a box with spare cores the channel runs beside it);
* the channel's CPU time as a share of the workload's wall time (target: at most 5 %):
  what the channel costs when it must share the workload's core;
* the channel's CPU per process event (fork, exec and exit: three per iteration), and
  how many of its events the bus kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.cgroup import cell_from_proc_cgroup
from agent.kernel.cgroup import read_proc_cgroup


def cgroup2_root() -> Path:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        f = line.split()
        if f[f.index("-") + 1] == "cgroup2":
            return Path(f[4])
    raise SystemExit("no cgroup v2 hierarchy mounted")


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def monitor(prefix: str) -> None:
    """The channel alone: print READY, run until SIGTERM, print its counts as JSON."""
    from agent.daemon.bus import EventBus
    from agent.monitor.proc.service import ProcMonitor

    def cell_of(pid: int) -> str | None:
        text = read_proc_cgroup(pid)
        return None if text is None else cell_from_proc_cgroup(text, prefix)

    async def run() -> dict[str, Any]:
        bus = EventBus()
        mon = ProcMonitor(bus, cell_of)
        if not await mon.start():
            raise SystemExit(f"no proc connector: {mon.problem}")
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("READY", flush=True)
        await stop.wait()
        await mon.close()
        return {**mon.status(), "published": bus.published, "kept": bus.kept}

    print(json.dumps(asyncio.run(run())), flush=True)


def workload(cg: Path, n: int) -> float:
    procs = str(cg / "cgroup.procs")

    def join() -> None:
        with open(procs, "w") as f:
            f.write("0\n")
    t0 = time.monotonic()
    subprocess.run(["/bin/sh", "-c", f"i=0; while [ $i -lt {n} ]; do /bin/true; "
                    "i=$((i+1)); done"], preexec_fn=join, check=True)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--monitor", metavar="PREFIX", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.monitor:
        monitor(ns.monitor)
        return
    root = cgroup2_root()
    top = root / f"procbench-{os.getpid()}"
    cg = top / "bench"
    cg.mkdir(parents=True)
    prefix = "/" + top.relative_to(root).as_posix()
    off: list[float] = []
    on: list[float] = []
    share: list[float] = []
    per_event: list[float] = []
    kept: list[int] = []
    try:
        workload(cg, 50)  # warm the page cache
        for _ in range(ns.rounds):
            off.append(workload(cg, ns.n))
            mon = subprocess.Popen([sys.executable, __file__, "--monitor", prefix],
                                   stdout=subprocess.PIPE, text=True)
            assert mon.stdout is not None
            if mon.stdout.readline().strip() != "READY":
                raise SystemExit("the monitor did not start")
            c0 = cpu_s(mon.pid)
            wall = workload(cg, ns.n)
            time.sleep(0.5)  # let it drain what is queued
            c1 = cpu_s(mon.pid)
            mon.send_signal(signal.SIGTERM)
            counts = json.loads(mon.stdout.readline())
            mon.wait()
            on.append(wall)
            share.append((c1 - c0) / wall)
            events = counts["fork"] + counts["exec"] + counts["exit"]
            per_event.append((c1 - c0) / max(1, events))
            kept.append(counts["kept"])
            if counts["overruns"]:
                print(f"  (a round overflowed the connector's buffer {counts['overruns']} "
                      "times)")
    finally:
        for d in (cg, top):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    med = statistics.median
    print(f"fork/exec loop: {ns.n} x /bin/true in a cgroup, {ns.rounds} rounds, "
          f"{os.cpu_count()} CPUs")
    print(f"  workload wall: off {med(off):.2f} s, on {med(on):.2f} s, "
          f"ratio on/off {med(on) / med(off):.3f}")
    print(f"  channel CPU: {100 * med(share):.1f} % of the workload's time "
          f"(target <= 5 %), {1e6 * med(per_event):.0f} us per process event")
    print(f"  events: {3 * ns.n} per round (fork, exec, exit), the bus kept "
          f"{med(kept):.0f} (a burst of 20, then 10/s per kind)")


if __name__ == "__main__":
    main()
