"""The correlation service in agentd, in the box: ``bench/run correlate-box`` (or, in the
box, ``python3 -P /mnt/src/bench/corrbench.py``).  Prints figures, never pass/fail.

* alert latency: from the event that completes a match to its ``correlation/alert``,
  both stamped by agentd's bus (monotonic clock): what the queue, the loop and the
  engine add.  The attack is the default pattern ``escapes-across-cells``: three cells
  each make a refused ``mount`` on a signal (SIGUSR1 from here, one after the other),
  ``--rounds`` (20) times; median, 90th percentile and maximum.  Measured idle and
  while a fourth cell floods agentd with trapped calls (``hostname`` in a loop), with
  the default library and with ``--patterns`` (500) installed (the default library
  plus generated ones, bench/correlate.py's templates).  Both are installed as updates
  with every response ``record``: the default ``freeze`` would stop the next round (a
  frozen cell takes no signal); the response comes after the alert, so the latency is
  the same;
* agentd's resident set (VmRSS) with the default library, right after installing the
  500 patterns, and after the floods (the partial matches then alive); and how long
  the install took (agentctl, chunks, checks, swap).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "guest"))
sys.path.insert(0, str(REPO / "bench"))

SERVICES = Path("/etc/agent/services")
PIDFILE = Path("/var/run/agentd.pid")
IMAGE = "/usr/share/agent/images/demo"
TRIGGERED = ["cb-esc-a", "cb-esc-b", "cb-esc-c"]
FLOOD = "cb-flood"
# One refused mount per SIGUSR1; the shell waits in `wait` (no CPU) between signals,
# and ends the interrupted sleep (each round's sleep would otherwise stay: pids_max).
ON_SIGNAL = ("trap 'mount -t tmpfs none /tmp 2>/dev/null; echo m; kill $! 2>/dev/null' USR1; "
             "while :; do sleep 3600 & wait; done")


def ctl(*args: str) -> Any:
    r = subprocess.run(["agentctl", "--json", "--timeout", "300", *args], capture_output=True,
                       text=True, timeout=400)
    if r.returncode:
        raise SystemExit(f"agentctl {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


def call(op: str, **args: Any) -> Any:
    from agent.cli.client import Client

    with Client(timeout=120) as c:
        return c.call(op, **args)


def manifest(name: str, script: str) -> None:
    (SERVICES / f"{name}.toml").write_text(
        f'name = "{name}"\n[service]\ncommand = "/bin/sh"\nargs = ["-c", {json.dumps(script)}]\n'
        f'[image]\nroot = "{IMAGE}"\n[resources]\ncpu_max = "500m"\nmemory_max = "16M"\n'
        'pids_max = 16\n[lifecycle]\nmode = "service"\nrestart = "no"\n')


def rss_kib() -> int:
    pid = int(PIDFILE.read_text())
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Alerts:
    """The correlation service's alerts, followed on one stream (``events.follow``) by a
    thread: the wait for an alert adds no work to agentd's loop (polling the event ring
    five times a second did: each poll filtered it on the loop the alert waits for)."""

    def __init__(self) -> None:
        import queue
        import threading

        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ready = threading.Event()
        threading.Thread(target=self._follow, daemon=True).start()
        if not self.ready.wait(30):
            raise SystemExit("could not follow agentd's events")
        time.sleep(0.5)  # (the subscription is made once the request is read)

    def _follow(self) -> None:
        from agent.cli.client import Client

        with Client(timeout=None) as c:
            self.ready.set()
            for item in c.stream("events.follow", channel="correlation", kind="alert"):
                if item.get("attrs", {}).get("pattern") == "escapes-across-cells":
                    self.q.put(item)

    def next(self, timeout: float) -> dict[str, Any] | None:
        import queue

        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> None:
        while self.next(0) is not None:
            pass


def latencies(rounds: int, alerts: Alerts) -> list[float]:
    """Seconds from the completing trap to the alert, one per round."""
    pids = {r["name"]: r["pid"] for r in call("ps")}
    out = []
    for _ in range(rounds):
        alerts.drain()
        seq = int(call("status")["events"])
        for name in TRIGGERED:
            os.kill(pids[name], signal.SIGUSR1)
            time.sleep(0.2)  # in order: a, b, c
        a = alerts.next(60)
        if a is None:
            seen = [(e["cell"], e["attrs"].get("syscall"))
                    for e in call("events", n=500, channel="syscall")
                    if e["seq"] > seq and e["cell"] in TRIGGERED]
            raise SystemExit(f"round {len(out) + 1}: no alert within 60 s; traps of "
                             f"the three cells since: {seen}; "
                             f"correlation: {call('status')['correlation']}")
        out.append(a["mono"] - a["attrs"]["chain"][-1]["mono"])
        time.sleep(0.5)  # (the alert's response and its other sinks)
    return out


def summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"median_ms": statistics.median(s) * 1000,
            "p90_ms": s[min(len(s) - 1, int(len(s) * 0.9))] * 1000, "max_ms": s[-1] * 1000}


def gc_since(before: dict[str, Any]) -> dict[str, Any]:
    """agentd's full collections (generation 2) since ``before``: how many, and the
    longest pause of all of agentd's life so far (each one holds the loop)."""
    now = call("status")["gc"]
    return {"full": now["collections"][2] - before["collections"][2],
            "full_ms": round(now["total_ms"][2] - before["total_ms"][2], 1),
            "longest_full_ms": now["longest_ms"][2], "frozen": now["frozen"]}


def measure(rounds: int) -> dict[str, Any]:
    gc0 = call("status")["gc"]
    alerts = Alerts()
    print(f"idle, {rounds} rounds", file=sys.stderr, flush=True)
    idle = latencies(rounds, alerts)
    print(f"under a trap flood, {rounds} rounds", file=sys.stderr, flush=True)
    manifest(FLOOD, "while :; do hostname x 2>/dev/null; done")
    ctl("run", FLOOD)
    time.sleep(2)
    ev0 = int(call("status")["events"])
    t0 = time.monotonic()
    loaded = latencies(rounds, alerts)
    rate = (int(call("status")["events"]) - ev0) / (time.monotonic() - t0)
    ctl("stop", FLOOD)
    return {"idle": summary(idle), "flood": summary(loaded), "flood_events_per_s": rate,
            "dropped": call("status")["correlation"]["dropped"], "gc": gc_since(gc0)}


def big_bundle(n: int, version: int, where: Path) -> Path:
    """The default library (responses ``record``) and generated patterns
    (bench/correlate.py), ``n`` in all (the default library alone if ``n`` is smaller),
    signed with the development key the box pins."""
    import re

    from correlate import generated
    from corrkit import DEFAULT_PAT, DEV_KEY

    from agent.monitor.correlation import bundle as bnd
    from agent.monitor.correlation.language import parse

    text = re.sub(r"(?m)^(\s*)response \w+$", r"\1response record", DEFAULT_PAT.read_text())
    default = list(parse(text, "default.pat"))
    pats = [*default, *generated(max(0, n - len(default)))]
    secret = bnd.parse_key(DEV_KEY.read_text(), "secret")
    data = bnd.stamp(bnd.encode(pats, version), bnd.key_id(bnd.public_key(secret)))
    path = where / "big.bundle"
    path.write_bytes(data)
    path.with_name("big.bundle.sig").write_bytes(bnd.sign(data, secret))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--patterns", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    for name in TRIGGERED:
        manifest(name, ON_SIGNAL)
        ctl("run", name)
    time.sleep(1)
    shipped = int(call("patterns")["version"])
    res: dict[str, Any] = {"rss_shipped_kib": rss_kib()}
    with tempfile.TemporaryDirectory() as tmp:
        ctl("patterns", "install", str(big_bundle(0, shipped + 1, Path(tmp))))
    res["rss_default_kib"] = rss_kib()
    res["default"] = measure(ns.rounds)
    res["rss_default_after_kib"] = rss_kib()
    with tempfile.TemporaryDirectory() as tmp:
        path = big_bundle(ns.patterns, shipped + 2, Path(tmp))
        res["bundle_bytes"] = path.stat().st_size
        t = time.monotonic()
        ctl("patterns", "install", str(path))
        res["install_s"] = time.monotonic() - t
    res["rss_installed_kib"] = rss_kib()
    res["many"] = measure(ns.rounds)
    res["rss_many_after_kib"] = rss_kib()
    res["partials"] = call("status")["correlation"]["partials"]
    ctl("patterns", "rollback")
    for name in TRIGGERED:
        ctl("stop", name)
    if ns.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"correlation in agentd, in the box: alert latency over {ns.rounds} rounds "
          "(completing event -> alert, agentd's clock)")
    for label, key in (("default library", "default"),
                       (f"{ns.patterns} patterns", "many")):
        m = res[key]
        for mode in ("idle", "flood"):
            s = m[mode]
            extra = f" ({m['flood_events_per_s']:.0f} events/s)" if mode == "flood" else ""
            print(f"  {label:<16} {mode:<6} median {s['median_ms']:6.2f} ms  p90 "
                  f"{s['p90_ms']:6.2f} ms  max {s['max_ms']:6.2f} ms{extra}")
        print(f"  {label:<16} dropped by the engine's queue: {m['dropped']}")
        g = m["gc"]
        print(f"  {label:<16} agentd's full collections meanwhile: {g['full']} "
              f"({g['full_ms']:.0f} ms in all; longest so far {g['longest_full_ms']:.0f} ms; "
              f"{g['frozen']} objects frozen)")
    print(f"  agentd RSS: {res['rss_shipped_kib'] / 1024:.1f} MiB with the shipped library, "
          f"{res['rss_default_kib'] / 1024:.1f} MiB with it installed again as an update "
          f"({res['rss_default_after_kib'] / 1024:.1f} after its floods); "
          f"{res['rss_installed_kib'] / 1024:.1f} MiB with {ns.patterns} patterns installed "
          f"({res['rss_many_after_kib'] / 1024:.1f} after the floods, {res['partials']} "
          "partial matches alive)")
    print(f"  install of {ns.patterns} patterns ({res['bundle_bytes'] / 1024:.0f} KiB): "
          f"{res['install_s']:.1f} s (agentctl, chunks, checks, swap)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
