"""PSI triggers on a real cgroup v2 leaf in the box: a memory hog squeezed by a tight
memory.high stalls, and the trigger wakes the loop within its window.

Works in a cgroup subtree of its own (cellkit's ``cg``: ``/sys/fs/cgroup/agt-<hex>``) and
removes it; fails with the kernel's reason where PSI is off (``psi=1`` missing on a
CONFIG_PSI_DEFAULT_DISABLED kernel).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cellkit import cgroup_v2_subtree

from agent.core.cgroup import Limits
from agent.core.errors import KernelError
from agent.kernel.cgroupv2 import CgroupV2
from agent.kernel.psi import PsiTrigger, PsiWatcher

__all__ = ["cgroup_v2_subtree"]  # the fixture ``cg``, imported for use here

MiB = 1 << 20
WINDOW_US = 1_000_000
HOG = """
import sys, time
cur = open(sys.argv[1] + "/memory.current")
high = int(open(sys.argv[1] + "/memory.high").read())
sys.stdin.readline()
chunks, step = [], 1 << 20
ones = b"\\1" * (step // 4096)
said = False
while True:
    for c in chunks:                     # keep touching the working set (C speed)
        c[::4096] = ones
    if len(chunks) < 32:
        c = bytearray(step)
        c[::4096] = ones                 # charge the pages (calloc'd pages are not yet)
        chunks.append(c)
    if not said:
        cur.seek(0)
        if int(cur.read()) > high:       # now above memory.high: the kernel throttles
            print("over", time.monotonic(), flush=True)
            said = True
"""


def need_trigger(pressure: Path) -> None:
    """A PSI trigger can be armed on ``pressure`` here, or the test fails saying why."""
    try:
        PsiTrigger(str(pressure), 150_000, WINDOW_US).close()
    except KernelError as e:
        pytest.fail(f"no PSI trigger on a cgroup here: {e}")


def test_memory_trigger_fires_within_the_window(cg: CgroupV2) -> None:
    leaf = cg.create("hog")
    need_trigger(leaf / "memory.pressure")
    # The hog wants 32 MiB; memory.high at 16 MiB throttles it hard (no OOM: max is 96 MiB).
    cg.set_limits("hog", Limits(memory_high=16 * MiB, memory_max=96 * MiB))

    async def scenario() -> tuple[float, list[tuple[str, str]]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, str]] = []
        first = loop.create_future()

        def cb(cell: str, res: str) -> None:
            fired.append((cell, res))
            if not first.done():
                first.set_result(time.monotonic())

        w = PsiWatcher(loop, cb)
        w.add("hog", "memory", str(leaf / "memory.pressure"), 150_000, WINDOW_US)
        proc = subprocess.Popen([sys.executable, "-c", HOG, str(leaf)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            cg.add_proc("hog", proc.pid)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = await asyncio.wait_for(loop.run_in_executor(None, proc.stdout.readline), 60)
            over = float(line.split()[1])  # the hog has just passed memory.high
            when = await asyncio.wait_for(first, 30)
        finally:
            proc.kill()
            proc.wait()
            w.close()
        return when - over, fired

    latency, fired = asyncio.run(scenario())
    events = dict(ln.split() for ln in (leaf / "memory.events").read_text().splitlines())
    print(f"PSI memory trigger on {leaf.name}: fired {latency * 1000:.0f} ms after the hog "
          f"passed memory.high (window {WINDOW_US / 1e6:.1f} s); memory.events {events}")
    assert fired and set(fired) == {("hog", "memory")}
    assert int(events["high"]) > 0 and int(events["oom_kill"]) == 0
    assert latency <= WINDOW_US / 1e6


def test_removed_cgroup_drops_its_trigger(cg: CgroupV2) -> None:
    leaf = cg.create("short")
    need_trigger(leaf / "cpu.pressure")

    async def scenario() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        fired: list[tuple[str, str]] = []
        gone: list[tuple[str, str]] = []
        loop = asyncio.get_running_loop()
        w = PsiWatcher(loop, lambda c, r: fired.append((c, r)),
                       lambda c, r: gone.append((c, r)))
        w.add("short", "cpu", str(leaf / "cpu.pressure"), 150_000, WINDOW_US)
        cg.remove("short")
        for _ in range(20):
            await asyncio.sleep(0.1)
            if gone:
                break
        watched = w.watched()
        w.close()
        assert watched == []
        return fired, gone

    fired, gone = asyncio.run(scenario())
    assert gone == [("short", "cpu")] and fired == []
    assert not os.path.exists(leaf)
