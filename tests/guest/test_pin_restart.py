"""An operator's pin outlives agentd: kill -9, restart, and the adopted cell is still
pinned at the same size (the pin is journaled with the cell: agent.master.keep_pin)."""

from __future__ import annotations

import pytest
from cellkit import CG, clean, ctl, kill9_and_restart, start, top_rows, wait_for


@pytest.mark.usefixtures(clean.__name__)
def test_a_pin_survives_a_killed_agentd() -> None:
    name = "pin-keep"
    start(name, ["sh", "-c", "while :; do sleep 3600; done"],
          resources={"cpu_min": "10m", "cpu_max": "500m", "memory_min": "8M",
                     "memory_max": "48M", "pids_max": 8})
    ctl("pin", name, "--cpu", "120m", "--memory", "20M")
    kill9_and_restart()
    row = wait_for(lambda: (r := top_rows().get(name)) is not None and r.get("tuned") and r,
                   "the adopted cell to be tuned again", timeout=90)
    assert row["pinned"] and row["memory_max"] == 20 << 20 and row["cpu_max"] == 120, row
    assert (CG / name / "memory.max").read_text().strip() == str(20 << 20)
    assert (CG / name / "cpu.max").read_text().split()[0] == "12000"
    ctl("unpin", name)
    kill9_and_restart()
    row = wait_for(lambda: (r := top_rows().get(name)) is not None and r.get("tuned") and r,
                   "the adopted cell to be tuned again", timeout=90)
    assert not row["pinned"], row
