"""Channel 1's cost: ``bench/run exec`` (in the box), or as root on any host with a
static busybox (``python3 -P bench/execbench.py``).  Prints figures, never pass/fail.

Cells are made by ``agent.kernel.spawn`` with the same image, namespaces and cgroup,
with exec protection (``ExecService.spawn``: marks at the CGROUP step, a fresh service,
so a fresh hash cache, per run) or without; runs alternate on/off, ``--runs`` of each,
medians printed.  The image is busybox and ``--files`` sealed unique copies of it.

* **fork/exec-heavy workload**: a shell forking and exec'ing sealed programs in a loop,
  ``2 * --execs`` minus ``--execs`` (the cell's start and the service's set-up cancel
  out); the ratio on/off (target: at most 1.05);
* **exec check latency**: cached, the workload's cost on minus off per exec; first, the
  extra cost of ``--files`` execs of distinct sealed files (each hashed: the first check
  of a file) over as many execs of one file (hashed once), both with protection;
* **long form of the busy benign service** (``--seconds``): the loop for that long,
  with the count of exec events raised (should be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.core.cell import State
from agent.core.manifest import Manifest, parse_manifest
from agent.core.sandbox import DEFAULT_MOUNTS, Mount, SpawnSpec, UidMap
from agent.daemon.bus import EventBus
from agent.kernel.seal import seal_tree
from agent.kernel.spawn import Spawned, spawn_cell
from agent.monitor.exec.service import ExecService
from agent.monitor.exec.settings import ExecSettings

CELL = "execbench"


@dataclass
class _Entry:
    manifest: Manifest
    pid: int | None = None
    state: State = State.RUNNING


class _Cells:
    def __init__(self, m: Manifest) -> None:
        self.cells = {CELL: _Entry(m)}


class _Backend:
    """pid -> cell from /proc/PID/cgroup: the bench's own cgroup is the cell's."""

    def __init__(self, cgroup: Path) -> None:
        self.rel = "/" + str(cgroup.relative_to(_cgroup_mount(cgroup)))

    def pid_to_cell(self, pid: int) -> str | None:
        try:
            text = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            return None
        paths = [ln.split(":", 2)[2] for ln in text.splitlines() if ln.count(":") >= 2]
        return CELL if self.rel in paths else None


def _cgroup_mount(path: Path) -> Path:
    for p in (path, *path.parents):
        if (p / "cgroup.procs").exists() and not (p.parent / "cgroup.procs").exists():
            return p
    return Path("/sys/fs/cgroup")


def make_cgroup() -> Path:
    """A cgroup for the bench's cells: v2 at the root, or v1's memory hierarchy."""
    for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")):
        if (base / "cgroup.procs").exists():
            cg = base / f"agent-execbench-{os.getpid()}"
            cg.mkdir()
            return cg
    raise SystemExit("execbench: no cgroup hierarchy found")


def make_image(base: Path, files: int) -> Path:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("execbench: needs busybox (static)")
    root = base / "img"
    for d in ("bin", "proc", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    data = Path(busybox).read_bytes()
    (root / "bin/busybox").write_bytes(data)
    (root / "bin/busybox").chmod(0o755)
    (root / "bin/sh").symlink_to("busybox")
    for i in range(files):  # unique copies: each its own hash (ELF ignores the tail)
        (root / f"bin/u{i}").write_bytes(data + b"\0" + str(i).encode())
        (root / f"bin/u{i}").chmod(0o755)
    (base / "img.seal").write_text(seal_tree(root, skip=("tmp",)).text())
    base.chmod(0o755)
    return root


async def run_cell(root: Path, cg: Path, script: str, svc: ExecService | None) -> float:
    """Seconds from spawn to exit of ``sh -c script`` in a cell."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    spec = SpawnSpec(argv=("/bin/sh", "-c", script), rootfs=str(root), hostname=CELL,
                     env=(("PATH", "/bin"),), stdout=devnull, stderr=devnull,
                     cgroup_path=str(cg), userns=UidMap(300000, 65536),
                     mounts=(*DEFAULT_MOUNTS, Mount("tmpfs", "/tmp", size=8 << 20)))
    t0 = time.perf_counter()
    try:
        cell: Spawned = await asyncio.to_thread(svc.spawn if svc else spawn_cell, spec)
    finally:
        os.close(devnull)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    loop.add_reader(cell.pidfd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(cell.pidfd)
    os.waitpid(cell.pid, 0)
    os.close(cell.pidfd)
    return time.perf_counter() - t0


def once(root: Path, cg: Path, script: str, on: bool) -> tuple[float, dict[str, Any]]:
    bus = EventBus()
    m = parse_manifest(f'name = "{CELL}"\n[service]\ncommand = "/bin/sh"\n'
                       f'[image]\nroot = "{root}"\n')
    sig = root.parent / "signatures.txt"
    svc = ExecService(bus, ExecSettings(signatures=sig, rate=1e6, burst=1e6)) if on else None

    async def go() -> float:
        if svc is None:
            return await run_cell(root, cg, script, None)
        svc.attach(_Cells(m), _Backend(cg))
        await svc.start()
        try:
            return await run_cell(root, cg, script, svc)
        finally:
            svc.close()

    secs = asyncio.run(go())
    alerts = sum(1 for e in bus.recent(channel="exec") if e.kind.startswith("exec-"))
    return secs, {**(svc.status() if svc else {}), "alerts": alerts}


def alternate(root: Path, cg: Path, script: str, runs: int) -> dict[str, Any]:
    on: list[float] = []
    off: list[float] = []
    status: dict[str, Any] = {}
    for _ in range(runs):
        off.append(once(root, cg, script, False)[0])
        t, status = once(root, cg, script, True)
        on.append(t)
    return {"on": statistics.median(on), "off": statistics.median(off), "last": status}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--execs", type=int, default=500)
    ap.add_argument("--files", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=0, help="long form: 600 = 10 minutes")
    ns = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("execbench: run as root (namespaces, cgroups, fanotify)")
    base = Path(tempfile.mkdtemp(prefix="agent-execbench-"))
    cg = make_cgroup()
    try:
        root = make_image(base, ns.files)
        def loop(n: int) -> str:
            return f"i=0; while [ $i -lt {n} ]; do /bin/busybox true; i=$((i+1)); done"

        # 2N and N execs: the difference is the workload without the cell's start and
        # the service's set-up (fixed costs, large under emulation)
        w2, w1 = alternate(root, cg, loop(2 * ns.execs), ns.runs), alternate(
            root, cg, loop(ns.execs), ns.runs)
        on, off = w2["on"] - w1["on"], w2["off"] - w1["off"]
        print(f"fork/exec workload, {ns.execs} execs (2N - N runs): on {on * 1000:.1f} ms, "
              f"off {off * 1000:.1f} ms, ratio {on / off:.3f} (target <= 1.05); whole runs "
              f"of N: on {w1['on'] * 1000:.0f} ms, off {w1['off'] * 1000:.0f} ms; last run "
              f"{w2['last']}")
        print(f"exec check latency, cached: {(on - off) / ns.execs * 1e6:.0f} us per exec "
              "(the workload's difference on - off)")
        distinct = "; ".join(f"/bin/u{i} true" for i in range(ns.files))
        same = "; ".join("/bin/u0 true" for _ in range(ns.files))
        first = alternate(root, cg, distinct, ns.runs)
        cached = alternate(root, cg, same, ns.runs)
        per = (first["on"] - cached["on"]) / ns.files * 1e6  # both on: fixed costs cancel
        print(f"exec check latency, first (hashed): {per:.0f} us per exec more than a "
              f"cached one ({ns.files} distinct files vs one file {ns.files} times)")
        if ns.seconds > 0:
            forever = "while :; do /bin/busybox true; done"
            long_loop = f"busybox timeout {int(ns.seconds)} sh -c '{forever}'; true"
            t, st = once(root, cg, long_loop, True)
            print(f"busy benign service, {t:.0f} s: {st.get('allowed', 0)} execs allowed, "
                  f"{st['alerts']} exec alerts (want 0), {st.get('errors', 0)} errors")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
