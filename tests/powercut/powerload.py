"""The box's side of the power-cut test (tests/powercut/cutkit.py drives it from the host).

Runs in the box, its state dir on the persistent state disk (``qemu/box --state-disk``):

``load --boot N``
    start the boot-time cells (/etc/init.d/S60agent-cells, as the firmware's init does),
    then cycle three cells (run, pin, sometimes unpin, a pause, stop) until the power is
    cut.  Every request is written to ``/mnt/host/acks-N.jsonl`` twice: when it is sent
    (``sent``) and when agentd has answered (``ok`` or ``err``, with the reply).  The
    share is 9p without a cache: a line is on the host when ``write`` returns, so the host
    knows exactly what agentd had acknowledged when the power went.
``check --boot N``
    after a power cut: wait for agentd (it replayed the journal at its start), start the
    boot-time cells, wait until the cells of the last boot are gone and the boot-time ones
    run, and write what was found to ``/mnt/host/check-N.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guest"))

from cellkit import call, journal_live, leftovers, sh, wait_for, write_manifest

HOST = Path("/mnt/host")
BOOT_CELLS = ("demo-web", "demo-client")  # /etc/default/agent-cells
CELLS = ("pc-0", "pc-1", "pc-2")


def _read_acks(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except (OSError, ValueError):
        return []


def runs_in_flight(acks: list[dict[str, Any]]) -> set[str]:
    """As cutkit.runs_in_flight (which needs the host's qemu/ to import)."""
    last = {a["cell"]: a for a in acks if a.get("cell")}
    return {c for c, a in last.items() if a["op"] == "run" and a["phase"] == "sent"}


def _ready() -> bool:
    try:
        return isinstance(call("status").get("budget"), dict)
    except Exception:
        return False


class Acks:
    """One JSON line per event, one ``write`` each, on the 9p share."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lock = threading.Lock()

    def put(self, **rec: Any) -> None:
        line = (json.dumps({"t": time.time(), **rec}) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)


def request(acks: Acks, cell: str, op: str, **args: Any) -> Any:
    acks.put(cell=cell, op=op, phase="sent", args=args)
    try:
        reply = call(op, name=cell, **args)
    except Exception as exc:
        acks.put(cell=cell, op=op, phase="err", error=str(exc))
        raise
    acks.put(cell=cell, op=op, phase="ok", reply=reply)
    return reply


def worker(acks: Acks, cell: str, rng: random.Random) -> None:
    while True:
        try:
            request(acks, cell, "run")
            if rng.random() < 0.7:
                request(acks, cell, "pin", cpu=f"{rng.randint(60, 400)}m",
                        memory=f"{rng.randint(12, 24)}M")
                if rng.random() < 0.4:
                    request(acks, cell, "unpin")
            time.sleep(rng.uniform(0, 2.0))  # some cells are running when the power goes
            request(acks, cell, "stop")
        except Exception:
            time.sleep(1)  # told to the host in the acks; go on with the next cycle


def load(boot: int) -> None:
    wait_for(_ready, "agentd", timeout=300, every=0.5)
    sh("/etc/init.d/S60agent-cells", "start", timeout=300)
    acks = Acks(HOST / f"acks-{boot}.jsonl")
    for row in call("ps"):  # the boot-time cells: running, as S60agent-cells was told
        if row["name"] in BOOT_CELLS:
            acks.put(cell=row["name"], op="run", phase="ok", reply=row, boot_cell=True)
    for n in CELLS:
        write_manifest(n, ["sleep", "100000"], network={"vlan": "auto"},
                       resources={"cpu_max": "500m", "memory_max": "32M", "pids_max": 8})
    acks.put(cell="", op="load", phase="ok")
    rng = random.Random()
    threads = [threading.Thread(target=worker, args=(acks, n, random.Random(rng.random())),
                                daemon=True) for n in CELLS]
    for th in threads:
        th.start()
    time.sleep(1800)  # the host cuts the power long before


def check(boot: int) -> None:
    t0 = time.monotonic()
    wait_for(_ready, "agentd", timeout=300, every=0.5)
    status = call("status")
    at_start = {r["name"]: r["state"] for r in call("ps")}
    sh("/etc/init.d/S60agent-cells", "start", timeout=300)

    # a cell whose run was in flight at the cut may have been carried out (it was admitted)
    in_flight = runs_in_flight(_read_acks(HOST / f"acks-{boot - 1}.jsonl"))

    def settled() -> bool:
        rows = {r["name"]: r["state"] for r in call("ps")}
        extra = {n: s for n, s in rows.items() if n not in BOOT_CELLS}
        return {n: rows.get(n) for n in BOOT_CELLS} == {n: "running" for n in BOOT_CELLS} \
            and set(extra) <= in_flight and set(extra.values()) <= {"running"}

    ok = True
    try:
        wait_for(settled, "the cells of the last boot to go and the boot-time ones to run",
                 timeout=180, every=0.5)
    except AssertionError:
        ok = False
    left = leftovers()
    out = {
        "boot": boot, "settled": ok, "seconds": round(time.monotonic() - t0, 1),
        "journal_at_start": status.get("journal"), "ps_at_start": at_start,
        "ps": {r["name"]: {"state": r["state"], "pid": r["pid"]} for r in call("ps")},
        "cgroups": left["cgroups"], "netns": left["netns"], "journal": journal_live(),
        "repaired": [e["attrs"].get("plan") for e in
                     call("events", n=200, channel="master", kind="repaired")],
        "s60": Path("/var/log/agent-cells.log").read_text()
        if Path("/var/log/agent-cells.log").exists() else "",
    }
    (HOST / f"check-{boot}.json").write_text(json.dumps(out, indent=1))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("load", "check"))
    p.add_argument("--boot", type=int, required=True)
    a = p.parse_args()
    (load if a.what == "load" else check)(a.boot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
