"""The tuner's cost and speed, in the box: ``bench/run tuner`` (or, in the box,
``python3 /mnt/src/bench/tunerbench.py``).  Prints figures, never pass/fail.

* idle cost: agentd's own CPU time (utime + stime from /proc/PID/stat) over ``--idle-s``
  (60) seconds with ``--cells`` (16) idle cells, tuner and reclaim loop at their default
  settings, as a percentage of one core: while the tuner lowers the cells, and once they
  are settled at their minimum (see :func:`idle_cost`);
* burst latency: from the onset of a burst to the tuner's resize event, median and range
  over ``--bursts`` (5) bursts each of CPU (a busy loop under cpu.max at the minimum: the
  PSI trigger on cpu.pressure) and of memory (16 MiB written at once into the cell's
  tmpfs: memory.events ``high``, and the PSI trigger on memory.pressure).  The onset is
  the SIGUSR1 that starts the burst in the cell's shell (idle, it waits without CPU).  Before each
  burst the cell is pinned back to its minimum and unpinned.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

SERVICES = Path("/etc/agent/services")
PIDFILE = Path("/var/run/agentd.pid")
IMAGE = "/usr/share/agent/images/demo"


def ctl(*args: str, check: bool = True) -> Any:
    r = subprocess.run(["agentctl", "--json", *args], capture_output=True, text=True, timeout=120)
    if check and r.returncode:
        raise SystemExit(f"agentctl {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


def manifest(name: str, script: str, cpu: str = "50m", cpu_max: str = "1000m",
             mem: str = "8M", mem_max: str = "64M", tmpfs: str = "32M") -> None:
    (SERVICES / f"{name}.toml").write_text(
        f'name = "{name}"\n[service]\ncommand = "/bin/sh"\nargs = ["-c", {json.dumps(script)}]\n'
        f'[image]\nroot = "{IMAGE}"\n'
        f'[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "{tmpfs}"\n'
        f'[resources]\ncpu_min = "{cpu}"\ncpu_max = "{cpu_max}"\nmemory_min = "{mem}"\n'
        f'memory_max = "{mem_max}"\npids_max = 16\n'
        '[lifecycle]\nmode = "service"\nrestart = "no"\n')


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _agentd_cpu(seconds: float) -> tuple[float, float, int]:
    """agentd's CPU seconds over ``seconds`` of wall time, and the events it published."""
    pid = int(PIDFILE.read_text())
    hz = os.sysconf("SC_CLK_TCK")
    ev0 = ctl("status")["events"]
    before, t0 = cpu_ticks(pid), time.monotonic()
    time.sleep(seconds)
    used = (cpu_ticks(pid) - before) / hz
    wall = time.monotonic() - t0
    return used, wall, ctl("status")["events"] - ev0


def idle_cost(n: int, seconds: float) -> None:
    """Two phases, both with ``n`` idle cells: *settling*, right after start, while the
    tuner lowers them from their maximum (5 s samples, as it does for a cell that just
    started); *settled*, once every cell is at its lower bounds, the state the tuner
    reaches by itself after some minutes (each memory step waits out a 60 s rollback
    watch), reached here at once by pinning each cell to its minimum and unpinning it."""
    names = [f"tb-idle{i:02d}" for i in range(n)]
    for name in names:
        manifest(name, "while :; do sleep 3600; done", cpu="10m", cpu_max="200m",
                 mem_max="16M", tmpfs="1M")
    t = time.monotonic()
    for name in names:
        ctl("run", name)
    print(f"started {n} idle cells in {time.monotonic() - t:.1f} s")
    time.sleep(12)  # the first reclaim pass (weights) and tuner start-up are not idle
    used, wall, evs = _agentd_cpu(seconds)
    print(f"idle cost, settling: agentd used {used:.2f} s CPU in {wall:.1f} s with {n} idle "
          f"cells being lowered = {100 * used / wall:.2f} % of one core; {evs} events")
    for name in names:
        ctl("pin", name, "--cpu", "10m", "--memory", "8M")
        ctl("unpin", name)
    time.sleep(12)
    rows = ctl("top", "--once")["cells"]
    quiet = sum(1 for r in rows if r["name"] in names and r.get("sampled_every_s") is None)
    used, wall, evs = _agentd_cpu(seconds)
    print(f"idle cost, settled: agentd used {used:.2f} s CPU in {wall:.1f} s with {n} idle "
          f"cells at their minimum ({quiet} not sampled) = {100 * used / wall:.2f} % of one "
          f"core (target < 1 %); {evs} events")
    for name in names:
        ctl("stop", name, check=False)
        (SERVICES / f"{name}.toml").unlink()


def _resize_after(cell: str, t0: float, action: str, timeout: float = 10.0
                  ) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = ctl("events", "-n", "50", "--channel", "tuner", "--cell", cell, "--kind",
                  "resize")
        hits = [e for e in evs if e["ts"] >= t0 and e["attrs"]["action"] == action]
        if hits:
            hit: dict[str, Any] = hits[0]
            return hit
        time.sleep(0.05)
    return None


def bursts(kind: str, n: int) -> None:
    cell = f"tb-{kind}"
    idle = "sleep 1000 & wait $!; kill $! 2>/dev/null"  # no CPU until a signal comes
    if kind == "cpu":
        script = (f"b=0; trap 'b=1' USR1; trap 'b=0' USR2; while :; do if [ $b = 1 ]; then "
                  f"while [ $b = 1 ]; do :; done; else {idle}; fi; done")
        action, reset = "SetCpuMax", ["--cpu", "50m"]
    else:
        script = ("trap 'dd if=/dev/zero of=/tmp/blob bs=1M count=16 2>/dev/null' USR1; "
                  f"trap 'rm -f /tmp/blob' USR2; while :; do {idle}; done")
        action, reset = "SetMemoryMax", ["--memory", "8M"]
    manifest(cell, script)
    pid = ctl("run", cell)["pid"]
    lat: list[float] = []
    reasons: set[str] = set()
    for _ in range(n):
        time.sleep(1.5)
        ctl("pin", cell, *reset)
        ctl("unpin", cell)
        time.sleep(2.5)  # let pressure averages and triggers settle at the minimum
        t0 = time.time()
        os.kill(pid, signal.SIGUSR1)
        ev = _resize_after(cell, t0, action)
        os.kill(pid, signal.SIGUSR2)
        if ev is None:
            print(f"{kind} burst: no {action} within 10 s")
            continue
        lat.append(ev["ts"] - t0)
        reasons.add(ev["attrs"]["reason"])
    ctl("stop", cell, check=False)
    (SERVICES / f"{cell}.toml").unlink()
    if lat:
        print(f"{kind} burst -> {action}: median {statistics.median(lat) * 1000:.0f} ms, "
              f"min {min(lat) * 1000:.0f}, max {max(lat) * 1000:.0f} over {len(lat)} bursts "
              f"(reasons {sorted(reasons)}; trigger 150 ms in a 1 s window)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=16)
    p.add_argument("--idle-s", type=float, default=60.0)
    p.add_argument("--bursts", type=int, default=5)
    p.add_argument("--only", choices=("idle", "bursts"))
    ns = p.parse_args()
    subprocess.run(["/etc/init.d/S50agentd", "start"], capture_output=True)  # idempotent
    deadline = time.monotonic() + 60
    while subprocess.run(["agentctl", "ping"], capture_output=True).returncode:
        if time.monotonic() > deadline:
            raise SystemExit("agentd does not answer")
        time.sleep(0.5)
    if ns.only in (None, "bursts"):
        bursts("cpu", ns.bursts)
        bursts("memory", ns.bursts)
    if ns.only in (None, "idle"):
        idle_cost(ns.cells, ns.idle_s)


if __name__ == "__main__":
    main()
