"""Whole-box memory pressure in the box: the reclaim loop's PSI trigger on
``/proc/pressure/memory`` wakes it (no periodic pass runs when nothing is pending), and the
lowest-priority cell is throttled first.  Both cells are pinned, so no resize and no
lifecycle change pokes the loop while the pressure builds: without the trigger no pass
would run at all.

The pressure is real: cell ``esc-hog`` (normal priority, pinned so that the tuner does not
raise it) rewrites a tmpfs file above its ``memory.high``.  tmpfs pages cannot be reclaimed
without swap, so every allocation over ``high`` is throttled by the kernel, and those
stalls count in the box's ``some`` pressure.  ``esc-low`` (low priority, idle) must be the
first rung: ``Throttle`` (cpu.max to its floor), and the pass that did it must have been
woken by the trigger, within seconds, with agentd's default settings (10 s ``period_s``
would otherwise be the pace only while escalated).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from cellkit import LOG, clean, ctl, sh, start, wait_for

MiB = 1 << 20


def _reclaim_events(kind: str, cell: str | None = None) -> list[dict[str, Any]]:
    args = ["events", "-n", "200", "--channel", "reclaim", "--kind", kind]
    if cell is not None:
        args += ["--cell", cell]
    evs: list[dict[str, Any]] = ctl(*args)
    return evs


def _box_avg10() -> float:
    line = open("/proc/pressure/memory").readline()
    return float(line.split("avg10=")[1].split()[0])


@pytest.mark.usefixtures(clean.__name__)
def test_box_pressure_trigger_throttles_the_lowest_priority_cell_first() -> None:
    started = [x for x in LOG.read_text().splitlines() if "reclaim passes on events" in x]
    assert started and "no box PSI" not in started[-1], started  # the trigger is armed
    t_start = time.time()
    start("esc-low", ["sh", "-c", "while :; do sleep 3600; done"],
          resources={"cpu_min": "10m", "cpu_max": "300m", "memory_min": "8M",
                     "memory_max": "16M", "pids_max": 8, "priority": "low"})
    start("esc-hog", ["sh", "-c", "sleep 2; while :; do dd if=/dev/zero of=/tmp/b bs=1M "
                      "count=30 2>/dev/null; rm -f /tmp/b; done"],
          resources={"cpu_min": "100m", "cpu_max": "1000m", "memory_min": "16M",
                     "memory_max": "32M", "pids_max": 8, "priority": "normal"},
          extra='[[writable]]\nkind = "tmpfs"\npath = "/tmp"\nsize = "32M"\n')
    ctl("pin", "esc-hog", "--memory", "24M")  # high 21 MiB: 30 MiB of tmpfs never fits
    # Pinned, esc-low is never lowered either: no tuner resize pokes the reclaim loop, so
    # only the box's PSI trigger can start the pass that throttles it.
    ctl("pin", "esc-low")
    try:
        hit = wait_for(lambda: _reclaim_events("throttle", "esc-low"),
                       "esc-low throttled under box memory pressure", timeout=120, every=0.5)
        ev = hit[0]
        assert ev["ts"] >= t_start, ev
        assert ev["attrs"]["avg10"] > 20.0, ev  # pressure_on_avg10
        # the hog (normal priority) is not touched while the low cell's rungs last
        first = min(e["ts"] for e in _reclaim_events("throttle"))
        assert first == ev["ts"]
        low = {r["name"]: r for r in ctl("top", "--once")["cells"]}["esc-low"]
        assert low["level"] in ("throttled", "frozen", "stopped"), low
    finally:
        sh("agentctl", "stop", "esc-hog", check=False)
    # relief: once the box's avg10 decays below pressure_off (5 %), the ladder goes back
    wait_for(lambda: _box_avg10() < 5.0, "box memory pressure to decay", timeout=120, every=1)
    wait_for(lambda: _reclaim_events("unthrottle", "esc-low") or
             "esc-low" not in {r["name"] for r in ctl("ps")},
             "esc-low relieved (or stopped by the last rung)", timeout=60, every=0.5)
