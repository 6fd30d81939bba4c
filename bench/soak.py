"""Soak, long form: create/pin/destroy cycles with agentd SIGKILLed at chosen points.

Run it with ``bench/run soak [-n 1000]`` (boots the box and runs this inside), or in the
box as ``python3 -P /mnt/src/bench/soak.py``.  The driver is tests/guest/soakkit.py (the
guest tier runs the short form of the same soak, tests/guest/test_soak.py).  It prints
figures; the run fails (exit 1) if the box is not exactly as before after the cycles, or
at any of the comparisons made every ``--check-every`` cycles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "guest"))

from cellkit import ensure_agentd, warm_up
from soakkit import Soak, journal_max


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--cycles", type=int, default=1000)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kill-every", type=float, default=8, help="cycles between SIGKILLs, "
                   "on average")
    p.add_argument("--check-every", type=int, default=100, help="compare the whole box "
                   "with its state before every N cycles")
    p.add_argument("--journal-max", default="96K")
    p.add_argument("--seed", type=int)
    a = p.parse_args()
    ensure_agentd()
    warm_up()
    t = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - t:7.1f} s] {line}", flush=True)

    with journal_max(a.journal_max):
        soak = Soak(a.cycles, workers=a.workers, kill_every=a.kill_every,
                    check_every=a.check_every, seed=a.seed, log=log)
        report = soak.run()
    print(f"soak: {a.cycles} cycles, {a.workers} cells, a SIGKILL every {a.kill_every:g} "
          f"cycles on average, journal_max {a.journal_max}, seed {soak.seed}")
    print("\n".join(report.lines()))
    print("json " + json.dumps(report.to_json()))
    for leak in report.leaks:
        print(leak)
    return 1 if report.leaks else 0


if __name__ == "__main__":
    sys.exit(main())
