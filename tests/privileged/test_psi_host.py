"""PSI triggers on the host's real /proc/pressure (the host has no cgroup v2 files).

Skipped with the kernel's reason where the host cannot arm a trigger at all.
The load is a few busy processes of our own, killed at the end.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from agent.core.errors import ConfigError, KernelError
from agent.kernel.psi import UNPRIVILEGED_WINDOW_US, PsiTrigger, PsiWatcher

CPU = "/proc/pressure/cpu"


def has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


@pytest.fixture(scope="module", autouse=True)
def psi_triggers() -> None:
    try:
        PsiTrigger(CPU, 100_000, UNPRIVILEGED_WINDOW_US).close()
    except KernelError as e:
        pytest.skip(f"host cannot arm a PSI trigger on {CPU}: {e}")


@pytest.fixture
def cpu_hogs() -> Iterator[list[subprocess.Popen[bytes]]]:
    hogs: list[subprocess.Popen[bytes]] = []
    yield hogs
    for h in hogs:
        h.kill()
        h.wait()


def start_hogs(hogs: list[subprocess.Popen[bytes]]) -> float:
    n = 3 * (os.cpu_count() or 1)
    t0 = time.monotonic()
    hogs += [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    return t0


def test_watcher_wakes_the_loop_within_the_window(
        cpu_hogs: list[subprocess.Popen[bytes]]) -> None:
    async def scenario() -> tuple[float, float, list[tuple[str, str]]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, str]] = []
        first = loop.create_future()

        def cb(cell: str, res: str) -> None:
            fired.append((cell, res))
            if not first.done():
                first.set_result(time.monotonic())

        w = PsiWatcher(loop, cb)
        trig = w.add("host", "cpu", CPU, stall_us=100_000, window_us=1_000_000)
        try:
            t0 = start_hogs(cpu_hogs)
            t1 = await asyncio.wait_for(first, 10 * trig.window_us / 1e6)
            await asyncio.sleep(2.5 * trig.window_us / 1e6)  # more windows, more events
        finally:
            w.close()
        assert w.watched() == []
        return t1 - t0, trig.window_us / 1e6, fired

    latency, window, fired = asyncio.run(scenario())
    print(f"PSI cpu trigger: fired {latency * 1000:.0f} ms after the load started "
          f"(window {window:.1f} s); {len(fired)} events")
    assert latency <= window + 0.5
    assert set(fired) == {("host", "cpu")}
    assert 2 <= len(fired) <= 5  # at most one per window, and again while the stall lasts


def test_blocking_wait(cpu_hogs: list[subprocess.Popen[bytes]]) -> None:
    with PsiTrigger(CPU, 100_000, UNPRIVILEGED_WINDOW_US) as trig:
        start_hogs(cpu_hogs)
        assert trig.wait(10.0)


def test_window_rounding_without_cap_sys_resource() -> None:
    with PsiTrigger(CPU, 100_000, 1_000_000) as trig:
        assert trig.window_us == (1_000_000 if has_cap_sys_resource() else 2_000_000)
    if not has_cap_sys_resource():
        with pytest.raises(KernelError) as e:
            PsiTrigger(CPU, 100_000, 1_000_000, unprivileged_ok=False)
        assert e.value.errno == errno.EINVAL and "2 s" in (e.value.hint or "")


def test_refusals_name_the_problem() -> None:
    with pytest.raises(ConfigError):
        PsiTrigger(CPU, 0, 1_000_000)
    with pytest.raises(ConfigError):
        PsiTrigger(CPU, 100_000, 20_000_000)
    with pytest.raises(KernelError) as e:
        PsiTrigger("/proc/pressure/nonexistent", 100_000, 2_000_000)
    assert e.value.errno == errno.ENOENT and e.value.op == "open"
