"""The tuner in the box: real cells, real PSI triggers and memory.events, real limits.

agentd runs with fast tuner settings (/etc/agent/tuner.toml: 1 s samples, 2 idle samples,
2 s rollback watch) so that each scenario takes seconds, not minutes; the rules are the
same.  Workloads are busybox shells writing 1 MiB files into the cell's tmpfs (tmpfs pages
are charged to the cell and cannot be reclaimed without swap), paced with usleep so that
the working set grows deterministically.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    CG,
    SERVICES,
    ctl,
    knob,
    logged,
    mem_events,
    ps,
    refused,
    restart_agentd,
    sh,
    wait_for,
    write_manifest,
)

SETTINGS = Path("/etc/agent/tuner.toml")
MiB = 1 << 20
FAST = """
[tuner]
# The scenarios follow cells up from their lower bounds (agentd's default starts a cell
# at its maximum; see docs/tuner.md); the workloads are paced so nothing races the raise.
start = "low"
sample_s = 1.0
idle_samples = 2
watch_s = 2.0
cooldown_s = 5.0
lower_span_fraction = 0.25
[reclaim]
period_s = 1.0
scan_s = 2.0
orphan_grace_s = 3.0
"""


def manifest(name: str, script: str, *, cpu: tuple[str, str] = ("100m", "500m"),
             mem: tuple[str, str] = ("8M", "48M"), tmpfs: str = "64M",
             network: bool = False) -> None:
    """A busybox shell cell with its own tmpfs /tmp (pages charged to the cell)."""
    write_manifest(name, ["-c", script], command="/bin/sh",
                   resources={"cpu_min": cpu[0], "cpu_max": cpu[1], "memory_min": mem[0],
                              "memory_max": mem[1], "pids_max": 32},
                   network={"vlan": 100, "egress": False} if network else None,
                   extra=f'[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "{tmpfs}"\n')


def grow(files: int, pause_us: int, then: str = "") -> str:
    return (f"i=0; while [ $i -lt {files} ]; do dd if=/dev/zero of=/tmp/f$i bs=1M count=1 "
            f"2>/dev/null; i=$((i+1)); usleep {pause_us}; done; echo grown; {then} "
            "while :; do sleep 1; done")


def tuner_events(cell: str, kind: str | None = None) -> list[dict[str, Any]]:
    evs = ctl("events", "-n", "1000", "--channel", "tuner", "--cell", cell)
    return [e for e in evs if kind in (None, e["kind"])]


@pytest.fixture
def fast() -> Iterator[list[str]]:
    """agentd with the fast settings; stops the test's cells and restores the defaults."""
    SETTINGS.write_text(FAST)
    restart_agentd()
    made: list[str] = []
    yield made
    for name in made:
        sh("agentctl", "stop", name, check=False)
        (SERVICES / f"{name}.toml").unlink(missing_ok=True)
    SETTINGS.unlink(missing_ok=True)
    restart_agentd()


def test_growing_cell_is_raised_to_its_maximum_and_no_further(fast: list[str]) -> None:
    # 40 MiB of files + the shell: above 42 MiB * 7/8 (memory.high at 42 MiB max), below 48
    # 1 MiB every 0.3 s: paced so that each raise (trigger window 1 s) comes before the
    # next step of the working set even on a loaded 2-core host under emulation.
    manifest("tun-grow", grow(40, 300_000), tmpfs="48M")
    fast.append("tun-grow")
    ctl("run", "tun-grow")
    assert knob("tun-grow", "memory.max") == 8 * MiB  # tuning starts at the minimum
    seen: list[tuple[int, int]] = []

    def done() -> bool:
        seen.append((knob("tun-grow", "memory.max"), mem_events("tun-grow")["oom_kill"]))
        return logged("tun-grow", "grown")

    wait_for(done, "the workload to grow to 40 MiB", timeout=120, every=0.1)
    time.sleep(3)  # a few samples more: still no further
    maxes = [m for m, _ in seen] + [knob("tun-grow", "memory.max")]
    assert maxes == sorted(maxes), "memory.max only went up"
    assert maxes[-1] == 48 * MiB and max(maxes) == 48 * MiB
    assert all(k == 0 for _, k in seen) and mem_events("tun-grow")["oom_kill"] == 0
    resizes = tuner_events("tun-grow", "resize")
    assert resizes and all(e["attrs"]["new"] <= 48 * MiB for e in resizes
                           if e["attrs"]["action"] == "SetMemoryMax")
    assert ps()["tun-grow"]["state"] == "running"
    top = sh("agentctl", "top", "--once").stdout.splitlines()
    assert all(len(x) <= 80 for x in top) and any(x.startswith("tun-grow") for x in top)
    print(f"memory.max steps: {sorted(set(m // MiB for m in maxes))} MiB; "
          f"reasons: {sorted({e['attrs']['reason'] for e in resizes})}")


def test_cpu_burst_is_answered_within_the_trigger_window(fast: list[str]) -> None:
    # Waits without using CPU (a trapped signal interrupts `wait`), then spins.
    script = ("trap 'exec sh -c \"while :; do :; done\"' USR1; "
              "while :; do sleep 1000 & wait $!; done")
    manifest("tun-burst", script, cpu=("50m", "1000m"), mem=("8M", "16M"), tmpfs="1M")
    fast.append("tun-burst")
    pid = ctl("run", "tun-burst")["pid"]
    start = tuner_events("tun-burst", "start")[0]
    assert "psi:cpu" in start["attrs"]["sources"], start
    sh("agentctl", "pin", "tun-burst", "--cpu", "50m")  # back to the minimum after start-up
    sh("agentctl", "unpin", "tun-burst")
    time.sleep(2.5)
    assert (CG / "tun-burst" / "cpu.max").read_text().split()[0] == "5000"
    t0 = time.time()
    os.kill(pid, signal.SIGUSR1)
    ev = wait_for(lambda: [e for e in tuner_events("tun-burst", "resize")
                           if e["attrs"]["action"] == "SetCpuMax" and e["ts"] >= t0],
                  "a cpu raise", timeout=10)
    latency = ev[0]["ts"] - t0
    print(f"cpu burst: first cpu.max raise {latency * 1000:.0f} ms after the burst "
          f"(trigger: 150 ms stalled in a 1 s window; reason {ev[0]['attrs']['reason']})")
    assert ev[0]["attrs"]["reason"] == "pressure"
    assert latency <= 1.0  # within one trigger window


def test_pin_and_unpin_from_agentctl(fast: list[str]) -> None:
    manifest("tun-pin", "while :; do sleep 1; done", mem=("8M", "64M"), tmpfs="1M")
    fast.append("tun-pin")
    ctl("run", "tun-pin")
    out = sh("agentctl", "pin", "tun-pin", "--cpu", "300m", "--memory", "40M").stdout
    assert "pinned" in out
    assert knob("tun-pin", "memory.max") == 40 * MiB
    assert (CG / "tun-pin" / "cpu.max").read_text().split()[0] == "30000"
    time.sleep(4)  # idle samples: a pinned cell is not lowered
    assert knob("tun-pin", "memory.max") == 40 * MiB
    assert "E_PIN_BOUNDS" in refused("pin", "tun-pin", "--memory", "1G")
    sh("agentctl", "unpin", "tun-pin")
    wait_for(lambda: knob("tun-pin", "memory.max") < 40 * MiB, "the unpinned cell to shrink",
             timeout=30)
    kinds = [e["kind"] for e in tuner_events("tun-pin")]
    assert "pin" in kinds and "unpin" in kinds
