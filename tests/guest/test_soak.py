"""Soak, short form (issue 10): 24 create/pin/destroy cycles on three cells while agentd
is killed with SIGKILL every three cycles or so, at points chosen from the journal as it
is written (a step of a create or destroy plan, a pin, a compaction, a lease record, a
random moment: each kind once before any comes again); the journal is small (96 KiB) so
that compactions are frequent.  (24 cycles, not 100: the guest tier's time; a kill and
the restart after it cost more than a cycle.  ``bench/run soak -n 100`` runs 100.)

After each kill the restarted agentd must have adopted every cell that was running (same
pid 1) and repaired every plan that was open; at the end the box (interfaces, bridge VLAN
entries, addresses, cgroups, mounts, netns pins, run dirs, nftables objects, the
journal's cells, leases and plans) must be exactly as before.  The long form is
``bench/run soak`` (1,000 cycles); docs/reliability.md has the figures of both.
"""

from __future__ import annotations

from typing import Any

from soakkit import Soak, journal_max, quiet_box

__all__ = ["quiet_box"]

CYCLES = 24


def test_cycles_with_agentd_killed_at_chosen_points_leave_the_box_as_before(
        quiet_box: dict[str, Any]) -> None:
    with journal_max("96K"):
        soak = Soak(CYCLES, workers=3, kill_every=3, log=print)
        report = soak.run()
    print(f"seed {soak.seed}")
    print("\n".join(report.lines()))
    assert report.cycles == CYCLES
    assert sum(report.kills.values()) >= 3  # the kills happened (4 in the runs so far)
    assert report.compactions > 0
    assert report.leaks == [], "\n\n".join(report.leaks)
