"""Correlation throughput and memory on the host: ``bench/run correlate`` (or
``python3 bench/correlate.py``).  Prints figures, never pass/fail.

* throughput: events per second of CPU time (``time.process_time``: one core, whatever
  else the machine runs) of ``Engine.feed`` over a synthetic stream of ``--events``
  (200,000) events from 16 cells, with the default library
  (``rootfs-overlay/etc/agent/patterns/default.pat``) and with ``--patterns`` (500)
  generated ones; median and range over ``--runs`` (5) runs, each on a fresh engine.
  The process is pinned to one CPU (``--cpu``, default the first it may use).
* memory: the resident set (VmRSS) of a fresh process after importing the engine, after
  loading the generated patterns, and after feeding the stream (the partial matches
  then alive), the stream produced lazily so that it takes no memory itself.

The stream is a mix meant to look like a busy box (flows between a few pairs of cells,
process events, trapped calls mostly granted, tuner and reclaim events, rare denials,
writes to data directories, scans and attacks on the agent); see :func:`events`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.monitor.correlation.engine import Engine  # noqa: E402
from agent.monitor.correlation.event import Record  # noqa: E402
from agent.monitor.correlation.language import parse  # noqa: E402
from agent.monitor.correlation.model import Pattern  # noqa: E402

DEFAULT = REPO / "rootfs-overlay/etc/agent/patterns/default.pat"
CELLS = [f"cell{i}" for i in range(16)]
SYSCALLS = ["mount", "umount2", "ptrace", "unshare", "setns", "bpf", "init_module",
            "kexec_load", "keyctl", "chroot", "sethostname", "settimeofday", "clock_settime",
            "reboot", "pivot_root", "open_by_handle_at", "perf_event_open", "userfaultfd",
            "add_key", "finit_module", "swapon", "acct", "quotactl", "syslog"]
OPS = ["set_time", "set_hostname", "mount_usb", "reboot", "sysctl_net", "dvb_tuner", "leds"]
PORTS = [80, 443, 53, 8080, 8443, 1883, 554, 4444, 5555, 9000]

# (weight, channel, kind): about what a busy box publishes.  Attacks are rare: most
# events are flows between a few pairs of cells and process events.
MIX = [(45, "net", "flow"), (12, "proc", "exec"), (12, "proc", "fork"), (12, "proc", "exit"),
       (1, "syscall", "trap"), (0.1, "syscall", "denied"), (5, "tuner", "resize"),
       (0.3, "tuner", "pressure"), (2, "reclaim", "throttle"), (1, "lifecycle", "running"),
       (3, "exec", "file-written"), (0.1, "exec", "exec-denied"),
       (0.1, "exec", "exec-unverified"), (0.5, "net", "flow-denied"), (1, "net", "listen"),
       (0.05, "net", "scan"), (0.02, "agent", "control-denied"), (0.01, "agent", "signal"),
       (0.3, "host", "sysctl"), (0.1, "host", "mount"), (0.5, "lifecycle", "destroyed")]
BUSY = CELLS[:3]  # the cells that are short of memory or CPU now and then


def _attrs(rng: random.Random, channel: str, kind: str, cell: str) -> dict[str, Any]:
    pid = rng.randrange(2, 200)
    if kind in ("flow", "flow-denied"):
        peer = CELLS[(CELLS.index(cell) + rng.choice([1, 2, 5])) % len(CELLS)]
        port = rng.choice(PORTS) if kind == "flow" else rng.randrange(1, 1024)
        return {"proto": "tcp", "src": "10.1.0.2", "sport": rng.randrange(30000, 60000),
                "dst": "10.2.0.2", "dport": port,
                "peer_cell": peer if rng.random() < 0.8 else None}
    if channel == "proc":
        exe = f"/tmp/x{rng.randrange(60)}" if rng.random() < 0.01 else "/usr/bin/worker"
        return {"pid": pid, "hpid": pid + 4000, "ppid": 1, "comm": "worker", "exe": exe,
                "code": 0}
    if channel == "syscall":
        return {"syscall": rng.choice(SYSCALLS), "op": rng.choice(OPS), "pid": pid,
                "hpid": pid + 4000, "verdict": "allowed" if kind == "trap" and
                rng.random() < 0.97 else "denied"}
    if channel == "exec":
        return {"path": f"/data/d{rng.randrange(20)}/f{rng.randrange(50)}",
                "hash": f"{rng.randrange(5000):064x}", "size": 4096,
                "source": f"d{rng.randrange(20)}", "pid": pid, "hpid": pid,
                "reason": rng.choice(["unsealed", "changed", "memfd"])}
    if kind == "listen":
        return {"proto": "tcp", "port": rng.choice(PORTS) if rng.random() < 0.98
                else rng.randrange(1000, 1100)}
    if kind == "scan":
        return {"ports": rng.randrange(10, 200), "addrs": rng.randrange(1, 10), "window_s": 10}
    if channel == "tuner":
        return {"resource": rng.choice(["cpu", "memory", "io"]), "reason": "pressure"}
    if channel == "agent":
        return {"uid": rng.choice([0, 1000, 1001]), "pid": pid, "op": "run", "sig": 15,
                "sender_pid": pid}
    if channel == "host":
        return {"name": rng.choice(["net.ipv4.ip_forward", "kernel.hostname"]), "old": "0",
                "new": "1", "target": "/mnt/usb", "fstype": "vfat",
                "by": cell if rng.random() < 0.1 else None}
    return {}


def events(n: int, seed: int = 1) -> Iterator[Record]:
    """``n`` events, 2,000 per second of event time, from :data:`MIX`."""
    rng = random.Random(seed)
    weights = [w for w, _, _ in MIX]
    t = 0.0
    for i in range(n):
        _, channel, kind = rng.choices(MIX, weights)[0]
        t += rng.expovariate(2000.0)
        cell = rng.choice(BUSY if kind == "pressure" and rng.random() < 0.9 else CELLS)
        attrs = _attrs(rng, channel, kind, cell)
        yield Record(i + 1, t, 1.7e9 + t, None if channel == "host" else cell, channel, kind,
                     attrs, "info")


TEMPLATES = [
    """pattern gen-{i}
  within {span}
  cells distinct
  step w: exec/file-written path ~ "/data/d{a}/*"
  step x: exec/exec-denied|exec-unverified same hash and reason == {reason}
end""",
    """pattern gen-{i}
  within {span}
  step t: syscall/trap syscall == {sys} and verdict == denied
  step u: syscall/trap|denied cell == t.cell and syscall in {{{sys2}, {sys3}}}
end""",
    """pattern gen-{i}
  within {span}
  step l: net/listen port == {uport}
  step f: net/flow dport == l.port and peer_cell == l.cell
  until lifecycle/destroyed cell == l.cell
end""",
    """pattern gen-{i}
  step d: net/flow-denied dport == {uport}
  count {n} within 30s per cell
end""",
    """pattern gen-{i}
  within {span}
  step e: proc/exec exe == "/tmp/x{a}"
  step n: net/flow cell == e.cell and dport == {port}
end""",
    """pattern gen-{i}
  within 10s
  step t: syscall/trap op == {op} and verdict == allowed
  step h: host/sysctl|mount by == t.cell
end""",
    """pattern gen-{i}
  step s: agent/control-denied uid == {uid}
  count 3 within 1m
end""",
    """pattern gen-{i}
  step p: tuner/pressure resource == {res}
  count {n} distinct cell within 1m
end""",
]


def generated(n: int, seed: int = 2) -> list[Pattern]:
    """``n`` patterns from :data:`TEMPLATES` with random literals, through the language."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        sys2, sys3 = rng.sample(SYSCALLS, 2)
        texts.append(TEMPLATES[i % len(TEMPLATES)].format(
            i=i, span=rng.choice(["30s", "5m", "10m", "1h"]), a=rng.randrange(60),
            reason=rng.choice(["unsealed", "changed"]), sys=rng.choice(SYSCALLS), sys2=sys2,
            sys3=sys3, port=rng.choice(PORTS), uport=rng.randrange(1000, 1100),
            n=rng.randrange(3, 12), op=rng.choice(OPS), uid=rng.randrange(1000, 1100),
            res=rng.choice(["cpu", "memory", "io"])))
    return list(parse("\n".join(texts), "<generated>"))


def throughput(lib: list[Pattern], stream: list[Record], runs: int) -> dict[str, Any]:
    eps, wall, out = [], [], {}
    for _ in range(runs):
        eng = Engine(lib)
        feed = eng.feed
        matches = 0
        c0, w0 = time.process_time(), time.perf_counter()
        for e in stream:
            matches += len(feed(e))
        c1, w1 = time.process_time(), time.perf_counter()
        eps.append(len(stream) / (c1 - c0))
        wall.append(len(stream) / (w1 - w0))
        st = eng.stats()
        out = {"matches": matches, "partials": st.partials,
               "evicted": sum(sum(p.evicted.values()) for p in st.patterns)}
    return {"patterns": len(lib), "events": len(stream), "runs": runs,
            "eps_median": statistics.median(eps), "eps_min": min(eps), "eps_max": max(eps),
            "wall_eps_median": statistics.median(wall), **out}


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def rss_child(patterns: int, n: int) -> dict[str, int]:
    """In a fresh process: RSS after imports, after loading, after feeding (KiB)."""
    base = _rss_kib()
    eng = Engine(generated(patterns))
    loaded = _rss_kib()
    for e in events(n):
        eng.feed(e)
    return {"rss_imported_kib": base, "rss_loaded_kib": loaded, "rss_fed_kib": _rss_kib(),
            "partials": eng.live}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--patterns", type=int, default=500)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.rss_child:
        print(json.dumps(rss_child(ns.patterns, ns.events)))
        return 0
    cpu = ns.cpu if ns.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    stream = list(events(ns.events))
    default = list(parse(DEFAULT.read_text(), str(DEFAULT)))
    res = {"default": throughput(default, stream, ns.runs),
           "generated": throughput(generated(ns.patterns), stream, ns.runs)}
    child = subprocess.run([sys.executable, __file__, "--rss-child", "--patterns",
                            str(ns.patterns), "--events", str(ns.events)],
                           capture_output=True, text=True, check=True)
    res["memory"] = json.loads(child.stdout)
    res["cpu"] = cpu
    if ns.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"correlation on one core (CPU {cpu}), {ns.events} events, median of {ns.runs} "
          "runs (CPU time):")
    for name, r in (("default library", res["default"]), ("generated", res["generated"])):
        print(f"  {name:<16} {r['patterns']:>4} patterns  {r['eps_median']:>10,.0f} events/s "
              f"(range {r['eps_min']:,.0f}-{r['eps_max']:,.0f}; wall {r['wall_eps_median']:,.0f})"
              f"  matches {r['matches']}  partials {r['partials']}  evicted {r['evicted']}")
    m = res["memory"]
    print(f"  RSS with {ns.patterns} patterns: {m['rss_loaded_kib'] / 1024:.1f} MiB loaded "
          f"(+{(m['rss_loaded_kib'] - m['rss_imported_kib']) / 1024:.1f} MiB over the "
          f"imported engine), {m['rss_fed_kib'] / 1024:.1f} MiB after the stream "
          f"({m['partials']} partial matches alive)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
