"""The compiled filter and channel 2's service on the real kernel.

A probe is a forked child that installs the cell filter (with a listener, handed to the
test over SCM_RIGHTS, as a cell's pid 1 does) and makes exact raw syscalls; the test runs
:class:`agent.monitor.syscall.service.SyscallService` on an asyncio loop over that
listener, with an event recorder for a bus.  Host-wide operations run for real where a
throwaway namespace holds them (``sethostname`` in a thread's own UTS namespace,
``adjtimex`` read-only); the host clock of the development machine is never set here
(the box's guest tests set theirs).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from agent.core import seccomp as sc
from agent.core import syscalls as abi
from agent.kernel import libc as ksys
from agent.kernel import seccomp as notify
from agent.monitor.syscall import adapter
from agent.monitor.syscall.service import Granted, SyscallService, TrapLimits

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
PROG = sc.pack(sc.compile_filter(sc.FilterSpec()))
Call = tuple[str | int, Sequence[int | bytes]]


class Bus:
    """Records what the service publishes (the daemon's bus in agentd)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, channel: str, kind: str, *, cell: str | None = None,
             severity: str = "info", **attrs: Any) -> None:
        self.events.append({"channel": channel, "kind": kind, "cell": cell,
                            "severity": severity, **attrs})

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["channel"] == "syscall" and e["kind"] == kind]


class Host(adapter.HostOps):
    """sethostname for real in a thread's own UTS namespace; the clock recorded only."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.clock: list[int] = []

    def set_hostname(self, name: str, domain: bool = False) -> int:  # type: ignore[override]
        box: list[int] = []

        def run() -> None:
            ksys.unshare(abi.CLONE_NEWUTS)
            err = adapter.set_hostname(name, domain)
            if not err and not domain:
                assert socket.gethostname() == name
            box.append(err)

        t = threading.Thread(target=run)
        t.start()
        t.join()
        self.names.append(name)
        return box[0]

    def set_clock(self, ns: int) -> tuple[int, float]:  # type: ignore[override]
        self.clock.append(ns)
        return 0, round(ns / 1e9 - time.time(), 3)

    def adjtime(self, timex: bytes) -> tuple[int, int, bytes]:  # type: ignore[override]
        assert struct.unpack_from("<I", timex)[0] == 0, "only reads on a development host"
        return adapter.adjtime(timex)


def _raw(name: str | int, args: Sequence[int | bytes]) -> tuple[str, list[str]]:
    """Make one raw syscall; (errno name or ok, hex of each buffer argument after it)."""
    nr = name if isinstance(name, int) else abi.syscall_nr(name)
    assert nr is not None, name
    keep, cargs = [], []
    for a in args:
        if isinstance(a, bytes):
            buf = ctypes.create_string_buffer(a, max(len(a), 1))
            keep.append(buf)
            cargs.append(ctypes.c_long(ctypes.addressof(buf)))
        else:
            cargs.append(ctypes.c_long(a))
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(nr), *cargs)
    err = ctypes.get_errno() if ret < 0 else 0
    return (errno.errorcode.get(err, str(err)) if err else "ok"), [b.raw.hex() for b in keep]


def _probe(calls: Sequence[Call], w: int, sock: socket.socket) -> None:
    """The forked child: filter on, listener to the parent, the calls, results on ``w``."""
    try:
        ksys.set_no_new_privs()
        lfd = notify.install_filter(PROG, new_listener=True)
        assert lfd is not None
        socket.send_fds(sock, [b"L"], [lfd])
        os.close(lfd)
        out = [_raw(name, args) for name, args in calls]
        os.write(w, json.dumps(out).encode())
    finally:
        os._exit(0)


class Run:
    def __init__(self, results: list[tuple[str, list[str]]], bus: Bus, pid: int,
                 status: int, reboots: list[str]) -> None:  # fmt: skip
        self.results, self.bus, self.pid, self.status, self.reboots = (
            results, bus, pid, status, reboots)

    def errnos(self) -> list[str]:
        return [r[0] for r in self.results]


def run(calls: Sequence[Call], granted: frozenset[str] | Granted = frozenset(), *,
        host: adapter.HostOps | None = None, limits: TrapLimits | None = None) -> Run:
    """Fork a probe making ``calls`` under the cell filter; answer it with the service."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        parent.close()
        _probe(calls, w, child)
    os.close(w)
    child.close()
    bus, reboots = Bus(), []  # type: ignore[var-annotated]

    async def master() -> int:
        grants = granted if callable(granted) else (lambda cell: granted)
        svc = SyscallService(bus, grants, reboot=reboots.append,
                             host=host or Host(), limits=limits or TrapLimits())  # fmt: skip
        await svc.start()
        loop = asyncio.get_running_loop()
        _msg, fds, _f, _a = await asyncio.to_thread(socket.recv_fds, parent, 8, 1)
        svc.on_listener("probe", fds[0], pid)
        pidfd = os.pidfd_open(pid)
        done = loop.create_future()
        loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
        try:
            await asyncio.wait_for(done, 60)
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            await svc.close()
        return os.waitpid(pid, 0)[1]

    try:
        status = asyncio.run(master())
        with os.fdopen(r, "rb") as f:
            raw = f.read()
    finally:
        parent.close()
    results = json.loads(raw) if raw else []
    return Run(results, bus, pid, status, reboots)


# -- the filter alone, and with no master -------------------------------------------------


def _in_filtered_child(calls: Sequence[Call], keep_listener: bool = False
                       ) -> list[str]:  # fmt: skip
    """Fork, install the filter and drop the listener (nobody will ever answer), run."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            ksys.set_no_new_privs()
            lfd = notify.install_filter(PROG, new_listener=True)
            assert lfd is not None
            os.close(lfd)
            os.write(w, json.dumps([_raw(n, a)[0] for n, a in calls]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return list(json.loads(text))


def test_allow_list_and_fail_closed_without_a_master() -> None:
    """With no listener left, what the master would decide fails ENOSYS: never runs."""
    got = _in_filtered_child([
        ("getpid", ()), ("unshare", (0x400,)),  # allowed (CLONE_FILES: no namespace)
        ("socket", (abi.AF_UNIX, socket.SOCK_DGRAM, 0)),
        ("socket", (abi.AF_NETLINK, socket.SOCK_RAW, abi.NETLINK_ROUTE)),
        ("keyctl", (0, 0, 0)), ("bpf", (0, 0, 0)), ("ptrace", (0, 0, 0, 0)),  # reported
        ("unshare", (abi.CLONE_NEWNS,)), ("sethostname", (b"x", 1)),  # denied / trapped
        ("socket", (abi.AF_VSOCK, socket.SOCK_STREAM, 0)),
        ("clone3", (0, 0)), ("fsopen", (b"tmpfs", 0)),  # ENOSYS: callers fall back
        ("kcmp", (0, 0, 0, 0, 0)), ("lsm_list_modules", (0, 0, 0)),  # not on the list
    ])  # fmt: skip
    assert got[:4] == ["ok"] * 4, got
    assert got[4:] == ["ENOSYS"] * 10, got


def test_a_waiting_trapped_call_gets_enosys_when_the_listener_closes() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        parent.close()
        _probe([("sethostname", (b"waiting", 7))], w, child)
    os.close(w)
    child.close()
    try:
        _m, fds, _f, _a = socket.recv_fds(parent, 8, 1)
        lfd = fds[0]
        assert select.select([lfd], [], [], 20)[0], "the call never trapped"
        n = notify.recv_notif(lfd)  # received, never answered: the call waits
        assert n is not None and n.syscall() == "sethostname"
        assert not select.select([r], [], [], 0.5)[0]  # still waiting in the kernel
        os.close(lfd)  # the last copy: the master is gone
        with os.fdopen(r, "rb") as f:
            assert json.loads(f.read()) == [["ENOSYS", [b"waiting".hex()]]]
    finally:
        parent.close()
        os.waitpid(pid, 0)


# -- the service: denied, killed, traps ------------------------------------------------------


def test_escape_attempts_are_refused_and_reported_with_their_controls() -> None:
    calls: list[Call] = [
        ("ptrace", (0, 0, 0, 0)), ("bpf", (0, 0, 0)), ("keyctl", (0, 0, 0)),
        ("setns", (0, 0)), ("unshare", (abi.CLONE_NEWUSER,)),
        ("clone", (abi.CLONE_NEWNET | signal.SIGCHLD, 0, 0, 0, 0)),
        ("io_uring_setup", (1, b"\0" * 120)), ("perf_event_open", (b"\0" * 128, 0, -1, -1, 0)),
        ("socket", (abi.AF_VSOCK, socket.SOCK_STREAM, 0)),
        ("socket", (abi.AF_NETLINK, socket.SOCK_DGRAM, abi.NETLINK_KOBJECT_UEVENT)),
        ("socket", (abi.AF_ALG, socket.SOCK_SEQPACKET, 0)),
        ("mknodat", (-100, b"/tmp/agent-never\0", abi.S_IFCHR | 0o600, 0x103)),
        ("personality", (0x0040000,)), ("init_module", (0, 0, b"\0")),
        ("finit_module", (-1, b"\0", 0)),
        # controls: the same calls where the policy allows them
        ("socket", (abi.AF_UNIX, socket.SOCK_DGRAM, 0)),
        ("socket", (abi.AF_NETLINK, socket.SOCK_DGRAM, abi.NETLINK_ROUTE)),
        ("personality", (0xFFFFFFFF,)), ("unshare", (0,)), ("getppid", ()),
    ]  # fmt: skip
    got = run(calls)
    e = got.errnos()
    assert e[:8] == ["EPERM"] * 8, e
    assert e[8:11] == ["EAFNOSUPPORT"] * 3, e
    assert e[11:15] == ["EPERM"] * 4, e
    assert e[15:] == ["ok"] * 5, e
    denied = got.bus.of("denied")
    names = [d["syscall"] for d in denied]
    assert names == ["ptrace", "bpf", "keyctl", "setns", "unshare", "clone", "io_uring_setup",
                     "perf_event_open", "socket", "socket", "socket", "mknodat",
                     "personality"], names  # fmt: skip
    for d in denied:
        assert d["cell"] == "probe" and d["verdict"] == "denied" and d["hpid"] == got.pid
        assert d["pid"] == got.pid and d["comm"] and d["exe"]  # no pid ns here: pid = hpid
    traps = got.bus.of("trap")
    assert [(t["syscall"], t["op"], t["verdict"]) for t in traps] == [
        ("init_module", "none", "denied"), ("finit_module", "none", "denied")]


def test_a_foreign_abi_call_kills_the_process_and_is_reported() -> None:
    if abi.HOST_ARCH != "x86_64":
        pytest.skip("the x32 bit is an x86_64 thing (the box tests an arm32 binary)")
    got = run([("getpid", ()), (0x40000000 | 39, ()), ("getpid", ())])
    assert os.WIFSIGNALED(got.status) and os.WTERMSIG(got.status) == signal.SIGKILL
    assert got.results == []  # it never reached its report
    killed = got.bus.of("killed")
    assert len(killed) == 1, got.bus.events
    k = killed[0]
    assert (k["syscall"], k["arch"], k["verdict"], k["hpid"]) == ("getpid", "x32", "killed",
                                                                   got.pid)
    assert k["severity"] == "alert"


def test_set_hostname_granted_refused_and_bad_arguments() -> None:
    calls: list[Call] = [("sethostname", (b"cellbox", 7)), ("setdomainname", (b"lan", 3)),
                         ("sethostname", (b"bad;name", 8)), ("sethostname", (b"x" * 65, 65)),
                         ("sethostname", (0x10, 4))]  # fmt: skip
    host = Host()
    got = run(calls, frozenset({"set_hostname"}), host=host)
    assert got.errnos() == ["ok", "ok", "EINVAL", "EINVAL", "EFAULT"], got.results
    assert host.names == ["cellbox", "lan"]
    traps = got.bus.of("trap")
    assert [(t["verdict"], t.get("error")) for t in traps] == [
        ("allowed", None), ("allowed", None), ("denied", "EINVAL"), ("denied", "EINVAL"),
        ("denied", "EFAULT")]
    assert traps[0]["op"] == "set_hostname" and traps[0]["name"] == "cellbox"
    refused = run(calls[:1], frozenset({"set_time"}), host=(h2 := Host()))
    assert refused.errnos() == ["EPERM"] and h2.names == []
    assert refused.bus.of("trap")[0]["reason"] == "operation not granted"


def test_set_time_granted_refused_and_adjtimex_read() -> None:
    now = int(time.time())
    timespec = struct.pack("<qq", now + 5, 250_000_000)
    timex = b"\0" * 208  # modes 0: a read
    calls: list[Call] = [("clock_settime", (0, timespec)), ("clock_settime", (1, timespec)),
                         ("clock_settime", (0, struct.pack("<qq", 86400, 0))),
                         ("settimeofday", (struct.pack("<qq", now, 7), 0)),
                         ("settimeofday", (struct.pack("<qq", now, 0), struct.pack("<ii", 0, 0))),
                         ("adjtimex", (timex,)),
                         ("adjtimex", (struct.pack("<I", 0x40000) + b"\0" * 204,))]  # fmt: skip
    host = Host()
    got = run(calls, frozenset({"set_time"}), host=host)
    e = got.errnos()
    assert e == ["ok", "EINVAL", "EINVAL", "ok", "EPERM", "ok", "EINVAL"], got.results
    assert host.clock == [(now + 5) * 10**9 + 250_000_000, now * 10**9 + 7000]
    out = bytes.fromhex(got.results[5][1][0])
    tick = struct.unpack_from("<q", out, 88)[0]  # adjtimex wrote the struct back (10000)
    assert out != timex and tick > 0, out.hex()
    assert got.bus.of("trap")[0]["delta_s"] > 0
    refused = run(calls[:1], frozenset(), host=(h2 := Host()))
    assert refused.errnos() == ["EPERM"] and h2.clock == []


def test_reboot_granted_refused_and_bad_magic() -> None:
    m1, m2 = 0xFEE1DEAD, 672274793
    calls: list[Call] = [("reboot", (m1, m2, 0, 0)), ("reboot", (m1, 1, 0x01234567, 0)),
                         ("reboot", (m1, m2, 0x01234567, 0))]  # CAD off, bad magic, restart
    got = run(calls, frozenset({"reboot"}))
    assert got.errnos() == ["EPERM", "EINVAL", "ok"], got.results
    assert got.reboots == ["restart"]
    assert got.bus.of("trap")[-1]["how"] == "restart"
    refused = run(calls[2:], frozenset({"set_time"}))
    assert refused.errnos() == ["EPERM"] and refused.reboots == []


def test_a_trap_flood_is_metered_and_stays_answered() -> None:
    calls: list[Call] = [("sethostname", (b"x", 1))] * 300
    got = run(calls, limits=TrapLimits(rate=200.0, burst=50.0))
    assert got.errnos() == ["EPERM"] * 300
    throttled = [e for e in got.bus.events if e["kind"] == "throttled"]
    assert throttled and all(e["what"] == "traps" for e in throttled)
    assert len(got.bus.of("trap")) == 300


def test_a_trap_waits_for_the_cells_grants_while_agentd_starts() -> None:
    """Until the manager knows the cell (None), its trap waits instead of being refused."""
    t0 = time.monotonic()

    def granted(cell: str) -> frozenset[str] | None:
        return None if time.monotonic() - t0 < 1.0 else frozenset({"set_hostname"})

    host = Host()
    got = run([("sethostname", (b"later", 5))], granted, host=host)
    assert got.errnos() == ["ok"] and host.names == ["later"]
    assert time.monotonic() - t0 >= 1.0
