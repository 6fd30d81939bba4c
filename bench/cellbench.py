"""Cell start/stop latency, agent vs crun vs bwrap, side by side in one boot of the box.

Run it with ``bench/run cells`` (boots the emulated box and runs this inside), or in the
box as ``python3 /mnt/src/bench/cellbench.py``.  It prints figures, never pass/fail.

What is measured, for each runtime, over N sequential cells (default 50):

* start: from the request (the control message to agentd; the ``crun run`` or ``bwrap``
  command for the peers) to the service's first instruction.  "First instruction" is
  the kernel's exec event for the service's binary, taken from the proc connector: its
  timestamp is CLOCK_MONOTONIC in the kernel, so the figure does not depend on when
  this process gets to read the event.
* stop: from the stop request to everything freed (agentd's reply comes after its
  destroy plan; for crun: kill, delete, veth and netns removed; for bwrap: the
  sandbox's processes reaped).

The same read-only image (the demo image), the same namespaces (pid, mount, uts, ipc,
net, cgroup) and, for agentd and crun, a veth on the same VLAN-filtering bridge.
Also: agentd's RSS with 1 and with 32 cells running, and the number of helper
processes each runtime leaves per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE = Path("/usr/share/agent/images/demo")
SERVICES = Path("/etc/agent/services")
BRIDGE = "agbr0"

# --- the proc connector: exec events with kernel timestamps ---------------------------------

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_EVENT_EXEC = 0x00000002


class ExecEvents:
    """Exec events (pid, kernel monotonic ns) from the proc connector."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((os.getpid(), CN_IDX_PROC))
        op = struct.pack("=I", PROC_CN_MCAST_LISTEN)
        cn = struct.pack("=IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(op), 0) + op
        nl = struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, os.getpid()) + cn  # NLMSG_DONE
        self.sock.send(nl)

    def wait_exec(self, marker: str, timeout: float = 20.0) -> int:
        """Kernel timestamp (ns) of the exec whose argv contains ``marker``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no exec of {marker!r} within {timeout} s")
            self.sock.settimeout(left)
            data = self.sock.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length = struct.unpack_from("=I", data, off)[0]
                ev = data[off + 16 + 20: off + length]
                off += (length + 3) & ~3
                if len(ev) < 24:
                    continue
                what, _cpu, ts = struct.unpack_from("=IIQ", ev)
                if what != PROC_EVENT_EXEC:
                    continue
                pid = struct.unpack_from("=I", ev, 16)[0]
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if marker.encode() in argv:
                    return int(ts)

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


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


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

    def manifest(self, i: int, marker: str) -> None:
        (SERVICES / f"bench-{i}.toml").write_text(f'''
name = "bench-{i}"
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
vlan = 100
[lifecycle]
mode = "service"
restart = "no"
''')

    def start(self, i: int, marker: str) -> None:
        self.client.call("run", name=f"bench-{i}")

    def stop(self, i: int) -> None:
        self.client.call("stop", name=f"bench-{i}")

    def cleanup(self, n: int) -> None:
        for i in range(n):
            (SERVICES / f"bench-{i}.toml").unlink(missing_ok=True)


class CrunRuntime:
    """Debian's crun with an OCI bundle over the same image, netns with a veth on the bridge."""

    def __init__(self, work: Path) -> None:
        from pyroute2 import IPRoute

        from agent.kernel import bridge as kbr
        from agent.kernel import net, netns

        self.kbr, self.net, self.kns = kbr, net, netns
        self.ipr = IPRoute()
        self.work = work
        kbr.ensure_bridge(self.ipr, BRIDGE)
        kbr.ensure_vlan_gateway(self.ipr, BRIDGE, 300, "10.78.0.1/24")

    def config(self, i: int, marker: str, netns: Path) -> dict[str, object]:
        return {
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["/bin/busybox", "sleep",
                                                                  marker],
                "env": ["PATH=/bin"], "noNewPrivileges": True,
                "capabilities": {k: [] for k in ("bounding", "effective", "permitted")},
            },
            "root": {"path": str(IMAGE), "readonly": True},
            "hostname": f"crun-{i}",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "noexec", "size=4m"]},
            ],
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc", "cgroup")]
                + [{"type": "network", "path": str(netns)}],
                "cgroupsPath": f"/bench-crun/c{i}",
                "resources": {"memory": {"limit": 16 << 20},
                              "cpu": {"quota": 20000, "period": 100000},
                              "pids": {"limit": 8}},
            },
        }

    def start(self, i: int, marker: str) -> None:
        netns = self.kns.create_cell_netns(f"crun{i}")
        self.net.create_cell_link(self.ipr, f"crun{i}", netns, BRIDGE, 300,
                                  f"10.78.0.{2 + i % 250}/24", "10.78.0.1")
        bundle = self.work / f"c{i}"
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(self.config(i, marker, netns)))
        # The container inherits crun's stdio: not a pipe, or run() would wait for it.
        subprocess.run(["crun", "run", "--detach", "--bundle", str(bundle), f"c{i}"],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def stop(self, i: int) -> None:
        subprocess.run(["crun", "kill", f"c{i}", "KILL"], capture_output=True)
        _sh("crun", "delete", "--force", f"c{i}")
        self.net.destroy_cell_link(self.ipr, f"crun{i}")
        self.kns.destroy_cell_netns(f"crun{i}")

    def cleanup(self, n: int) -> None:
        self.kbr.remove_vlan_gateway(self.ipr, BRIDGE, 300)
        self.ipr.close()


class BwrapRuntime:
    """Debian's bubblewrap: same image and namespaces (its net namespace has only lo)."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, i: int, marker: str) -> None:
        self.procs[i] = subprocess.Popen(
            ["bwrap", "--unshare-all", "--unshare-cgroup", "--ro-bind", str(IMAGE), "/",
             "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--hostname", f"bw-{i}",
             "--cap-drop", "ALL", "--", "/bin/busybox", "sleep", marker])

    def stop(self, i: int) -> None:
        p = self.procs.pop(i)
        p.kill()
        p.wait()

    def cleanup(self, n: int) -> None:
        pass


# --- measuring ---------------------------------------------------------------------------------


def quantiles(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, round(0.9 * (len(xs) - 1)))]
    return statistics.median(xs), p90


def measure(rt: Runtime, events: ExecEvents, n: int, base: int) -> None:
    for i in range(n):
        marker = str(base + i)
        rt.prepare(i, marker)
        t0 = time.monotonic_ns()
        rt.start(i, marker)
        ts = events.wait_exec(marker)
        rt.starts.append((ts - t0) / 1e6)
        t1 = time.monotonic_ns()
        rt.stop(i)
        rt.stops.append((time.monotonic_ns() - t1) / 1e6)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=50, help="cells per runtime (sequential)")
    ap.add_argument("--only", nargs="*", default=["agent", "crun", "bwrap"])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("cellbench: run as root in the box")
    work = Path(tempfile.mkdtemp(prefix="cellbench-"))
    events = ExecEvents()
    results: dict[str, object] = {"n": args.n, "kernel": os.uname().release,
                                  "machine": os.uname().machine}
    runtimes: list[Runtime] = []
    extra: dict[str, object] = {}
    base = 700000
    for name in args.only:
        impl: AgentRuntime | CrunRuntime | BwrapRuntime
        if name == "agent":
            impl = AgentRuntime()
        elif name == "crun":
            if not shutil.which("crun"):
                continue
            impl = CrunRuntime(work)
        else:
            if not shutil.which("bwrap"):
                continue
            impl = BwrapRuntime()
        rt = Runtime(name, impl.start, impl.stop)
        if isinstance(impl, AgentRuntime):
            rt.prepare = impl.manifest
        print(f"[bench] {name}: {args.n} sequential cells ...", file=sys.stderr, flush=True)
        try:
            measure(rt, events, args.n, base)
            base += 1000
            extra[f"{name}_helpers_per_cell"] = helpers_per_cell(rt, events, 4, base)
            base += 1000
            if name == "agent":
                pid = agentd_pid()
                idle = rss_kib(pid)
                for i in range(32):
                    rt.prepare(i, str(base + i))
                impl.start(0, str(base))
                events.wait_exec(str(base))
                one = rss_kib(pid)
                for i in range(1, 32):
                    impl.start(i, str(base + i))
                    events.wait_exec(str(base + i))
                many = rss_kib(pid)
                for i in range(32):
                    impl.stop(i)
                base += 1000
                extra.update(agentd_rss_kib_idle=idle, agentd_rss_kib_1=one,
                             agentd_rss_kib_32=many)
        except Exception as e:  # a figure missing is reported, never hidden
            import traceback

            traceback.print_exc()
            rt.error = f"{type(e).__name__}: {e}"
        finally:
            impl.cleanup(max(args.n, 32))
        runtimes.append(rt)
    events.close()
    shutil.rmtree(work, ignore_errors=True)
    report(runtimes, extra, results, args.json)
    return 0


def report(runtimes: list[Runtime], extra: dict[str, object], results: dict[str, object],
           path: str | None) -> None:
    print(f"\ncell start and stop, {results['n']} sequential cells each, "
          f"{results['machine']} {results['kernel']}")
    print(f"{'runtime':<8} {'start med':>10} {'start p90':>10} {'stop med':>10} "
          f"{'stop p90':>10} {'helpers':>8}")
    by = {}
    for rt in runtimes:
        if rt.error or not rt.starts:
            print(f"{rt.name:<8} error: {rt.error}")
            continue
        s50, s90 = quantiles(rt.starts)
        t50, t90 = quantiles(rt.stops)
        by[rt.name] = (s50, t50)
        h = extra.get(f"{rt.name}_helpers_per_cell", "?")
        print(f"{rt.name:<8} {s50:>8.1f}ms {s90:>8.1f}ms {t50:>8.1f}ms {t90:>8.1f}ms "
              f"{h!s:>8}")
        results[rt.name] = {"start_ms": rt.starts, "stop_ms": rt.stops,
                            "start_median": s50, "start_p90": s90,
                            "stop_median": t50, "stop_p90": t90}
    if "agent" in by:
        for peer in ("crun", "bwrap"):
            if peer in by:
                a, p = by["agent"], by[peer]
                print(f"agent/{peer}: start x{a[0] / p[0]:.2f}, stop x{a[1] / p[1]:.2f} "
                      "(medians; < 1 means the agent is faster)")
    for k in ("agentd_rss_kib_idle", "agentd_rss_kib_1", "agentd_rss_kib_32"):
        if k in extra:
            print(f"{k}: {extra[k]} KiB")
    results.update(extra)
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
