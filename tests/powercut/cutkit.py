"""Power cuts, driven from the host: boot the box on a persistent state disk, let it work,
kill QEMU at a moment chosen from what the box reports, look at the disk, boot again.

Used by tests/powercut/test_powercut.py (one cut) and ``bench/run powercut`` (20 cuts);
docs/reliability.md has the figures.  Boot ``i`` runs tests/powercut/powerload.py: first
``check`` (after a cut: agentd replayed its journal; the boot-time cells must come back and
nothing of the last boot's other cells may be left), then ``load`` (cells cycled, every
request and every reply written to the host) until the host cuts the power:

* the cut comes right after a request was sent, after a random number of acknowledged
  ones plus a random delay of up to 1.5 s: agentd is then writing its journal;
* the host then reads the journal off the state disk as the next mount will see it (a
  copy with its ext4 journal replayed, :func:`image.read_from_disk`) and checks it against
  the acknowledgements (:func:`check_journal`): it replays to its last complete record
  (no corrupt region before it, sequence numbers without a hole), and every acknowledged
  fact is in it: a cell whose ``run`` was acknowledged (and no ``stop`` sent since) is
  journaled running with that pid 1, one whose ``stop`` was acknowledged (and no ``run``
  sent since) is gone, an acknowledged pin is the cell's pin.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "qemu"))

import box  # noqa: E402  (the launcher, qemu/box.py)
import image  # noqa: E402

from agent.core.cellrecord import pin_from_wire, replay  # noqa: E402
from agent.kernel.journal import scan  # noqa: E402

BOOT_CELLS = ("demo-web", "demo-client")


@dataclass
class CutResult:
    boot: int
    load_s: float = 0.0  # how long the load ran before the cut
    acked: int = 0  # requests agentd had answered "ok" in this boot
    records: int = 0  # complete records in the journal after the cut
    torn_bytes: int = 0  # bytes after the last complete record (cut off at the next start)
    facts: int = 0  # acknowledged facts checked against the journal
    problems: list[str] = field(default_factory=list)  # lost or corrupt: must stay empty
    check: dict[str, Any] = field(default_factory=dict)  # what the next boot found


def _pin(reply: Mapping[str, Any]) -> dict[str, int]:
    return {"cpu": reply["cpu_max"], "memory_high": reply["memory_high"],
            "memory_max": reply["memory_max"]}


def check_journal(blob: bytes, acks: Iterable[Mapping[str, Any]]) -> tuple[int, int, int,
                                                                         list[str]]:
    """(records, torn bytes, facts checked, problems) of a journal image against the
    acknowledgements of the boot it was cut in (pure)."""
    res = scan(blob)
    problems = []
    if res.skipped:
        problems.append(f"corrupt regions before the last complete record: {res.skipped}")
    if any(b.seq != a.seq + 1 for a, b in itertools.pairwise(res.records)):
        problems.append("a hole in the sequence numbers: "
                        f"{[r.seq for r in res.records]}")
    cells = replay(res.records).cells
    by_cell: dict[str, list[Mapping[str, Any]]] = {}
    for a in acks:
        if a.get("cell"):
            by_cell.setdefault(a["cell"], []).append(a)
    facts = 0
    for cell, seq in sorted(by_cell.items()):
        state: str | None = None  # "running" or "gone", as last acknowledged
        pid = None
        pin: Any = "unknown"
        for a in seq:
            if a["phase"] == "err":
                state, pin = None, "unknown"  # an error: no expectation until the next ok
            elif a["phase"] == "ok" and a["op"] == "run":
                state, pid, pin = "running", a["reply"].get("pid"), None
            elif a["phase"] == "ok" and a["op"] == "stop":
                state, pin = "gone", "unknown"
            elif a["phase"] == "ok" and a["op"] in ("pin", "unpin"):
                pin = _pin(a["reply"]) if a["op"] == "pin" else None
        inflight = seq[-1]["op"] if seq[-1]["phase"] == "sent" else None
        rec = cells.get(cell)
        got = None if rec is None else rec["cell"]["state"]
        if state == "running" and inflight != "stop":
            facts += 1
            if got != "running" or rec is None or rec.get("pid") != pid:
                problems.append(f"{cell}: acknowledged running with pid {pid}, journal has "
                                f"{got} pid {None if rec is None else rec.get('pid')}")
            elif pin != "unknown" and inflight not in ("pin", "unpin"):
                facts += 1
                if pin_from_wire(rec.get("pin")) != pin:
                    problems.append(f"{cell}: acknowledged pin {pin}, journal has "
                                    f"{rec.get('pin')}")
        elif state == "gone" and inflight != "run":
            facts += 1
            if rec is not None:
                problems.append(f"{cell}: acknowledged stopped, journal has it {got}")
    return len(res.records), res.torn_bytes, facts, problems


def runs_in_flight(acks: Iterable[Mapping[str, Any]]) -> set[str]:
    """Cells whose last request before the cut was a ``run`` left unanswered (pure)."""
    last: dict[str, Mapping[str, Any]] = {}
    for a in acks:
        if a.get("cell"):
            last[a["cell"]] = a
    return {c for c, a in last.items() if a["op"] == "run" and a["phase"] == "sent"}


def check_after_cut(check: Mapping[str, Any], in_flight: Iterable[str] = ()) -> list[str]:
    """What the next boot found (powerload.py check) against what it must find: the
    boot-time cells, and nothing else but, perhaps, a cell whose ``run`` was in flight at
    the cut (``in_flight``): agentd had admitted it, and carries out admitted requests;
    its requester never had an answer, so either outcome keeps every acknowledged fact."""
    problems = []
    if not check.get("settled"):
        problems.append(f"cells did not settle to the boot-time ones: {check.get('ps')}")
    j = check.get("journal_at_start") or {}
    if j.get("skipped_bytes"):
        problems.append(f"agentd skipped {j['skipped_bytes']} corrupt bytes at its start")
    extra = sorted(set(check.get("ps", {})) & set(in_flight))
    want = sorted({*BOOT_CELLS, *extra})
    if sorted(check.get("ps", {})) != want:
        problems.append(f"cells after the restart: {check.get('ps')}")
    if check.get("cgroups") != want:
        problems.append(f"cgroups after the restart: {check.get('cgroups')}")
    if check.get("netns") != sorted(f"cell-{c}" for c in want):
        problems.append(f"netns pins after the restart: {check.get('netns')}")
    live = check.get("journal") or {}
    if live.get("cells") != want or live.get("leases") != want or live.get("open_plans"):
        problems.append(f"the journal after the restart: {live}")
    return problems


def _acks(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut by the power cut (the share is the host's: never happens)
    return out


class PowerCuts:
    """``cuts`` power cuts on one state disk: ``cuts + 1`` boots."""

    def __init__(self, cuts: int, *, workdir: Path | None = None, seed: int | None = None,
                 log: Callable[[str], None] = lambda s: None, console: Any = None) -> None:
        self.cuts = cuts
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.log = log
        self.console = console
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="powercut-"))
        self.hostio = self.workdir / "io"
        self.hostio.mkdir(parents=True, exist_ok=True)
        self.disk = image.make_state_disk(self.workdir / "state.ext4")
        self.results: list[CutResult] = []

    def _script(self, boot: int) -> str:
        py = "python3 -P /mnt/src/tests/powercut/powerload.py"
        lines = [". /etc/profile", "cd /root"]
        if boot > 0:
            lines.append(f"{py} check --boot {boot} || exit 3")
        if boot < self.cuts:
            lines.append(f"exec {py} load --boot {boot}")
        return "\n".join(lines) + "\n"

    def _boot(self, boot: int) -> box.Box:
        return box.Box(self._script(boot), hostio=self.hostio, state_disk=self.disk,
                       out=self.console, verbose=False)

    def _wait_for_moment(self, b: box.Box, boot: int) -> float:
        """Until the load has run a while and a request was just sent; the load's time."""
        path = self.hostio / f"acks-{boot}.jsonl"
        want_ok = self.rng.randint(3, 15)
        deadline = time.monotonic() + 900
        start = None
        seen = 0
        while time.monotonic() < deadline:
            if b.proc.poll() is not None:
                raise AssertionError(f"boot {boot}: the box stopped before the cut:\n"
                                     + "".join(b.tail))
            acks = _acks(path)
            if start is None and any(a["op"] == "load" for a in acks):
                start = time.monotonic()
            oks = sum(1 for a in acks if a["phase"] == "ok" and a["op"] != "load")
            if start is not None and oks >= want_ok and len(acks) > seen and \
                    acks[-1]["phase"] == "sent":
                time.sleep(self.rng.uniform(0.0, 1.5))
                return time.monotonic() - start
            seen = len(acks) if oks < want_ok else seen
            time.sleep(0.05)
        raise AssertionError(f"boot {boot}: the load did not get going:\n" + "".join(b.tail))

    def run(self) -> list[CutResult]:
        for boot in range(self.cuts + 1):
            b = self._boot(boot)
            if boot > 0:
                self._read_check(boot, b)
            if boot == self.cuts:
                rc = b.wait(900)
                assert rc == 0, f"last boot exited {rc}:\n" + "".join(b.tail)
                break
            load_s = self._wait_for_moment(b, boot)
            b.power_cut()
            acks = _acks(self.hostio / f"acks-{boot}.jsonl")
            blob = image.read_from_disk(self.disk, "/agent.journal") or b""
            records, torn, facts, problems = check_journal(blob, acks)
            r = CutResult(boot, load_s, sum(1 for a in acks if a["phase"] == "ok"),
                          records, torn, facts, problems)
            self.results.append(r)
            self.log(f"cut {boot + 1}: after {load_s:.1f} s of load, {r.acked} replies; "
                     f"journal {records} records, torn tail {torn} bytes; "
                     f"{facts} facts checked, {len(problems)} problems")
        return self.results

    def _read_check(self, boot: int, b: box.Box) -> None:
        path = self.hostio / f"check-{boot}.json"
        deadline = time.monotonic() + 900
        while not path.exists():
            if b.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"boot {boot}: no check report:\n" + "".join(b.tail))
            time.sleep(0.2)
        time.sleep(0.2)  # written in one go; let it land
        check = json.loads(path.read_text())
        prev = self.results[-1]
        prev.check = check
        in_flight = runs_in_flight(_acks(self.hostio / f"acks-{boot - 1}.jsonl"))
        prev.problems += [f"after the cut, at the next boot: {p}"
                          for p in check_after_cut(check, in_flight)]
        self.log(f"boot {boot}: agentd back, boot-time cells running after "
                 f"{check.get('seconds')} s; torn tail cut at start "
                 f"{(check.get('journal_at_start') or {}).get('truncated_bytes')} bytes")


def summary(results: list[CutResult], seconds: float) -> list[str]:
    lost = sum(len(r.problems) for r in results)
    return [
        f"power cuts {len(results)} ({len(results) + 1} boots) in {seconds:.0f} s",
        f"journal after each cut: {sum(r.records for r in results)} records in all, torn "
        f"tails {[r.torn_bytes for r in results]} bytes",
        f"acknowledged facts checked {sum(r.facts for r in results)}, of "
        f"{sum(r.acked for r in results)} replies; lost or corrupt {lost}",
    ]
