"""Power cuts, long form: ``bench/run powercut [-n 20]`` (on the host: it boots the box
itself, n + 1 times, on one persistent state disk, and kills QEMU n times while agentd
writes its journal).  The driver is tests/powercut/cutkit.py; the guest tier's short form
is tests/powercut/test_powercut.py.  Prints figures; exit 1 if anything acknowledged was
lost or the journal was corrupt, or the boot-time cells did not come back.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "powercut")]

from cutkit import PowerCuts, summary  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/powercut.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--cuts", type=int, default=20)
    p.add_argument("--seed", type=int)
    p.add_argument("--keep", type=Path, help="work dir to keep (state disk, acks, checks)")
    a = p.parse_args()
    t = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - t:7.1f} s] {line}", flush=True)

    with (REPO / ".powercut-console.log").open("w") as console:
        cuts = PowerCuts(a.cuts, workdir=a.keep, seed=a.seed, log=log, console=console)
        results = cuts.run()
    print(f"powercut: {a.cuts} cuts, seed {cuts.seed}, work dir {cuts.workdir}")
    print("\n".join(summary(results, time.monotonic() - t)))
    print("json " + json.dumps([{k: v for k, v in asdict(r).items() if k != "check"}
                                for r in results]))
    bad = [p for r in results for p in r.problems]
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
