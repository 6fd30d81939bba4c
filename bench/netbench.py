"""Traffic between two cells with channel 3 on and off, side by side in one boot of the box.

Run it with ``bench/run net`` (boots the emulated box and runs this inside), or in the box
as ``python3 -P /mnt/src/bench/netbench.py``.  It prints figures, never pass/fail.

Two cells wired exactly as agentd wires them (agent.kernel.net: netns, veth on a
VLAN-filtering bridge, one VLAN each, routed by the host), with the cells' own tables
and the host's forwarding table (agent.kernel.nft.FirewallSync); the client's manifest
names the server's ports 5001 (a sink) and 5002 (an echo).  Two configurations,
alternated over several rounds so drift in the host's load hits both alike:

* ``off``: the forwarding policy and the cells' tables only;
* ``on``: channel 3 as agentd runs it: the bridge's layer-2 table on the cell ports
  and the monitor (agent.monitor.net.service.NetMonitor, on an asyncio loop of its own
  here, with an event bus) holding the conntrack socket (so the kernel generates an
  event per new connection) and the NFLOG sockets of the host and of both cells.

Workloads, from inside the client's netns to the server's: ``stream`` (one connection,
32 MiB: MB/s), ``rr`` (one connection, 2000 round trips of 64 bytes: microseconds per
round trip) and ``conn`` (300 new connections, one byte each way: connections per
second, where the conntrack events cost most).  For each, the median of the rounds per
configuration and the ratio on/off of the time per unit of work (target: at most 1.05).

agentd is stopped for the measurement (its own monitor would hold a conntrack socket in
the host's netns and so make the kernel generate events in ``off`` too) and started
again afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

BRIDGE = "nbbr0"
POOL = IPv4Network("10.88.0.0/16")
SERVER, CLIENT = "nb-srv", "nb-cli"
ADDR = {SERVER: ("10.88.0.2/24", "10.88.0.1", 400), CLIENT: ("10.88.1.2/24", "10.88.1.1", 401)}

SERVE = r"""
import socket, threading
def sink(c):
    n = 0
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
def echo(c):
    while True:
        b = c.recv(4096)
        if not b:
            break
        c.sendall(b)
    c.close()
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128)
    while True:
        c, _ = s.accept()
        threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(5001, sink), daemon=True).start()
print("ready", flush=True)
serve(5002, echo)
"""

WORK = r"""
import json, socket, sys, time
addr, mode = sys.argv[1], sys.argv[2]
if mode == "stream":
    total, chunk = 32 << 20, b"x" * (1 << 16)
    t = time.perf_counter()
    s = socket.create_connection((addr, 5001))
    for _ in range(total // len(chunk)):
        s.sendall(chunk)
    s.shutdown(socket.SHUT_WR)
    got = int(s.recv(64)); s.close()
    dt = time.perf_counter() - t
    assert got == total, got
    print(json.dumps({"unit": "MB", "n": total / 1e6, "s": dt}))
elif mode == "rr":
    n, msg = 2000, b"y" * 64
    s = socket.create_connection((addr, 5002))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t = time.perf_counter()
    for _ in range(n):
        s.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(s.recv(4096))
    dt = time.perf_counter() - t
    s.close()
    print(json.dumps({"unit": "round trip", "n": n, "s": dt}))
else:
    n = 300
    t = time.perf_counter()
    for _ in range(n):
        s = socket.create_connection((addr, 5002))
        s.sendall(b"z")
        s.recv(1)
        s.close()
    dt = time.perf_counter() - t
    print(json.dumps({"unit": "connection", "n": n, "s": dt}))
"""


def sh(*argv: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if r.returncode:
        raise RuntimeError(f"{argv}: {r.stderr.strip()}")
    return r.stdout


def agentd_up() -> bool:
    return subprocess.run(["agentctl", "ping"], capture_output=True).returncode == 0


def agentd_process() -> bool:
    """An agentd process exists (up, or still importing after boot)."""
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and b"/usr/bin/agentd" in (d / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def stop_agentd() -> bool:
    """Stop the box's agentd (True if there was one).  One still starting after boot is
    waited for first: stopped half-way it would miss the stop, and once up it would
    collect the benchmark's netns and veths (``cell-*``, ``vc-*``) as orphans."""
    if not agentd_process():
        return False
    deadline = time.monotonic() + 300
    while not agentd_up():
        if time.monotonic() > deadline:
            raise RuntimeError("agentd neither up nor gone after 300 s")
        time.sleep(1)
    sh("/etc/init.d/S50agentd", "stop")
    return True


class Monitor:
    """agentd's channel-3 monitor on a loop of its own (a thread), with a bus."""

    def __init__(self, netns: dict[str, Path]) -> None:
        from agent.daemon.bus import EventBus
        from agent.monitor.net.service import CellNet, NetMonitor

        cells = [CellNet(n, ADDR[n][0].split("/")[0], ADDR[n][1], None, p, True)
                 for n, p in netns.items()]

        class Cells:
            def net_cells(self) -> list[CellNet]:
                return cells

        self.loop = asyncio.new_event_loop()
        self.bus = EventBus()
        self.mon = NetMonitor(self.bus, POOL)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.mon.start(self.loop, Cells())
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(30)
        deadline = time.monotonic() + 30  # the cells' sockets open on the loop
        while len(self.mon.status()["sockets"]) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)

    def close(self) -> dict[str, Any]:
        fut = asyncio.run_coroutine_threadsafe(self.mon.aclose(), self.loop)
        fut.result(30)
        status = self.mon.status()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()
        return status


class Topology:
    def __init__(self) -> None:
        from pyroute2 import IPRoute

        from agent.core import firewall as fw
        from agent.core.firewall import CellFw
        from agent.core.manifest import Peer
        from agent.kernel import bridge as kbr
        from agent.kernel import net, netns
        from agent.kernel.nft import FirewallSync, Nft

        self.kbr, self.net, self.kns = kbr, net, netns
        self.ipr = IPRoute()
        kbr.ensure_bridge(self.ipr, BRIDGE)
        kbr.enable_ip_forward()
        self.netns: dict[str, Path] = {}
        for cell, (addr, gw, vlan) in ADDR.items():
            kbr.ensure_vlan_gateway(self.ipr, BRIDGE, vlan, f"{gw}/24")
            self.netns[cell] = netns.create_cell_netns(cell)
            net.create_cell_link(self.ipr, cell, self.netns[cell], BRIDGE, vlan, addr, gw)
        srv = CellFw(SERVER, 400, "10.88.0.2", gateway="10.88.0.1")
        cli = CellFw(CLIENT, 401, "10.88.1.2", peers=(Peer(SERVER, (5001, 5002)),),
                     gateway="10.88.1.1")
        self.cells = [srv, cli]
        sync = FirewallSync(Nft(), BRIDGE, lambda c: self.netns[c], l2=False)
        for c in self.cells:
            sync.apply_cell(c.name, fw.cell_ruleset(c, self.cells))
        assert sync.refresh(self.cells, [c.name for c in self.cells]) == []
        self.server = subprocess.Popen(["nsenter", f"--net={self.netns[SERVER]}", "python3",
                                        "-I", "-c", SERVE], stdout=subprocess.PIPE, text=True)
        assert self.server.stdout is not None
        assert self.server.stdout.readline().strip() == "ready"

    def channel3(self, on: bool) -> None:
        """The layer-2 table in or out (the forwarding policy stays in both)."""
        from agent.core import l2fw
        from agent.kernel.nft import FirewallSync, Nft

        if on:  # what agentd applies: the host table (unchanged) and the layer-2 table
            sync = FirewallSync(Nft(), BRIDGE, lambda c: self.netns[c], l2=True)
            errors = sync.refresh(self.cells, [c.name for c in self.cells])
            assert errors == [], errors
        else:
            Nft().delete_table(l2fw.L2_TABLE, family=l2fw.FAMILY)

    def work(self, mode: str) -> dict[str, Any]:
        out = sh("nsenter", f"--net={self.netns[CLIENT]}", "python3", "-I", "-c", WORK,
                 "10.88.0.2", mode)
        res: dict[str, Any] = json.loads(out)
        return res

    def close(self) -> None:
        from agent.kernel.nft import FirewallSync, Nft

        self.server.kill()
        self.server.wait()
        FirewallSync(Nft(), BRIDGE, lambda c: self.netns[c]).refresh([], [])
        for cell, (_, _, vlan) in ADDR.items():
            self.net.destroy_cell_link(self.ipr, cell)
            self.kns.destroy_cell_netns(cell)
            self.kbr.remove_vlan_gateway(self.ipr, BRIDGE, vlan)
        self.kbr.delete_bridge(self.ipr, BRIDGE)
        self.ipr.close()


MODES = ("stream", "rr", "conn")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-r", "--rounds", type=int, default=5)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("netbench: run as root in the box (bench/run net)", file=sys.stderr)
        return 2
    had_agentd = stop_agentd()
    print(f"[bench] agentd {'stopped' if had_agentd else 'not running'}", file=sys.stderr,
          flush=True)
    topo = Topology()
    per: dict[str, dict[str, list[float]]] = {c: {m: [] for m in MODES} for c in ("off", "on")}
    events: dict[str, int] = {}
    try:
        for mode in MODES:  # warm up: first connections, ARP, page cache
            topo.work(mode)
        for r in range(args.rounds):
            for cfg in (("off", "on") if r % 2 == 0 else ("on", "off")):
                topo.channel3(cfg == "on")
                mon = Monitor(topo.netns) if cfg == "on" else None
                try:
                    for mode in MODES:
                        res = topo.work(mode)
                        per[cfg][mode].append(res["s"] / res["n"])
                finally:
                    if mon is not None:
                        status = mon.close()
                        for k, v in status["events"].items():
                            events[k] = events.get(k, 0) + v
                        if status["failed"] or status["errors"] or status["lost"]:
                            print(f"[bench] monitor: {status}", file=sys.stderr)
                print(f"[bench] round {r + 1} {cfg}: " + ", ".join(
                    f"{m} {per[cfg][m][-1] * 1e6:.1f} us" for m in MODES),
                    file=sys.stderr, flush=True)
    finally:
        topo.close()
        if had_agentd:
            sh("/etc/init.d/S50agentd", "start")
    report(per, events, args.rounds, args.json)
    return 0


UNITS = {"stream": ("MB/s", lambda s: 1 / s), "rr": ("us/round trip", lambda s: s * 1e6),
         "conn": ("conn/s", lambda s: 1 / s)}


def report(per: dict[str, dict[str, list[float]]], events: dict[str, int], rounds: int,
           path: str | None) -> None:
    u = os.uname()
    print(f"\ntraffic between two cells on two VLANs (routed by the host), {rounds} rounds "
          f"each, {u.machine} {u.release}")
    print(f"{'workload':<8} {'off':>10} {'on':>10} {'unit':<14} {'on/off (time)':>13}  "
          "spread off/on")
    results: dict[str, Any] = {"rounds": rounds, "events": events}
    for m in MODES:
        unit, conv = UNITS[m]
        off, on = statistics.median(per["off"][m]), statistics.median(per["on"][m])
        ratio = on / off

        def spread(xs: list[float]) -> str:
            return f"{(max(xs) - min(xs)) / statistics.median(xs) * 100:.0f}%"

        print(f"{m:<8} {conv(off):>10.1f} {conv(on):>10.1f} {unit:<14} {ratio:>13.3f}  "
              f"{spread(per['off'][m])}/{spread(per['on'][m])}")
        results[m] = {"off_s_per_unit": per["off"][m], "on_s_per_unit": per["on"][m],
                      "ratio": ratio, "unit": unit}
    print("target: on/off at most 1.05 (time per unit of work; medians)")
    print(f"channel-3 events published while on: {events}")
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
