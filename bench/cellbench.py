"""Cell start/stop latency, agent vs crun vs bwrap, side by side in one boot of the box.

Run it with ``bench/run cells`` (boots the emulated box and runs this inside), or in the
box as ``python3 /mnt/src/bench/cellbench.py``.  It prints figures, never pass/fail;
``-n 3 --background 4 --burst 4`` is a short run that exercises every row.

What is measured, for each row, over N sequential cells (default 50):

* start: from the request (the control message to agentd; the network script and the
  ``crun run`` or the ``bwrap`` command for the peers) to the service's first
  instruction.  "First instruction" is the kernel's exec event for the service's
  binary, taken from the proc connector: its timestamp is CLOCK_MONOTONIC in the
  kernel, so the figure does not depend on when this process gets to read the event.
* stop: from the stop request to everything freed (agentd's reply comes after its
  destroy plan; for crun: kill, delete, veth and netns removed; for bwrap: the
  sandbox's processes reaped).

The rows: ``agent``; ``agent@32``, the same with 32 other cells running (flat in the
number of cells?); and the reference rows of bench/cellrefs.py: ``crun``, whose network
is made by a fixed iproute2 script (CRUN_NET_UP), never by the agent's code, so the
reference stays put when the agent gets faster; ``bwrap`` (no network); ``net``, the
agent's own network set-up alone (no process); ``floor`` = bwrap + net.  Ratios to
crun's medians have their own columns.
Also: a burst of 16 ``run`` requests sent at once against 16 sent one after the other
(time to the last service's first instruction), agentd's RSS with 1 and with 32 cells
running, and the helper processes each runtime leaves per cell.

The same read-only image (the demo image), the same namespaces (pid, mount, uts, ipc,
net, cgroup) and, for agentd, crun and net, a veth on a VLAN of the same VLAN-filtering
bridge (each on a VLAN of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cellrefs import IMAGE, BwrapRuntime, CrunRuntime, NetRuntime

SERVICES = Path("/etc/agent/services")
INIT = "/etc/init.d/S50agentd"

# --- the proc connector: exec events with kernel timestamps ---------------------------------

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 0x00000002
SO_RCVBUFFORCE = 33


class ExecEvents:
    """Exec events (pid, kernel monotonic ns) from the proc connector."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        try:  # every exec of the box comes here: room for bursts (root may force it)
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((os.getpid(), CN_IDX_PROC))
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = struct.pack("=IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
        nl = struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, os.getpid()) + cn  # NLMSG_DONE
        self.sock.send(nl)

    def wait_exec(self, marker: str, timeout: float = 20.0) -> int:
        """Kernel timestamp (ns) of the exec whose argv contains ``marker``."""
        return self.wait_execs({marker}, timeout)[marker]

    def wait_execs(self, markers: set[str], timeout: float = 20.0,
                   since: int = 0) -> dict[str, int]:
        """``{marker: kernel timestamp (ns)}`` of the first exec at or after ``since``
        whose argv contains each marker; other events are dropped."""
        want = {m.encode(): m for m in markers}
        seen: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < len(want):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(markers) - set(seen))
                raise TimeoutError(f"no exec of {missing} within {timeout} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                continue  # the socket overflowed (events lost); read on
            off = 0
            while off + 16 <= len(data):
                length = struct.unpack_from("=I", data, off)[0]
                ev = data[off + 16 + 20: off + length]
                off += (length + 3) & ~3
                if len(ev) < 24:
                    continue
                what, _cpu, ts = struct.unpack_from("=IIQ", ev)
                if what != PROC_EVENT_EXEC or ts < since:
                    continue
                pid = struct.unpack_from("=I", ev, 16)[0]
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                for arg in argv:
                    if arg in want and want[arg] not in seen:
                        seen[want[arg]] = int(ts)
        return seen

    def close(self) -> None:
        self.sock.close()


# --- runtimes ---------------------------------------------------------------------------------


@dataclass
class Runtime:
    name: str
    start: Callable[[int, str], None]  # (index, marker)
    stop: Callable[[int], None]
    prepare: Callable[[int, str], None] = lambda i, marker: None  # before the clock starts
    starts: list[float] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)
    error: str = ""
    # per cell, CLOCK_MONOTONIC seconds: start request, first instruction, stop request,
    # stopped (the per-step breakdown of the agent rows is cut from agentd's events)
    windows: list[tuple[float, float, float, float]] = field(default_factory=list)


class AgentRuntime:
    """agentd, through its control socket, as an operator or a service manager would."""

    def __init__(self) -> None:
        from agent.cli.client import Client

        self.client = Client("/run/agent/agentd.sock", timeout=60)
        deadline = time.monotonic() + 60  # agentd may still be starting after boot
        while True:
            try:
                self.client.call("status")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def manifest(self, name: str, marker: str, vlan: int = 100) -> None:
        (SERVICES / f"{name}.toml").write_text(f'''
name = "{name}"
[service]
command = "/bin/busybox"
args = ["sleep", "{marker}"]
[image]
root = "{IMAGE}"
[resources]
cpu_max = "200m"
memory_max = "16M"
pids_max = 8
[network]
vlan = {vlan}
[lifecycle]
mode = "service"
restart = "no"
''')

    def prepare(self, i: int, marker: str) -> None:
        self.manifest(f"bench-{i}", marker)

    def start(self, i: int, marker: str) -> None:
        self.client.call("run", name=f"bench-{i}")

    def stop(self, i: int) -> None:
        self.client.call("stop", name=f"bench-{i}")

    @staticmethod
    def remove(names: list[str]) -> None:
        for name in names:
            (SERVICES / f"{name}.toml").unlink(missing_ok=True)

    def cleanup(self, n: int) -> None:
        self.remove([f"bench-{i}" for i in range(max(n, 4))])


# --- measuring ---------------------------------------------------------------------------------


def quantiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]
    return statistics.median(xs), p90


def measure(rt: Runtime, events: ExecEvents | None, n: int, base: int) -> None:
    """n sequential start/stop pairs; without ``events`` a start ends when it returns."""
    for i in range(n):
        marker = str(base + i)
        rt.prepare(i, marker)
        t0 = time.monotonic_ns()
        rt.start(i, marker)
        ts = events.wait_exec(marker) if events is not None else time.monotonic_ns()
        rt.starts.append((ts - t0) / 1e6)
        t1 = time.monotonic_ns()
        rt.stop(i)
        t2 = time.monotonic_ns()
        rt.stops.append((t2 - t1) / 1e6)
        rt.windows.append((t0 / 1e9, ts / 1e9, t1 / 1e9, t2 / 1e9))


def steps(client: object, rt: Runtime, names: Callable[[int], str]) -> list[str]:
    """Where an agent row's time went, per plan step (medians, ms), cut from agentd's
    ``master/op-applied`` and ``plan-commit`` events (stamped in the worker when each
    step ended).  Start: request -> the first step's end (admission, the plan, the first
    step), each step, the commit, the first instruction; stop likewise."""
    lines = []
    for what, lo, hi in (("start", 0, 1), ("stop", 2, 3)):
        gaps: dict[str, list[float]] = {}
        order: list[str] = []
        for i, w in enumerate(rt.windows):
            evs = client.call("events", n=64, cell=names(i),  # type: ignore[attr-defined]
                              channel="master")
            marks = sorted((e["mono"], e["attrs"].get("step") or e["kind"]) for e in evs
                           if e["kind"] in ("op-applied", "plan-commit")
                           and w[lo] <= e["mono"] <= w[hi])
            if not marks:
                continue
            prev = w[lo]
            for mono, label in [*marks, (w[hi], "first instruction" if lo == 0
                                         else "reply")]:
                if label not in gaps:
                    order.append(label)
                gaps.setdefault(label, []).append((mono - prev) * 1e3)
                prev = mono
        if order:
            lines.append(f"{rt.name} {what} per step (median ms, n={len(rt.windows)}): " +
                         ", ".join(f"{k} {statistics.median(gaps[k]):.1f}" for k in order))
    return lines


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def agentd_pid() -> int:
    return int(Path("/var/run/agentd.pid").read_text().split()[0])


def user_processes() -> set[int]:
    """Pids of user-space processes (kernel threads have an empty cmdline)."""
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if (p / "cmdline").read_bytes():
                    out.add(int(p.name))
            except OSError:
                pass
    return out


def helpers_per_cell(rt: Runtime, events: ExecEvents, k: int, base: int) -> float:
    """(processes added by k cells - the k services themselves) / k."""
    before = user_processes()
    for i in range(k):
        rt.prepare(i, str(base + i))
        rt.start(i, str(base + i))
        events.wait_exec(str(base + i))
    time.sleep(0.2)
    added = len(user_processes() - before)
    for i in range(k):
        rt.stop(i)
    return (added - k) / k


def burst(agent: AgentRuntime, events: ExecEvents, k: int, base: int,
          at_once: bool) -> float:
    """ms from the first of k ``run`` requests to the last service's first instruction:
    k clients sending together (``at_once``) or one request after the other.  Every
    request must complete; the cells are stopped afterwards (not timed)."""
    names = [f"burst-{i}" for i in range(k)]
    markers = [str(base + i) for i in range(k)]
    for name, marker in zip(names, markers, strict=True):
        agent.manifest(name, marker, vlan=102)
    errors: list[BaseException] = []

    def run(name: str) -> None:
        from agent.cli.client import Client

        try:
            with Client("/run/agent/agentd.sock", timeout=300) as c:
                c.call("run", name=name)
        except BaseException as e:
            errors.append(e)

    seen: dict[str, int] = {}

    def collect() -> None:  # read the exec events while the requests go
        try:
            seen.update(events.wait_execs(set(markers), timeout=600.0, since=t0))
        except BaseException as e:
            errors.append(e)

    t0 = time.monotonic_ns()
    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    if at_once:
        threads = [threading.Thread(target=run, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for name in names:
            run(name)
    if not errors:  # else it may wait for execs that never come: not joined
        collector.join()
    try:
        if errors:
            raise RuntimeError(f"{len(errors)} of {k} failed: {errors[0]!r}")
        return (max(seen.values()) - t0) / 1e6
    finally:
        for name in names:
            with contextlib.suppress(Exception):
                agent.client.call("stop", name=name)
        agent.remove(names)


class Bench:
    """One run of the whole table (see the module docstring)."""

    def __init__(self, n: int, background: int, burst_k: int, boot_k: int = 0) -> None:
        self.n, self.background, self.burst_k, self.boot_k = n, background, burst_k, boot_k
        self.events = ExecEvents()
        self.work = Path(tempfile.mkdtemp(prefix="cellbench-"))
        self.base = 700000
        self.rows: list[Runtime] = []
        self.extra: dict[str, object] = {}
        self.breakdown: list[str] = []  # the agent rows' per-step lines

    def marker_base(self) -> int:
        self.base += 1000
        return self.base

    def run(self, only: list[str]) -> None:
        for name in only:
            if name in ("crun", "bwrap") and not shutil.which(name):
                continue
            print(f"[bench] {name}: {self.n} sequential cells ...", file=sys.stderr,
                  flush=True)
            impl: AgentRuntime | CrunRuntime | BwrapRuntime | NetRuntime | None = None
            rt = Runtime(name, lambda i, m: None, lambda i: None)
            try:
                impl = self.make(name)
                rt.start, rt.stop = impl.start, impl.stop
                if isinstance(impl, AgentRuntime):
                    rt.prepare = impl.prepare
                self.rows.append(rt)
                measure(rt, None if name == "net" else self.events, self.n,
                        self.marker_base())
                if isinstance(impl, AgentRuntime):
                    self.breakdown += steps(impl.client, rt, lambda i: f"bench-{i}")
                if name != "net":
                    self.extra[f"{name}_helpers_per_cell"] = helpers_per_cell(
                        rt, self.events, 4, self.marker_base())
                if isinstance(impl, AgentRuntime):
                    self.agent_extras(impl)
            except Exception as e:  # a figure missing is reported, never hidden
                import traceback

                traceback.print_exc()
                rt.error = f"{type(e).__name__}: {e}"
            finally:
                if impl is not None:
                    impl.cleanup(self.n)

    def make(self, name: str) -> AgentRuntime | CrunRuntime | BwrapRuntime | NetRuntime:
        if name == "agent":
            return AgentRuntime()
        if name == "crun":
            return CrunRuntime(self.work)
        if name == "net":
            return NetRuntime(self.work)
        return BwrapRuntime()

    def agent_extras(self, agent: AgentRuntime) -> None:
        """RSS at 1 and ``background`` cells; start/stop with those cells running (on
        another VLAN: a measured cell still makes and removes its own VLAN's gateway, as
        with none); the burst, at once and sequential."""
        pid = agentd_pid()
        self.extra["agentd_rss_kib_idle"] = rss_kib(pid)
        bg = [f"bg-{i}" for i in range(self.background)]
        base = self.marker_base()
        try:
            for i, name in enumerate(bg):
                agent.manifest(name, str(base + i), vlan=101)
                agent.client.call("run", name=name)
                self.events.wait_exec(str(base + i))
                if i == 0:
                    self.extra["agentd_rss_kib_1"] = rss_kib(pid)
            if bg:
                self.extra[f"agentd_rss_kib_{len(bg)}"] = rss_kib(pid)
                loaded = Runtime(f"agent@{len(bg)}", agent.start, agent.stop, agent.prepare)
                self.rows.append(loaded)
                print(f"[bench] agent with {len(bg)} cells running: {self.n} cells ...",
                      file=sys.stderr, flush=True)
                measure(loaded, self.events, self.n, self.marker_base())
                self.breakdown += steps(agent.client, loaded, lambda i: f"bench-{i}")
        finally:
            for name in bg:
                with contextlib.suppress(Exception):
                    agent.client.call("stop", name=name)
            agent.remove(bg)
        if self.boot_k:
            print(f"[bench] agent: restarts with {self.boot_k} cells to adopt ...",
                  file=sys.stderr, flush=True)
            try:
                self.boot(agent)
            except Exception as e:
                self.extra[f"boot_{self.boot_k}_cells"] = f"error: {type(e).__name__}: {e}"
        if self.burst_k:
            print(f"[bench] agent: a burst of {self.burst_k} runs ...", file=sys.stderr,
                  flush=True)
            for at_once in (True, False):
                key = f"burst_{self.burst_k}_{'at_once' if at_once else 'sequential'}_ms"
                try:
                    self.extra[key] = burst(agent, self.events, self.burst_k,
                                            self.marker_base(), at_once)
                except Exception as e:
                    self.extra[key] = f"error: {type(e).__name__}: {e}"

    def boot(self, agent: AgentRuntime, rounds: int = 3) -> None:
        """agentd stopped and started again with ``boot_k`` cells running: the time from
        the init script's start to the control socket's first answer, and to every cell
        adopted (``ps`` shows them running), medians of ``rounds``."""
        from agent.cli.client import Client

        names = [f"boot-{i}" for i in range(self.boot_k)]
        base = self.marker_base()
        answered: list[float] = []
        adopted: list[float] = []
        try:
            for i, name in enumerate(names):
                agent.manifest(name, str(base + i), vlan=102)
                agent.client.call("run", name=name)
                self.events.wait_exec(str(base + i))
            for _ in range(rounds):
                agent.client.close()
                subprocess.run([INIT, "stop"], capture_output=True, timeout=120, check=False)
                t0 = time.monotonic()
                init = subprocess.Popen([INIT, "start"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
                first: float | None = None
                done = False
                while not done and time.monotonic() < t0 + 120:
                    try:
                        with Client(agent.client.socket_path, timeout=5) as c:
                            c.call("status")
                            first = first or time.monotonic() - t0
                            rows = c.call("ps")
                    except Exception:
                        time.sleep(0.01)
                        continue
                    done = sum(r["name"] in names and r["state"] == "running"
                               for r in rows) == len(names)
                    if done:
                        adopted.append(time.monotonic() - t0)
                    else:
                        time.sleep(0.01)
                init.wait(timeout=120)
                if first is None or not done:
                    raise RuntimeError("agentd did not answer with every cell adopted")
                answered.append(first)
        finally:
            agent.client.close()
            for name in names:
                with contextlib.suppress(Exception):
                    agent.client.call("stop", name=name)
            agent.remove(names)
        k = self.boot_k
        self.extra[f"boot_to_answer_ms_{k}_cells"] = statistics.median(answered) * 1e3
        self.extra[f"boot_to_adopted_ms_{k}_cells"] = statistics.median(adopted) * 1e3

    def close(self) -> None:
        self.events.close()
        shutil.rmtree(self.work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=50, help="cells per row (sequential)")
    ap.add_argument("--only", nargs="*", default=["agent", "crun", "bwrap", "net"],
                    help="rows: agent crun bwrap net (the floor needs bwrap and net)")
    ap.add_argument("--background", type=int, default=32,
                    help="cells kept running for the agent's loaded row (0: none)")
    ap.add_argument("--burst", type=int, default=16, help="run requests at once (0: none)")
    ap.add_argument("--boot", type=int, default=8,
                    help="cells running while agentd is restarted (0: no restart)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("cellbench: run as root in the box")
    bench = Bench(args.n, args.background, args.burst, args.boot)
    try:
        bench.run(args.only)
    finally:
        bench.close()
    results: dict[str, object] = {"n": args.n, "kernel": os.uname().release,
                                  "machine": os.uname().machine}
    print(report(bench.rows, bench.extra, results))
    for line in bench.breakdown:  # the first step's figure includes the admission
        print(line)
    results["steps"] = bench.breakdown
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def _ratio(x: float, ref: float | None) -> str:
    return f"x{x / ref:.2f}" if ref else "-"


def report(rows: list[Runtime], extra: dict[str, object], results: dict[str, object]) -> str:
    """The table (ratios to crun's medians in their own columns), the floor row (bwrap's
    start plus the network alone), the burst and RSS lines; fills ``results``."""
    out = [f"cell start and stop, {results['n']} sequential cells per row, "
           f"{results.get('machine', '?')} {results.get('kernel', '?')}",
           f"{'row':<9} {'start med':>10} {'start p90':>10} {'stop med':>10} "
           f"{'stop p90':>10} {'helpers':>8} {'start/crun':>10} {'stop/crun':>10}"]
    figs: dict[str, tuple[float, float, float, float]] = {}
    for rt in rows:
        if rt.starts and not rt.error:
            figs[rt.name] = (*quantiles(rt.starts), *quantiles(rt.stops))
            s50, s90, t50, t90 = figs[rt.name]
            results[rt.name] = {"start_ms": rt.starts, "stop_ms": rt.stops,
                                "start_median": s50, "start_p90": s90,
                                "stop_median": t50, "stop_p90": t90}
    if "bwrap" in figs and "net" in figs:  # the floor: medians and p90s added
        figs["floor"] = tuple(a + b for a, b in  # type: ignore[assignment]
                              zip(figs["bwrap"], figs["net"], strict=True))
        results["floor"] = dict(zip(("start_median", "start_p90", "stop_median",
                                     "stop_p90"), figs["floor"], strict=True))
    crun = figs.get("crun")
    for name in [r.name for r in rows] + (["floor"] if "floor" in figs else []):
        if name not in figs:
            err = next((r.error for r in rows if r.name == name), "?")
            out.append(f"{name:<9} error: {err or 'no figures'}")
            continue
        s50, s90, t50, t90 = figs[name]
        h = extra.get(f"{name}_helpers_per_cell", "-")
        out.append(f"{name:<9} {s50:>8.1f}ms {s90:>8.1f}ms {t50:>8.1f}ms {t90:>8.1f}ms "
                   f"{h!s:>8} {_ratio(s50, crun and crun[0]):>10} "
                   f"{_ratio(t50, crun and crun[2]):>10}")
    out.append("net = the agent's network set-up alone (netns, gateway, veth on its VLAN); "
               "floor = bwrap + net (medians added, p90s added)")
    loaded = next((k for k in figs if k.startswith("agent@")), None)
    if "agent" in figs and loaded:
        a, b = figs["agent"], figs[loaded]
        out.append(f"{loaded} / agent (flat in the number of cells): start "
                   f"{_ratio(b[0], a[0])}, stop {_ratio(b[2], a[2])}")
    if "agent" in figs and "floor" in figs:
        out.append(f"agent / floor: start {_ratio(figs['agent'][0], figs['floor'][0])}")
    bursts = sorted(k for k in extra if k.startswith("burst_"))
    for k in bursts:
        v = extra[k]
        out.append(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    once = [extra[k] for k in bursts if k.endswith("at_once_ms")]
    seq = [extra[k] for k in bursts if k.endswith("sequential_ms")]
    if once and seq and isinstance(once[0], float) and isinstance(seq[0], float):
        out.append(f"burst at once / sequential: {_ratio(once[0], seq[0])}")
    for k in sorted(k for k in extra if k.startswith("boot_")):
        v = extra[k]
        out.append(f"{k}: {v:.1f} (from the init script's start)" if isinstance(v, float)
                   else f"{k}: {v}")
    rss = [k for k in extra if k.startswith("agentd_rss_kib_")]
    for k in sorted(rss, key=lambda k: (not k.endswith("idle"), len(k), k)):
        out.append(f"{k}: {extra[k]} KiB")
    results.update(extra)
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
