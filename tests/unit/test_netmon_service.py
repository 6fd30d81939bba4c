"""agent.monitor.net.service on a real asyncio loop and event bus, with its sockets
replaced by datagram socketpairs that the test writes kernel-shaped messages into.
The kernel's own sockets are in tests/privileged/test_netmon_host.py."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from test_netmon_wire import ct_new, ipv4, log_msg

from agent.core.errors import KernelError
from agent.core.events import Event
from agent.daemon.bus import EventBus
from agent.monitor.net import service
from agent.monitor.net.diagwire import Listener
from agent.monitor.net.service import CellNet, NetMonitor

POOL = IPv4Network("10.77.0.0/16")


@dataclass(eq=False)
class FakeSock:
    what: str
    lost: int = 0
    fail_read: bool = False
    closed: bool = False
    reads: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rx, self.tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.rx.setblocking(False)

    def fileno(self) -> int:
        return self.rx.fileno()

    def read(self, max_datagrams: int) -> list[bytes]:
        if self.fail_read:
            raise KernelError("recv", self.what, 9)
        out = []
        while len(out) < max_datagrams:
            try:
                out.append(self.rx.recv(65536))
            except BlockingIOError:
                break
        self.reads.append(len(out))
        return out

    def close(self) -> None:
        self.closed = True
        self.rx.close()
        self.tx.close()


@dataclass
class FakeDiag:
    what: str
    listening: list[Listener] = field(default_factory=list)
    fail: bool = False
    closed: bool = False
    dumps: int = 0

    def listeners(self) -> tuple[list[Listener], bool]:
        if self.fail:
            raise KernelError("sock_diag dump", self.what, 105, "test")
        self.dumps += 1
        return list(self.listening), True

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeOpener:
    socks: dict[str, FakeSock] = field(default_factory=dict)
    fail: set[str] = field(default_factory=set)
    diags: dict[str, FakeDiag] = field(default_factory=dict)

    def _make(self, key: str) -> FakeSock:
        if key in self.fail:
            raise KernelError("nfnetlink request", key, 1, "test")
        s = self.socks[key] = FakeSock(key)
        return s

    def conntrack(self, pool: IPv4Network) -> FakeSock:
        return self._make("ct")

    def nflog(self, group: int, netns: Path | None) -> FakeSock:
        return self._make("log" if netns is None else netns.name)

    def diag(self, netns: Path) -> FakeDiag:
        if f"diag:{netns.name}" in self.fail:
            raise KernelError("socket NETLINK_SOCK_DIAG", netns.name, 1, "test")
        old = self.diags.get(netns.name)
        d = self.diags[netns.name] = FakeDiag(netns.name, old.listening if old else [])
        return d


@dataclass
class FakeCells:
    cells: list[CellNet]

    def net_cells(self) -> list[CellNet]:
        return list(self.cells)


WEB = CellNet("web", "10.77.0.2", "10.77.0.1", None, Path("/run/netns/cell-web"), True)
CLIENT = CellNet("client", "10.77.1.2", "10.77.1.1", 100_000, Path("/run/netns/cell-client"),
                 True)


async def settle(mon: NetMonitor, rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0.01)
        if mon._sync_task is not None:
            await asyncio.gather(mon._sync_task, return_exceptions=True)


async def started(bus: EventBus, op: FakeOpener, cells: FakeCells) -> NetMonitor:
    """A monitor on the running loop with the fake sockets, its first sync done."""
    mon = NetMonitor(bus, POOL, opener=op)
    mon.start(asyncio.get_running_loop(), cells)
    await settle(mon)
    return mon


def net_events(bus: EventBus, kind: str = "*") -> list[Event]:
    return bus.recent(channel="net", kind=kind)


@pytest.fixture
def setup() -> tuple[EventBus, FakeOpener, FakeCells]:
    return EventBus(), FakeOpener(), FakeCells([WEB, CLIENT])


def test_events_from_every_socket_name_the_right_cell(
        setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup

    async def main() -> None:
        mon = await started(bus, op, cells)
        assert set(op.socks) == {"ct", "log", "cell-web", "cell-client"}
        op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2"))
        syn = ipv4("10.77.1.2", "10.77.0.2", 6, b"\x9c\x40\x1f\x91" + b"\0" * 16)
        op.socks["log"].tx.send(log_msg("agent:deny", syn, hook=2))
        op.socks["cell-client"].tx.send(log_msg(
            "agent:spoof", ipv4("10.77.0.2", "10.77.0.9", 17, b"\0\1\0\2\0\0\0\0"),
            uid=101_000))
        await settle(mon)
        got = [(e.cell, e.kind, e.severity) for e in net_events(bus)]
        assert got == [("client", "flow", "info"), ("client", "flow-denied", "notice"),
                       ("client", "l2-drop", "alert")]
        assert net_events(bus, "l2-drop")[0].attrs["uid"] == 1000
        assert mon.status()["events"] == {"flow": 1, "flow-denied": 1, "l2-drop": 1}
        await mon.aclose()
        assert all(s.closed for s in op.socks.values())

    asyncio.run(main())


def test_reads_are_bounded_per_callback(setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup

    async def main() -> None:
        mon = NetMonitor(bus, POOL, opener=op, flow_window_s=60)
        mon.start(asyncio.get_running_loop(), cells)
        await settle(mon)
        ct = op.socks["ct"]
        for i in range(100):
            ct.tx.send(ct_new("10.77.1.2", "10.77.0.2", sport=1000 + i))
        await settle(mon, 20)
        assert sum(ct.reads) == 100 and max(ct.reads) <= service.MAX_DATAGRAMS
        # one event for the pair now, the 99 others counted for the window's end
        assert [e.attrs["count"] for e in net_events(bus, "flow")] == [1]
        await mon.aclose()

    asyncio.run(main())


def test_windows_close_on_a_timer(setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup

    async def main() -> None:
        mon = NetMonitor(bus, POOL, opener=op, flow_window_s=0.2)
        mon.start(asyncio.get_running_loop(), cells)
        await settle(mon)
        for i in range(3):
            op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2", sport=1000 + i))
        await settle(mon)
        await asyncio.sleep(0.4)  # nothing else arrives: the timer closes the window
        assert [e.attrs["count"] for e in net_events(bus, "flow")] == [1, 2]
        await mon.aclose()

    asyncio.run(main())


def test_cells_come_and_go_with_lifecycle_events(
        setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup
    cells.cells = [WEB]

    async def main() -> None:
        mon = await started(bus, op, cells)
        assert "cell-client" not in op.socks
        cells.cells = [WEB, CLIENT]
        bus.emit("lifecycle", "running", cell="client")
        await settle(mon)
        assert not op.socks["cell-client"].closed
        web = op.socks["cell-web"]
        cells.cells = [CLIENT]
        bus.emit("lifecycle", "destroying", cell="web")
        await settle(mon)
        assert "client" in mon._cell and "web" not in mon._cell
        assert not web.closed  # read a little longer: the kernel logs in batches
        await asyncio.sleep(service.RETIRE_S * 3)
        assert web.closed
        # the address directory follows: a flow from web's old address is nobody's
        op.socks["ct"].tx.send(ct_new("10.77.0.2", "10.77.1.2"))
        await settle(mon)
        assert net_events(bus, "flow") == []
        await mon.aclose()
        assert bus.sink_stats() == []  # its lifecycle sink is gone too

    asyncio.run(main())


def test_the_last_drops_of_a_cell_that_ended_at_once_are_reported(
        monkeypatch: pytest.MonkeyPatch, setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    """A cell that is refused a forged packet and exits at once: the kernel sends the log
    batch after its state left the firewall (seen in the box); it is still read, with
    the uid inside the cell, and the socket closed after RETIRE_S."""
    bus, op, cells = setup
    monkeypatch.setattr(service, "RETIRE_S", 0.2)

    async def main() -> None:
        mon = await started(bus, op, cells)
        client = op.socks["cell-client"]
        cells.cells = [WEB]
        bus.emit("lifecycle", "exited", cell="client")
        await settle(mon)
        assert "client" not in mon._cell and not client.closed
        client.tx.send(log_msg("agent:spoof", ipv4("10.77.0.2", "10.77.0.9", 17,
                                                   b"\0\1\0\2\0\0\0\0"), uid=101_000))
        await settle(mon)
        (drop,) = net_events(bus, "l2-drop")
        assert drop.cell == "client" and drop.attrs["uid"] == 1000
        await asyncio.sleep(0.5)
        assert client.closed and mon._retired == set()
        # one gone at shutdown is closed with the rest
        web = op.socks["cell-web"]
        cells.cells = []
        bus.emit("lifecycle", "exited", cell="web")
        await settle(mon)
        await mon.aclose()
        assert web.closed

    asyncio.run(main())


def test_failures_are_events_and_retried(monkeypatch: pytest.MonkeyPatch,
                                         setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup
    op.fail = {"ct", "cell-web"}
    monkeypatch.setattr(service, "RETRY_S", 0.1)

    async def main() -> None:
        mon = await started(bus, op, cells)
        failed = net_events(bus, "monitor-failed")
        assert {(e.cell, e.severity) for e in failed} == {(None, "alert"), ("web", "alert")}
        assert "log" in op.socks and "cell-client" in op.socks  # the others work
        op.fail.clear()
        await asyncio.sleep(0.3)
        await settle(mon)
        assert "ct" in op.socks and "cell-web" in op.socks and not mon.status()["failed"]
        # a socket that breaks while reading: closed, reported, opened again
        broken = op.socks["log"]
        broken.fail_read = True
        broken.tx.send(b"x")
        await settle(mon)
        assert broken.closed and len(net_events(bus, "monitor-failed")) == 3
        await asyncio.sleep(0.3)
        assert op.socks["log"] is not broken and not op.socks["log"].closed
        # an overrun is counted and reported
        op.socks["ct"].lost = 2
        op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2"))
        await settle(mon)
        (lost,) = net_events(bus, "monitor-lost")
        assert lost.attrs["overruns"] == 2 and mon.status()["lost"] == 2
        await mon.aclose()

    asyncio.run(main())


def test_garbage_and_foreign_prefixes_do_not_stop_the_channel(
        setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup

    async def main() -> None:
        mon = await started(bus, op, cells)
        op.socks["log"].tx.send(b"\xff" * 40)
        op.socks["log"].tx.send(log_msg("someone else", ipv4("1.1.1.1", "2.2.2.2", 6, b"")))
        op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2"))
        await settle(mon)
        assert [e.kind for e in net_events(bus)] == ["flow"]
        assert mon.status()["ignored"] == 1 and mon.status()["errors"] == 0
        await mon.aclose()

    asyncio.run(main())


def test_a_new_cell_gets_its_socket_from_its_create_plan(
        setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    """The plan's thread opens the socket right after the table is applied, before the
    service starts; the re-syncs of a cell still being created keep it (and do not try
    to open one themselves: its netns may not hold the table yet)."""
    from agent.kernel.nft import FirewallSync

    bus, op, cells = setup
    cells.cells = [WEB]
    sync = FirewallSync(None, "agbr0", lambda c: Path(f"/run/netns/cell-{c}"))  # type: ignore[arg-type]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        mon = NetMonitor(bus, POOL, opener=op)
        mon.start(loop, cells, sync)
        await settle(mon)
        creating = CellNet("client", "10.77.1.2", "10.77.1.1", 100_000,
                           Path("/run/netns/cell-client"), False)
        cells.cells = [WEB, creating]
        bus.emit("lifecycle", "creating", cell="client")
        await settle(mon)
        assert "cell-client" not in op.socks  # not while the plan runs
        # the plan's worker thread: what FirewallSync.apply_cell calls
        await asyncio.to_thread(sync.on_cell_table[0], "client", creating.netns)
        await settle(mon)
        early = op.socks["cell-client"]
        bus.emit("lifecycle", "creating", cell="client")
        await settle(mon)
        assert mon._cell["client"].sock is early and not early.closed
        early.tx.send(log_msg("agent:out", ipv4("10.77.1.2", "10.77.0.9", 6, b"\0" * 20)))
        await settle(mon)
        assert [e.cell for e in net_events(bus, "flow-denied")] == ["client"]
        cells.cells = [WEB]  # the plan failed: the cell is gone
        bus.emit("lifecycle", "failed", cell="client")
        await settle(mon)
        assert "client" not in mon._cell and early in {s.sock for s in mon._retired}
        await mon.aclose()
        assert early.closed
        assert sync.on_cell_table == []

    asyncio.run(main())


def test_conntrack_events_switched_off_is_a_clear_error(tmp_path: Path) -> None:
    from agent.monitor.net import adapter

    sysctl = tmp_path / adapter.EVENTS_SYSCTL
    sysctl.parent.mkdir(parents=True)
    sysctl.write_text("0\n")
    with pytest.raises(KernelError) as exc:
        adapter.open_conntrack(POOL, proc=tmp_path)
    assert "nf_conntrack_events" in str(exc.value) and exc.value.hint


def tcp(port: int, uid: int = 0, address: str = "0.0.0.0") -> Listener:
    return Listener("tcp", address, port, uid, 1000 + port)


def test_listeners_are_reported_when_they_appear_and_again_after_closing(
        monkeypatch: pytest.MonkeyPatch, setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup
    monkeypatch.setattr(service, "POLL_S", 0.05)

    async def main() -> None:
        mon = await started(bus, op, cells)
        assert set(op.diags) == {"cell-web", "cell-client"}
        op.diags["cell-web"].listening = [tcp(8080), tcp(8080, address="::")]
        op.diags["cell-client"].listening = [tcp(4444, uid=101_000, address="10.77.1.2")]
        await asyncio.sleep(0.2)
        got = [(e.cell, e.attrs) for e in net_events(bus, "listen")]
        assert got == [("web", {"proto": "tcp", "port": 8080, "address": "0.0.0.0",
                                "uid_host": 0}),
                       ("client", {"proto": "tcp", "port": 4444, "address": "10.77.1.2",
                                   "uid": 1000})]
        assert all(e.severity == "info" for e in net_events(bus, "listen"))
        op.diags["cell-web"].listening = []  # closed ...
        await asyncio.sleep(0.2)
        assert len(net_events(bus, "listen")) == 2
        op.diags["cell-web"].listening = [tcp(8080)]  # ... and open again: new again
        await asyncio.sleep(0.2)
        assert [e.cell for e in net_events(bus, "listen")] == ["web", "client", "web"]
        await mon.aclose()
        assert all(d.closed for d in op.diags.values())

    asyncio.run(main())


def test_a_reached_listener_is_reported_before_its_flow(
        setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup  # (the poll is 2 s away: only the flow makes it look)

    async def main() -> None:
        mon = await started(bus, op, cells)
        op.diags["cell-web"].listening = [tcp(8080)]
        op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2", dport=8080))
        op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2", sport=40001, dport=8080))
        await settle(mon)
        got = [(e.cell, e.kind) for e in net_events(bus) if e.kind in ("listen", "flow")]
        assert got == [("web", "listen"), ("client", "flow")]
        assert op.diags["cell-web"].dumps == 1  # known now: the second flow did not look
        # a flow to a port nobody listens on (a UDP one, or one refused): no listen event
        op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2", proto=17, dport=53))
        op.socks["ct"].tx.send(ct_new("10.77.1.2", "10.77.0.2", dport=9999))
        await settle(mon)
        assert len(net_events(bus, "listen")) == 1
        assert op.diags["cell-web"].dumps == 2  # the TCP one looked, the UDP one did not
        await mon.aclose()

    asyncio.run(main())


def test_a_failing_listener_dump_is_reported_and_its_socket_made_again(
        monkeypatch: pytest.MonkeyPatch, setup: tuple[EventBus, FakeOpener, FakeCells]) -> None:
    bus, op, cells = setup
    monkeypatch.setattr(service, "POLL_S", 0.05)
    monkeypatch.setattr(service, "RETRY_S", 0.1)

    async def main() -> None:
        mon = await started(bus, op, cells)
        first = op.diags["cell-web"]
        first.fail = True
        first.listening = [tcp(80)]
        await asyncio.sleep(0.1)
        failed = net_events(bus, "monitor-failed")
        assert [(e.cell, e.severity) for e in failed] == [("web", "alert")]
        assert first.closed
        await asyncio.sleep(0.4)
        assert op.diags["cell-web"] is not first  # made again, and read
        assert [e.attrs["port"] for e in net_events(bus, "listen")] == [80]
        assert mon.status()["failed"] == {}
        await mon.aclose()

    asyncio.run(main())
