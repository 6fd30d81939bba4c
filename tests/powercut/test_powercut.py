"""A power cut, short form (issue 10): the box, its state dir on a persistent disk, is
cut off (QEMU killed) while agentd writes its journal, then booted again.

The journal must replay to its last complete record and hold every fact agentd had
acknowledged before the cut (cells running with their pid 1, cells stopped, pins); at
the next boot agentd must come up, the boot-time cells must run again and nothing of the
other cells of the cut boot may be left (cgroups, netns pins, the journal's cells, leases,
plans).  tests/powercut/cutkit.py has the details; the long form (20 cuts) is
``bench/run powercut``; docs/reliability.md has the figures.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from cutkit import PowerCuts, summary

REPO = Path(__file__).resolve().parents[2]


def test_a_power_cut_loses_nothing_acknowledged_and_the_boot_cells_come_back() -> None:
    t = time.monotonic()
    with (REPO / ".powercut-console.log").open("w") as console:
        cuts = PowerCuts(1, log=print, console=console)
        try:
            results = cuts.run()
        finally:
            if os.environ.get("AGENT_KEEP_POWERCUT") != "1":
                shutil.rmtree(cuts.workdir, ignore_errors=True)
    print(f"seed {cuts.seed}")
    print("\n".join(summary(results, time.monotonic() - t)))
    assert len(results) == 1 and results[0].check, "the second boot was not checked"
    assert results[0].facts > 0 and results[0].records > 0
    assert [p for r in results for p in r.problems] == []
