"""agent.monitor.host.service on a loop with the real event bus and a fake proc tree for
the sysctls (the kernel sources for real: tests/privileged/test_host_watch_host.py):
a storm of hints costs one sysctl check per second, a change just after a cell's allowed
trap is that cell's, a source that cannot be opened is one event and the rest go on."""

from __future__ import annotations

import asyncio
import errno
import time
from pathlib import Path
from typing import Any

from agent.core.errors import KernelError
from agent.core.events import Event
from agent.daemon.bus import EventBus
from agent.monitor.host.service import SYSCTL_MIN_INTERVAL_S, HostMonitor, Sources


def refuse() -> Any:
    raise KernelError("bind", "test source", errno.EPERM, "not in this test")


class NoSources(Sources):
    uevents = staticmethod(refuse)
    rtnl = staticmethod(refuse)
    clock = staticmethod(refuse)
    mounts = staticmethod(refuse)


def proc_tree(tmp: Path, **values: str) -> Path:
    for name, value in values.items():
        path = tmp / ("sys/" + name.replace("__", "/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return tmp


def sysctl(tmp: Path, name: str) -> Path:
    return tmp / ("sys/" + name.replace(".", "/"))


def test_a_storm_of_hints_is_one_check_per_second_and_drift_is_reported(
        tmp_path: Path) -> None:
    proc_tree(tmp_path, net__ipv4__ip_forward="1")

    async def scenario() -> tuple[EventBus, HostMonitor, float]:
        bus = EventBus()
        mon = HostMonitor(bus, bridge="br0", own_mounts=(), proc=tmp_path,
                          sysctls=("net.ipv4.ip_forward",), sources=NoSources())
        await mon.start()
        t0 = time.monotonic()
        sysctl(tmp_path, "net.ipv4.ip_forward").write_text("0\n")
        while time.monotonic() - t0 < 1.5:
            for _ in range(100):
                mon.hint()
            await asyncio.sleep(0.01)
        await asyncio.sleep(SYSCTL_MIN_INTERVAL_S + 0.1)
        await mon.close()
        return bus, mon, time.monotonic() - t0

    bus, mon, span = asyncio.run(scenario())
    assert mon.counts["hints"] >= 1000
    assert 1 <= mon.counts["sysctl_checks"] <= span / SYSCTL_MIN_INTERVAL_S + 1
    failed = bus.recent(50, channel="master")
    assert {e.attrs["monitor"] for e in failed} == {"host:uevent", "host:rtnl", "host:clock",
                                                     "host:mount"}
    [ev] = bus.recent(50, channel="host", kind="sysctl")
    assert (ev.cell, ev.severity) == (None, "notice")
    assert dict(ev.attrs) == {"name": "net.ipv4.ip_forward", "old": "1", "new": "0",
                              "by": None}


def test_a_change_after_an_allowed_trap_is_that_cells(tmp_path: Path) -> None:
    proc_tree(tmp_path, kernel__hostname="box", kernel__core_pattern="core")

    async def scenario() -> EventBus:
        bus = EventBus()
        mon = HostMonitor(bus, bridge="br0", own_mounts=(), proc=tmp_path,
                          sysctls=("kernel.hostname", "kernel.core_pattern"),
                          sources=NoSources())
        await mon.start()
        sysctl(tmp_path, "kernel.hostname").write_text("tv\n")
        sysctl(tmp_path, "kernel.core_pattern").write_text("|/tmp/x\n")
        bus.emit("syscall", "trap", cell="tv", severity="notice", syscall="sethostname",
                 op="set_hostname", verdict="allowed", pid=1, hpid=99)
        bus.emit("syscall", "trap", cell="web", severity="notice", syscall="sethostname",
                 op="set_hostname", verdict="denied", pid=1, hpid=98)
        await asyncio.sleep(0.3)
        await mon.close()
        return bus

    bus = asyncio.run(scenario())
    got = {e.attrs["name"]: e for e in bus.recent(50, channel="host", kind="sysctl")}
    assert (got["kernel.hostname"].cell, got["kernel.hostname"].attrs["by"]) == ("tv", "tv")
    assert got["kernel.hostname"].severity == "notice"
    # the trap explains the hostname, not the core pattern: that is the host's, an alert
    core = got["kernel.core_pattern"]
    assert (core.cell, core.severity, core.attrs["by"]) == (None, "alert", None)


def test_events_of_other_channels_and_kinds_are_ignored(tmp_path: Path) -> None:
    mon = HostMonitor(EventBus(), bridge="br0", own_mounts=(), proc=tmp_path, sysctls=(),
                      sources=NoSources())
    mon.on_event(Event(0.0, "tv", "syscall", "denied", {"syscall": "mknod"}))
    assert mon.counts["hints"] == 0 and len(mon.attributor.traps) == 0
