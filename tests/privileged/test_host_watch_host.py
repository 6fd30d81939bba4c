"""The host channel's sources on the host's real kernel (root only), each in something the
test makes and removes: rtnetlink and uevents in a network namespace of its own (a dummy
link added, addressed, routed, renamed, removed), the mount table of a child in a private
mount namespace, and the cancel-on-set timerfd against a clock set to the time it already
reads (the one change made outside the test's own objects: the clock moves by the few
microseconds between the read and the set).  Then the service over those same sources.
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from agent.kernel import libc
from agent.kernel.nlsock import McastSocket
from agent.kernel.timerfd import ClockWatch
from agent.monitor.host import adapter
from agent.monitor.host.rules import NetState, mount_changes, parse_mountinfo, parse_uevent
from agent.monitor.host.service import HostMonitor, Sources

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def in_thread(fn: Callable[[], T]) -> T:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # re-raised in the caller
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]  # type: ignore[no-any-return]


class Netns:
    """A network namespace held by an fd; :meth:`run` calls a function inside it."""

    def __init__(self) -> None:
        def make() -> int:
            libc.unshare(CLONE_NEWNET)
            return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.fd = in_thread(make)

    def run(self, fn: Callable[[], T]) -> T:
        def inside() -> T:
            libc.setns(self.fd, CLONE_NEWNET, "test netns")
            return fn()
        return in_thread(inside)

    def ip(self, fn: Callable[[IPRoute], Any]) -> None:
        def call() -> None:
            with IPRoute() as ipr:
                fn(ipr)
        self.run(call)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns()
    yield ns
    ns.close()


def drain(sock: McastSocket, until: Callable[[list[bytes]], bool],
          timeout: float = 10.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {len(got)} datagrams"
        select.select([sock.fileno()], [], [], left)
        got += sock.read(16).datagrams
    return got


def dummy(ipr: IPRoute) -> None:
    ipr.link("add", ifname="tdum0", kind="bridge")  # no dummy module here


def test_rtnetlink_groups_report_a_links_life(netns: Netns) -> None:
    sock = netns.run(adapter.open_rtnl)
    try:
        state = NetState("br-agent")
        for m in netns.run(adapter.dump_rtnl):  # lo, as the first dump sees it
            getattr(state, m.kind)(m.new, *m.args)
        assert [x.name for x in state.links.values()] == ["lo"]
        netns.ip(dummy)

        def setup(ipr: IPRoute) -> None:
            idx = ipr.link_lookup(ifname="tdum0")[0]
            ipr.link("set", index=idx, state="up")
            ipr.addr("add", index=idx, address="10.77.0.1", prefixlen=24)
            ipr.route("add", dst="10.78.0.0/16", gateway="10.77.0.2")
            ipr.link("set", index=idx, state="down")
            ipr.link("set", index=idx, ifname="tdum1")
            ipr.link("del", index=idx)
        netns.ip(setup)
        parse = adapter.RtnlParser()
        changes: list[tuple[str, str, Any]] = []

        def done(got: list[bytes]) -> bool:
            for data in got[len(done.seen):]:  # type: ignore[attr-defined]
                # the oracle: pyroute2's full decoding of the same datagram
                assert parse(data) == list(adapter.decode_rtnl(MarshalRtnl().parse(data)))
                for m in parse(data):
                    for c in getattr(state, m.kind)(m.new, *m.args):
                        changes.append((c.kind, c.attrs["action"], c.attrs.get("name")
                                        or c.attrs.get("dst")))
            done.seen = list(got)  # type: ignore[attr-defined]
            return ("link", "remove", "tdum1") in changes
        done.seen = []  # type: ignore[attr-defined]
        drain(sock, done)
    finally:
        sock.close()
    assert changes[0] == ("link", "add", "tdum0")
    for want in [("link", "up", "tdum0"), ("address", "add", "tdum0"),
                 ("route", "add", "10.78.0.0/16"), ("link", "down", "tdum0"),
                 ("link", "rename", "tdum1"), ("link", "remove", "tdum1")]:
        assert want in changes, (want, changes)
    assert changes.index(("route", "add", "10.78.0.0/16")) < changes.index(
        ("link", "down", "tdum0"))
    assert parse.bad == 0 and state.routes == set() and not any(
        a[0] != 1 for a in state.addrs)  # the link's address and route went with it


def test_uevents_of_a_netns_report_its_devices(netns: Netns) -> None:
    sock = netns.run(adapter.open_uevents)
    try:
        netns.ip(dummy)
        netns.ip(lambda ipr: ipr.link("del", ifname="tdum0"))
        events = []

        def done(got: list[bytes]) -> bool:
            events[:] = [u for u in map(parse_uevent, got) if u is not None]
            return any(u.action == "remove" for u in events)
        drain(sock, done)
    finally:
        sock.close()
    adds = [u for u in events if u.action == "add" and u.subsystem == "net"]
    assert adds and adds[0].devpath.endswith("/net/tdum0") and adds[0].env["INTERFACE"] == \
        "tdum0"
    assert any(u.action == "remove" and u.devpath.endswith("/tdum0") for u in events)


def test_the_mount_table_of_a_namespace_wakes_its_watcher_on_a_change(
        tmp_path: Path) -> None:
    child = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"read x; mount -t tmpfs -o size=1m tmark {tmp_path}; read x; "
         f"mount -o remount,ro {tmp_path}; read x; umount {tmp_path}; read x"],
        stdin=subprocess.PIPE)
    assert child.stdin is not None
    try:
        deadline = time.monotonic() + 10
        own = Path("/proc/self/ns/mnt").stat().st_ino
        while Path(f"/proc/{child.pid}/ns/mnt").stat().st_ino == own:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)  # unshare(1) sets the propagation, then execs sh
        table = adapter.MountTable(pid=child.pid)
        try:
            before = parse_mountinfo(table.read())
            assert not select.select([table.fileno()], [], [], 0.2)[0]  # nothing yet
            seen: list[tuple[str, str, str]] = []
            for _ in range(3):
                child.stdin.write(b"\n")
                child.stdin.flush()
                assert select.select([table.fileno()], [], [], 10)[0]  # POLLPRI, via epoll
                after = parse_mountinfo(table.read())
                seen += [(a, m.target, m.fstype) for a, m in mount_changes(before, after)]
                before = after
        finally:
            table.close()
    finally:
        child.stdin.close()
        child.wait(10)
    t = str(tmp_path)
    assert seen == [("mount", t, "tmpfs"), ("remount", t, "tmpfs"), ("umount", t, "tmpfs")]


def test_a_clock_set_cancels_the_timer() -> None:
    watch = ClockWatch()
    try:
        assert not select.select([watch], [], [], 0.1)[0]
        assert watch.check() is None  # nothing happened: no change
        time.clock_settime_ns(time.CLOCK_REALTIME, time.clock_gettime_ns(time.CLOCK_REALTIME))
        assert select.select([watch], [], [], 5)[0]
        delta = watch.check()
        assert delta is not None and abs(delta) < 0.5
        assert not select.select([watch], [], [], 0.1)[0]  # re-armed, quiet again
    finally:
        watch.close()


def test_the_service_over_real_sources(netns: Netns, tmp_path: Path) -> None:
    """Sources of a netns of the test's own and a fake proc tree for sysctls: a link
    added there is a ``host/link`` notice for the host (no trap explains it), the
    watched sysctl re-read on that hint and its drift reported."""
    (tmp_path / "sys/net/ipv4").mkdir(parents=True)
    fwd = tmp_path / "sys/net/ipv4/ip_forward"
    fwd.write_text("1\n")

    class NsSources(Sources):
        uevents = staticmethod(lambda: netns.run(adapter.open_uevents))
        rtnl = staticmethod(lambda: netns.run(adapter.open_rtnl))
        rtnl_dump = staticmethod(lambda: netns.run(adapter.dump_rtnl))

    events: list[tuple[str, str, str | None, str, dict[str, Any]]] = []

    class Bus:
        def emit(self, channel: str, kind: str, *, cell: str | None = None,
                 severity: str = "info", **attrs: Any) -> object:
            events.append((channel, kind, cell, severity, attrs))
            return None

        def add_sink(self, sink: Any, **kw: Any) -> None:
            pass

        def remove_sink(self, sink: Any) -> None:
            pass

    async def scenario() -> HostMonitor:
        mon = HostMonitor(Bus(), bridge="br-agent", own_mounts=(), proc=tmp_path,
                          sysctls=("net.ipv4.ip_forward",), sources=NsSources())
        await mon.start()
        try:
            assert mon.sysctls == {"net.ipv4.ip_forward": "1"}
            fwd.write_text("0\n")
            await asyncio.to_thread(netns.ip, dummy)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(e[1] == "sysctl" for e in events):
                await asyncio.sleep(0.05)
        finally:
            await mon.close()
        return mon

    mon = asyncio.run(scenario())
    assert all(v is None for v in mon.status()["sources"].values()), mon.status()
    links = [e for e in events if e[1] == "link"]
    assert links[0][2:] == (None, "notice", {"name": "tdum0", "index": links[0][4]["index"],
                                             "type": "bridge", "action": "add", "up": False,
                                             "by": None})
    assert any(e[1] == "uevent" and e[4]["devpath"].endswith("tdum0") for e in events)
    [sysctl] = [e for e in events if e[1] == "sysctl"]
    assert sysctl[2:] == (None, "notice", {"name": "net.ipv4.ip_forward", "old": "1",
                                           "new": "0", "by": None})
