"""Soak under SIGKILL: create/pin/destroy cycles while agentd is killed at chosen points.

Used by the guest tier in a short form (tests/guest/test_soak.py) and by ``bench/run soak``
in a long form (bench/soak.py); both run in the box.  docs/reliability.md has the figures.

* :class:`journalwatch.JournalWatch` follows ``agent.journal`` through inotify as agentd
  writes it; a trigger armed on it SIGKILLs agentd the moment a chosen record (or a
  compaction) shows up, so kills land at chosen points of a plan, not only at random
  moments.  Nothing in agentd knows it is being tested.
* :class:`Soak` runs one thread per cell, each cycling it (run, pin, maybe unpin, stop)
  through the control socket, while a killer kills agentd every few cycles at a point
  chosen from :data:`PHASES`, restarts it and checks the restart: every cell that was
  running with a live pid 1 is adopted (same pid), no plan is left open and every plan
  that was open has been repaired.  A worker whose request died with agentd brings its
  cell to "gone" from ``ps`` (stopping what was adopted or finished) and goes on.
* :func:`box_state` is everything a cell may leave in the box (cellkit.leftovers:
  cgroups, links, bridge VLAN entries, mounts, netns pins, run dirs, the nftables
  ruleset, the journal's live cells, leases and open plans) plus every address of every
  interface.  After the cycles, and every ``check_every`` cycles, it must be exactly as
  before.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    JOURNAL,
    agentd_pid,
    diff,
    leftovers,
    log_tail,
    sh,
    stop_all,
    up,
    wait_for,
    write_manifest,
)
from journalwatch import PHASES, JournalWatch, trigger_for

from agent.core.cellrecord import replay
from agent.core.plan import recover
from agent.kernel.journal import read_journal

__all__ = ["PHASES", "JournalWatch", "Soak", "SoakReport", "box_state", "call",
           "journal_max", "ps", "quiet_box", "ready", "start_agentd", "stop_agentd"]

CONFIG = Path("/etc/agent/agentd.toml")


def call(op: str, **args: Any) -> Any:
    """One request through agent.client (as cellkit.call, with room for a loaded box)."""
    from agent.cli.client import Client

    with Client(timeout=600) as c:
        return c.call(op, **args)


def ps() -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in call("ps")}


def ready() -> bool:
    """agentd answers and its cell manager is up."""
    try:
        return isinstance(call("status").get("budget"), dict)
    except Exception:
        return False


def start_agentd() -> None:
    """S50agentd start, then wait until agentd is ready.  S50agentd gives up waiting after a
    minute; an agentd still importing on a loaded host comes up later all the same: what
    counts is that it answers."""
    sh("/etc/init.d/S50agentd", "start", check=False, timeout=600)
    wait_for(ready, "agentd and its cell manager", timeout=600, every=0.2)


def stop_agentd() -> None:
    def down() -> bool:
        if up():
            sh("/etc/init.d/S50agentd", "stop", check=False, timeout=120)
        return not up()
    wait_for(down, "agentd to stop", timeout=300, every=1)


@contextlib.contextmanager
def journal_max(size: str) -> Iterator[None]:
    """agentd with ``[logs] journal_max = size`` (restarted), restored after."""
    text = CONFIG.read_text()
    line = '#journal_max = "1M"'
    assert line in text, f"{CONFIG} has no `{line}` line to replace"
    CONFIG.write_text(text.replace(line, f'journal_max = "{size}"'))
    try:
        stop_agentd()
        start_agentd()
        yield
    finally:
        CONFIG.write_text(text)
        stop_agentd()
        start_agentd()


@pytest.fixture
def quiet_box() -> Iterator[dict[str, Any]]:
    """As cellkit's ``clean``, with room for a loaded host (a first cell of a boot may take
    minutes there): agentd ready, a first networked cell run and stopped (the netns tmpfs
    and the bridge's link-local address stay), the box's state before; after the test,
    every cell stopped and the box exactly as before, addresses included."""
    if not ready():
        start_agentd()
    write_manifest("soak-warm", ["sleep", "100000"], network={"vlan": "auto"})
    call("run", name="soak-warm")
    call("stop", name="soak-warm")
    before = box_state()
    yield before
    if not ready():
        start_agentd()
    for name in ps():
        call("stop", name=name)
    after = box_state()
    assert after == before, "left behind:\n" + diff(before, after)


def box_state() -> dict[str, Any]:
    out = json.loads(sh("ip", "-j", "addr", "show").stdout or "[]")
    addrs = sorted(f"{i['ifname']} {a['local']}/{a['prefixlen']}"
                   for i in out for a in i.get("addr_info", []))
    return {**leftovers(), "addresses": addrs}


# -- the soak ----------------------------------------------------------------------------------

@dataclass
class SoakReport:
    cycles: int = 0
    cycle_s: list[float] = field(default_factory=list)
    kills: Counter[str] = field(default_factory=Counter)
    points: Counter[str] = field(default_factory=Counter)  # the record each kill followed
    interrupted: int = 0  # worker requests cut off by a kill
    adopted: int = 0  # cells running with a live pid 1 at a kill, adopted after it
    repaired: int = 0  # plans open at a kill, repaired by the next agentd
    restart_s: list[float] = field(default_factory=list)
    compactions: int = 0
    records: int = 0
    checks: int = 0  # comparisons of the whole box with its state before
    leaks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        cyc = sorted(self.cycle_s) or [0.0]
        rs = sorted(self.restart_s) or [0.0]
        return [
            f"cycles {self.cycles} in {self.seconds:.0f} s; per cycle median "
            f"{statistics.median(cyc):.2f} s, p90 {cyc[int(len(cyc) * 0.9)]:.2f} s",
            f"SIGKILLs {sum(self.kills.values())}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items())),
            f"requests cut off {self.interrupted}; running cells adopted {self.adopted}; "
            f"open plans repaired {self.repaired}; kill to ready again median "
            f"{statistics.median(rs):.1f} s",
            f"journal records {self.records}, compactions {self.compactions}",
            f"box compared with its state before {self.checks} times; leaks {len(self.leaks)}",
        ]

    def to_json(self) -> dict[str, Any]:
        return {"cycles": self.cycles, "seconds": round(self.seconds, 1),
                "cycle_median_s": round(statistics.median(self.cycle_s or [0.0]), 2),
                "kills": dict(self.kills), "kill_points": dict(self.points),
                "interrupted": self.interrupted, "adopted": self.adopted,
                "repaired": self.repaired, "records": self.records,
                "compactions": self.compactions, "checks": self.checks,
                "leaks": self.leaks}


class AgentdKilled(Exception):
    pass


def _dead(pid: int) -> bool:
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return True


class Soak:
    """``cycles`` cycles over ``workers`` cells; a SIGKILL every ``kill_every`` cycles on
    average; the whole box compared with ``before`` every ``check_every`` cycles (0: only
    at the end)."""

    def __init__(self, cycles: int, *, workers: int = 3, kill_every: float = 8,
                 check_every: int = 0, seed: int | None = None,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.cycles = cycles
        self.kill_every = kill_every
        self.check_every = check_every
        self.log = log
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.names = [f"soak-{w}" for w in range(workers)]
        self.report = SoakReport()
        self._lock = threading.Lock()
        self._left = cycles
        self._kills = 0  # bumped just before each SIGKILL
        self._up = threading.Event()  # agentd is up: workers may send requests
        self._up.set()
        self._pause = threading.Event()  # workers hold still (a whole-box comparison)
        self._busy: set[str] = set()
        self._doing: dict[str, tuple[str, float]] = {}  # each worker's request, since when
        self._errors: list[str] = []

    # ------------------------------------------------------------------ workers
    def _take(self, name: str) -> bool:
        while self._pause.is_set() and not self._errors:
            time.sleep(0.1)
        with self._lock:
            if self._left <= 0 or self._errors:
                return False
            self._left -= 1
            self._busy.add(name)
            return True

    def _finished(self) -> bool:
        """No cycle left to take and none under way: nothing more will be journaled."""
        with self._lock:
            return self._left <= 0 and not self._busy

    def _call(self, op: str, **args: Any) -> Any:
        self._up.wait()
        gen = self._kills
        me = threading.current_thread().name
        self._doing[me] = (op, time.monotonic())
        try:
            return call(op, **args)
        except Exception as exc:
            if self._kills != gen or not self._up.is_set():
                raise AgentdKilled(str(exc)) from exc
            raise
        finally:
            self._doing[me] = ("", time.monotonic())

    def doing(self) -> str:
        now = time.monotonic()
        return ", ".join(f"{n}: {op or 'idle'} {now - t:.0f} s"
                         for n, (op, t) in sorted(self._doing.items()))

    def _settle(self, name: str) -> None:
        """After a request cut off by a kill: bring the cell to "gone" whatever it was
        doing (the restarted agentd adopted, finished, repaired or removed it)."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                row = self._call("ps")
                mine = [r for r in row if r["name"] == name]
                if not mine:
                    return
                if mine[0]["state"] in ("running", "failed", "exited", "backoff"):
                    self._call("stop", name=name)
                else:
                    time.sleep(0.3)
            except AgentdKilled:
                with self._lock:
                    self.report.interrupted += 1
        raise AssertionError(f"{name} did not settle: {ps().get(name)}\n{log_tail()}")

    def _worker(self, name: str, rng: random.Random) -> None:
        try:
            while self._take(name):
                t = time.monotonic()
                try:
                    self._call("run", name=name)
                    if rng.random() < 0.7:
                        self._call("pin", name=name, cpu=f"{rng.randint(60, 400)}m",
                                   memory=f"{rng.randint(12, 24)}M")
                        if rng.random() < 0.5:
                            self._call("unpin", name=name)
                    self._call("stop", name=name)
                except AgentdKilled:
                    with self._lock:
                        self.report.interrupted += 1
                        self._left += 1  # done again: the count is of whole cycles
                    self._settle(name)
                else:
                    with self._lock:
                        self.report.cycles += 1
                        self.report.cycle_s.append(time.monotonic() - t)
                finally:
                    with self._lock:
                        self._busy.discard(name)
        except Exception as exc:
            with self._lock:
                self._errors.append(f"worker {name}: {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ the killer
    def _kill(self, watch: JournalWatch, phase: str) -> None:
        pid = agentd_pid()
        fired = threading.Event()

        def kill(what: str) -> None:
            self._kills += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            fired.set()

        point = "a random moment"
        if phase == "random":
            time.sleep(self.rng.uniform(0.0, 4.0))
            if self._finished():
                return
            kill(point)
        else:
            watch.arm(trigger_for(phase, self.rng), kill)
            deadline = time.monotonic() + 180
            while not fired.wait(0.2):
                if self._finished():  # the last cycles ended first: no kill to make
                    watch.disarm()
                    if not fired.is_set():
                        return
                elif time.monotonic() > deadline:  # a random moment instead (a stuck worker?)
                    watch.disarm()
                    if not fired.is_set():
                        self.log(f"{phase}: not reached in 180 s ({self.doing()}); ps {ps()}")
                        kill(point)
                        phase = "random"
            if phase != "random":
                point = watch.fired
        self._up.clear()
        wait_for(lambda: _dead(pid), "agentd to die", timeout=30)
        self.report.kills[phase] += 1
        self.report.points[point.split(" ")[0]] += 1
        self.log(f"kill {sum(self.report.kills.values())} ({phase}) after {point}")
        self._restart_and_check(point)

    def _restart_and_check(self, point: str) -> None:
        t = time.monotonic()
        recs = read_journal(JOURNAL).records  # what the next agentd replays
        running = {n: d["pid"] for n, d in replay(recs).cells.items()
                   if d["cell"]["state"] == "running" and isinstance(d.get("pid"), int)
                   and not _dead(d["pid"])}
        open_plans = {p.plan_id for p in recover(recs)}
        start_agentd()
        self.report.restart_s.append(time.monotonic() - t)
        rows = ps()
        for n, pid in running.items():  # running with a live pid 1: adopted as it was
            row = rows.get(n)
            assert row is not None and row["pid"] == pid and row["state"] == "running", (
                f"killed after {point}: {n} (pid {pid}) was running; after the restart: "
                f"{row}\n{log_tail()}")
        self.report.adopted += len(running)
        # (the new agentd may be running plans of its own: a destroy of what it adopted)
        left = {p.plan_id for p in recover(read_journal(JOURNAL).records)} & open_plans
        assert not left, f"killed after {point}: plans left open {left}\n{log_tail()}"
        rep = {e["attrs"]["plan"] for e in call("events", n=200, channel="master",
                                                 kind="repaired")}
        assert rep >= open_plans, (f"killed after {point}: open plans {open_plans}, "
                                   f"repaired {rep}\n{log_tail()}")
        self.report.repaired += len(open_plans)
        self._up.set()

    # ------------------------------------------------------------------ run
    def _compare(self, before: dict[str, Any], when: str) -> None:
        stop_all()
        after = box_state()
        self.report.checks += 1
        if after != before:
            self.report.leaks.append(f"{when}:\n" + diff(before, after))

    def _hold_still(self) -> None:
        self._pause.set()
        wait_for(lambda: not self._busy or bool(self._errors), "the workers to pause",
                 timeout=600, every=0.2)

    def run(self) -> SoakReport:
        """The cycles; the box is compared with its state after one networked cycle (the
        first port on the bridge gives it its IPv6 link-local address, which stays)."""
        for n in self.names:  # the last one without a network: both kinds are cycled
            net = {"vlan": "auto"} if n != self.names[-1] else None
            write_manifest(n, ["sleep", "100000"], network=net,
                           resources={"cpu_max": "500m", "memory_max": "32M", "pids_max": 8})
        call("run", name=self.names[0])
        call("stop", name=self.names[0])
        before = box_state()
        watch = JournalWatch()
        threads = [threading.Thread(target=self._worker, daemon=True, name=n,
                                    args=(n, random.Random(self.rng.random())))
                   for n in self.names]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        next_kill = self.rng.uniform(1, 2 * self.kill_every)
        next_check = self.check_every or self.cycles + 1
        phases: list[str] = []
        try:
            while self._left > 0 and not self._errors:
                if self.report.cycles >= next_check:
                    self._hold_still()
                    self._compare(before, f"after {self.report.cycles} cycles")
                    next_check += self.check_every
                    self._pause.clear()
                if self.report.cycles < next_kill:
                    time.sleep(0.1)
                    continue
                if not phases:  # every kind of point once before any comes again
                    phases = self.rng.sample(PHASES, len(PHASES))
                self._kill(watch, phases.pop())
                next_kill += self.rng.uniform(1, 2 * self.kill_every)
        except BaseException as exc:
            self._errors.append(f"killer: {type(exc).__name__}: {exc}")
            raise
        finally:
            self._up.set()
            self._pause.clear()
            for th in threads:
                th.join(600)
            watch.close()
            self.report.seconds = time.monotonic() - t0
            self.report.compactions = watch.compactions
            self.report.records = watch.records
        assert not self._errors, "\n".join(self._errors)
        self._compare(before, "at the end")
        return self.report
