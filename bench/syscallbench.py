"""Channel 2's cost, in the box: ``bench/run syscall`` (or, in the box,
``python3 -P /mnt/src/bench/syscallbench.py``).  Prints figures, never pass/fail.

* **trap round trip**: a cell of the live agentd makes trapped calls, timed in the cell
  one by one: ``sethostname`` without the operation (agentd reads the notification,
  decides, answers EPERM, publishes ``syscall/trap``) and ``ptrace`` (refused and
  reported: ``syscall/denied``), next to ``getppid`` (never leaves the kernel).  Within
  the cell's burst of the trap rate limit, so the figure is the round trip, not the
  limit; median and p90 over ``--traps`` calls of each.
* **filter on vs off**: the same benign, syscall-heavy workload in two cells made by
  ``agent.kernel.spawn`` with identical namespaces, image and mounts, one with the cell
  filter (compiled for a manifest with no operations, its listener held open) and one
  without: open/read/close, a stat walk of /usr, fork/exec of a static program, socket
  creation (an argument rule: the filter runs for each call), busybox ``find``.  Runs
  alternate on/off, ``--runs`` of each; the medians and their ratio are printed (the
  target is at most 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

IMAGE = Path("/var/lib/agent-bench/pyimage")
SERVICES = Path("/etc/agent/services")

WORKLOAD = r'''
import json, os, socket, subprocess, sys, time
out = {}
def timed(name, fn):
    t = time.perf_counter(); fn(); out[name] = time.perf_counter() - t
def orc():
    for _ in range(20000):
        fd = os.open("/etc/hosts", os.O_RDONLY); os.read(fd, 256); os.close(fd)
def walk():
    for top, dirs, files in os.walk("/usr/lib/python3.11"):
        for f in files:
            try: os.stat(os.path.join(top, f))
            except OSError: pass
def forkexec():
    for _ in range(300):
        subprocess.run(["/bin/busybox", "true"])
def sockets():
    for _ in range(20000):
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
def find():
    for _ in range(3):
        subprocess.run(["/bin/busybox", "find", "/usr", "-xdev"], stdout=subprocess.DEVNULL)
for name, fn in (("open/read/close x20000", orc), ("stat walk /usr/lib/python3.11", walk),
                 ("fork/exec busybox true x300", forkexec), ("socket+close x20000", sockets),
                 ("busybox find /usr x3", find)):
    timed(name, fn)
print("RESULT " + json.dumps(out), flush=True)
'''

TRAPS = r'''
import ctypes, errno, json, os, time
libc = ctypes.CDLL("libc.so.6", use_errno=True)
libc.syscall.restype = ctypes.c_long
N = int(os.environ.get("N", "150"))
def each(nr, *args):
    times = []
    for _ in range(N):
        t = time.perf_counter_ns(); libc.syscall(nr, *args)
        times.append(time.perf_counter_ns() - t)
        time.sleep(0.004)  # under the trap rate (1000/s): the round trip, not the limit
    return times
buf = ctypes.create_string_buffer(b"x")
NR = json.loads(os.environ["NR"])
out = {"getppid": each(NR["getppid"]),
       "sethostname (trap, refused)": each(NR["sethostname"], buf, 1),
       "ptrace (denied, reported)": each(NR["ptrace"], 0, 0, 0, 0)}
print("RESULT " + json.dumps(out), flush=True)
time.sleep(100000)
'''


def py_image() -> Path:
    """A cell image holding the box's python3: hard links of /usr, /lib and /bin."""
    if (IMAGE / "usr/bin/python3").exists():
        return IMAGE
    tmp = IMAGE.with_name("pyimage.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o755)
    tmp.parent.chmod(0o755)
    for d in ("usr", "lib", "bin"):
        subprocess.run(["cp", "-al", f"/{d}", str(tmp / d)], check=True)
    for d in ("proc", "dev", "tmp", "etc", "bench"):
        (tmp / d).mkdir(exist_ok=True, mode=0o755)
    (tmp / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (tmp / "bench/workload.py").write_text(WORKLOAD)
    (tmp / "bench/traps.py").write_text(TRAPS)
    tmp.rename(IMAGE)
    return IMAGE


def _result(text: str) -> dict[str, Any]:
    line = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise SystemExit(f"no RESULT in:\n{text}")
    return dict(json.loads(line[-1].removeprefix("RESULT ")))


def run_workload(image: Path, filtered: bool) -> dict[str, float]:
    """The workload as pid 1 of a cell made by spawn_cell; with or without the filter."""
    from agent.core import seccomp as sc
    from agent.core.sandbox import DEFAULT_MOUNTS, Mount, SpawnSpec, UidMap
    from agent.kernel.spawn import spawn_cell

    r, w = os.pipe()
    prog = sc.pack(sc.compile_filter(sc.FilterSpec.for_cell([]))) if filtered else None
    spec = SpawnSpec(argv=("/usr/bin/python3", "-S", "-B", "/bench/workload.py"),
                     rootfs=str(image), env=(("PATH", "/usr/bin:/bin"),), stdout=w, stderr=w,
                     userns=UidMap(400000, 65536), seccomp=prog,
                     mounts=(*DEFAULT_MOUNTS, Mount("tmpfs", "/tmp", size=1 << 20)))
    try:
        cell = spawn_cell(spec)
    finally:
        os.close(w)
    try:
        with os.fdopen(r) as f:
            text = f.read()
        os.waitpid(cell.pid, 0)
    finally:
        os.close(cell.pidfd)
        if cell.seccomp_fd is not None:
            os.close(cell.seccomp_fd)  # held open until the end: nothing ever trapped
    return {k: float(v) for k, v in _result(text).items()}


def filter_on_off(image: Path, runs: int) -> dict[str, Any]:
    on: dict[str, list[float]] = {}
    off: dict[str, list[float]] = {}
    for i in range(runs):
        for filtered, into in ((True, on), (False, off)) if i % 2 == 0 else \
                ((False, off), (True, on)):
            for k, v in run_workload(image, filtered).items():
                into.setdefault(k, []).append(v)
        print(f"[bench] run {i + 1}/{runs} done", file=sys.stderr, flush=True)
    out = {}
    for k in on:
        a, b = statistics.median(on[k]), statistics.median(off[k])
        out[k] = {"on_s": round(a, 4), "off_s": round(b, 4), "ratio": round(a / b, 4)}
    return out


def agentctl(*args: str) -> Any:
    r = subprocess.run(["agentctl", "--json", *args], capture_output=True, text=True,
                       timeout=180)  # fmt: skip
    if r.returncode:
        raise SystemExit(f"agentctl {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


def trap_round_trip(image: Path, n: int) -> dict[str, Any]:
    """Trapped calls timed inside a cell of the live agentd."""
    from agent.core import syscalls as abi

    nrs = {k: abi.syscall_nr(k) for k in ("getppid", "sethostname", "ptrace")}
    (SERVICES / "bench-traps.toml").write_text(
        'name = "bench-traps"\n[service]\ncommand = "/usr/bin/python3"\n'
        'args = ["-S", "-B", "/bench/traps.py"]\n'
        f'env = {{ N = "{n}", NR = {json.dumps(json.dumps(nrs))} }}\n'
        f'[image]\nroot = "{image}"\n[lifecycle]\nmode = "service"\nrestart = "no"\n')
    try:
        agentctl("run", "bench-traps")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            lines = [x["line"] for x in agentctl("logs", "bench-traps", "-n", "50")["lines"]]
            if any(x.startswith("RESULT ") for x in lines):
                break
            time.sleep(2)
        res = _result("\n".join(lines))
    finally:
        subprocess.run(["agentctl", "stop", "bench-traps"], capture_output=True, timeout=180)
        (SERVICES / "bench-traps.toml").unlink(missing_ok=True)
    out = {}
    for k, times in res.items():
        us = sorted(t / 1000 for t in times)
        out[k] = {"median_us": round(statistics.median(us), 1),
                  "p90_us": round(us[int(len(us) * 0.9) - 1], 1), "n": len(us)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of the workload, on and off each")
    ap.add_argument("--traps", type=int, default=150, help="timed calls of each kind")
    ap.add_argument("--only", nargs="*", default=["traps", "workload"])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    image = py_image()
    figures: dict[str, Any] = {"load": os.getloadavg()[0]}
    if "traps" in args.only:
        print("[bench] trap round trip ...", file=sys.stderr, flush=True)
        figures["traps"] = trap_round_trip(image, args.traps)
    if "workload" in args.only:
        print("[bench] workload, filter on and off ...", file=sys.stderr, flush=True)
        figures["workload"] = filter_on_off(image, args.runs)
    print(f"\nchannel 2 (seccomp), 1-min load {figures['load']:.1f} at start")
    for k, v in figures.get("traps", {}).items():
        print(f"  {k:<30} median {v['median_us']:>9.1f} us   p90 {v['p90_us']:>9.1f} us"
              f"   ({v['n']} calls)")
    if "workload" in figures:
        print(f"\n  {'workload (median of ' + str(args.runs) + ')':<32} {'filter on':>10} "
              f"{'off':>10} {'ratio':>7}")
        for k, v in figures["workload"].items():
            print(f"  {k:<32} {v['on_s']:>9.3f}s {v['off_s']:>9.3f}s {v['ratio']:>7.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
