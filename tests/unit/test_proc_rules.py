"""agent.monitor.proc.rules: the proc connector's messages, the pid cache that attributes
them to cells, the events they become and a cell's process tree (pure, no kernel)."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hypothesis import given
from hypothesis import strategies as st

from agent.monitor.proc.rules import (
    CN_IDX_PROC,
    CN_VAL_PROC,
    COMM,
    EXEC,
    EXIT,
    FORK,
    NONE,
    UID,
    Info,
    Msg,
    Tracker,
    ack_of,
    listen_message,
    map_id,
    parse,
    tree_order,
    wait_status,
)

# --- the wire format, packed the way linux/cn_proc.h lays it out ------------------------


def datagram(what: int, data: bytes, *, idx: int = CN_IDX_PROC, val: int = CN_VAL_PROC,
             ack: int = 0, ts: int = 7) -> bytes:
    ev = struct.pack("=IIQ", what, 0, ts) + data
    cn = struct.pack("=IIIIHH", idx, val, 0, ack, len(ev), 0) + ev
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


def fork(ppid: int, ptgid: int, pid: int, tgid: int) -> bytes:
    return datagram(FORK, struct.pack("=IIII", ppid, ptgid, pid, tgid))


def exec_(pid: int, tgid: int | None = None) -> bytes:
    return datagram(EXEC, struct.pack("=II", pid, pid if tgid is None else tgid))


def uid(pid: int, ruid: int, euid: int) -> bytes:
    return datagram(UID, struct.pack("=IIII", pid, pid, ruid, euid))


def exit_(pid: int, status: int, tgid: int | None = None) -> bytes:
    return datagram(EXIT, struct.pack("=IIiiII", pid, pid if tgid is None else tgid,
                                      status, 17, 1, 1))


def comm(pid: int, name: bytes) -> bytes:
    return datagram(COMM, struct.pack("=II", pid, pid) + name.ljust(16, b"\0"))


def test_parse_reads_each_kind_of_message() -> None:
    assert parse(fork(10, 10, 11, 11)) == [Msg(FORK, 11, 11, 10, 10, ts_ns=7)]
    assert parse(exec_(11)) == [Msg(EXEC, 11, 11, ts_ns=7)]
    assert parse(uid(11, 1000, 0)) == [Msg(UID, 11, 11, a=1000, b=0, ts_ns=7)]
    assert parse(exit_(11, 3 << 8)) == [Msg(EXIT, 11, 11, 1, 1, a=768, b=17, ts_ns=7)]
    assert parse(comm(11, b"worker")) == [Msg(COMM, 11, 11, comm="worker", ts_ns=7)]


def test_parse_reads_an_old_kernels_shorter_exit() -> None:
    """Before 4.18 the exit carried no parent: 16 bytes, the parent reads 0."""
    short = datagram(EXIT, struct.pack("=IIii", 11, 11, 9, 17))
    assert parse(short) == [Msg(EXIT, 11, 11, 0, 0, a=9, b=17, ts_ns=7)]


def test_parse_skips_what_is_not_a_process_event() -> None:
    assert parse(datagram(FORK, struct.pack("=IIII", 1, 1, 2, 2), idx=4)) == []
    assert parse(datagram(FORK, struct.pack("=IIII", 1, 1, 2, 2), val=9)) == []
    assert parse(datagram(0x40, b"\0" * 24)) == []  # ptrace: not followed
    assert parse(datagram(FORK, b"\0" * 8)) == []  # truncated payload
    assert parse(b"") == [] and parse(b"\x01\x02") == []
    err = struct.pack("=IHHII", 36, 2, 0, 0, 0) + b"\0" * 20  # NLMSG_ERROR
    assert parse(err) == []


def test_parse_reads_several_messages_of_one_datagram_and_stops_at_bad_framing() -> None:
    two = fork(1, 1, 2, 2) + exec_(2)
    assert [m.what for m in parse(two)] == [FORK, EXEC]
    bad = bytearray(exec_(3))
    struct.pack_into("=I", bad, 0, 4000)  # longer than the datagram
    assert [m.what for m in parse(two + bytes(bad))] == [FORK, EXEC]


@given(st.binary(max_size=300))
def test_parse_never_raises_on_any_bytes(data: bytes) -> None:
    for m in parse(data):
        assert m.what in (FORK, EXEC, UID, EXIT, COMM, NONE)


@given(st.lists(st.tuples(st.sampled_from(["fork", "exec", "uid", "exit"]),
                          st.integers(1, 2**22), st.integers(0, 2**31 - 1)), max_size=20))
def test_parse_round_trips_what_the_kernel_packs(msgs: list[tuple[str, int, int]]) -> None:
    data, want = b"", []
    for kind, pid, n in msgs:
        if kind == "fork":
            data += fork(n % 99 + 1, n % 99 + 1, pid, pid)
            want.append(Msg(FORK, pid, pid, n % 99 + 1, n % 99 + 1, ts_ns=7))
        elif kind == "exec":
            data += exec_(pid)
            want.append(Msg(EXEC, pid, pid, ts_ns=7))
        elif kind == "uid":
            data += uid(pid, n, n // 2)
            want.append(Msg(UID, pid, pid, a=n, b=n // 2, ts_ns=7))
        else:
            data += exit_(pid, n & 0xFFFF)
            want.append(Msg(EXIT, pid, pid, 1, 1, a=n & 0xFFFF, b=17, ts_ns=7))
    assert parse(data) == want


def test_listen_message_and_its_ack() -> None:
    msg = listen_message(True, 41)
    length, mtype = struct.unpack_from("=IH", msg)
    assert length == len(msg) == 40 and mtype == 3
    assert struct.unpack_from("=IIIIHH", msg, 16)[:4] == (CN_IDX_PROC, CN_VAL_PROC, 0, 41)
    assert struct.unpack_from("=I", msg, 36) == (1,)
    assert struct.unpack_from("=I", listen_message(False), 36) == (2,)
    ack = datagram(NONE, struct.pack("=I", 0), ack=42)
    assert ack_of(ack, 41) == 0
    assert ack_of(datagram(NONE, struct.pack("=I", 1), ack=42), 41) == 1  # EPERM
    assert ack_of(ack, 40) is None  # someone else's answer
    assert ack_of(exec_(1), 41) is None and ack_of(b"short", 41) is None


def test_wait_status_and_id_maps() -> None:
    assert wait_status(3 << 8) == (3, 0, False)
    assert wait_status(9) == (0, 9, False)
    assert wait_status(0x80 | 11) == (0, 11, True)
    m = "         0     100000      65536\n"
    assert map_id(m, 100000) == 0 and map_id(m, 101000) == 1000
    assert map_id(m, 0) is None and map_id(m, 165536) is None
    assert map_id("0 0 4294967295\n", 5) == 5
    assert map_id("garbage\n1 2\n", 1) is None


# --- the tracker, over a fake /proc ------------------------------------------------------


@dataclass
class FakeProc:
    """The processes the tracker may look up: hpid -> (cell, Info); uid maps per cell."""

    procs: dict[int, tuple[str | None, Info]] = field(default_factory=dict)
    offset: dict[str, int] = field(default_factory=dict)  # a cell's uid map base
    calls: list[tuple[str, int]] = field(default_factory=list)

    def add(self, hpid: int, cell: str | None, ppid: int, comm: str = "sh",
            exe: str = "/bin/sh", uid: int = 100000, nspid: int | None = None) -> None:
        self.procs[hpid] = (cell, Info(nspid if nspid is not None else hpid - 1000, ppid,
                                       comm, exe, uid, uid))

    def cell_of(self, hpid: int) -> str | None:
        self.calls.append(("cell_of", hpid))
        p = self.procs.get(hpid)
        return None if p is None else p[0]

    def nspid(self, hpid: int) -> int | None:
        self.calls.append(("nspid", hpid))
        p = self.procs.get(hpid)
        return None if p is None else p[1].nspid

    def describe(self, hpid: int) -> Info | None:
        self.calls.append(("describe", hpid))
        p = self.procs.get(hpid)
        return None if p is None else p[1]

    def cell_uid(self, hpid: int, uid: int) -> int | None:
        p = self.procs.get(hpid)
        if p is None or p[0] is None:
            return None
        base = self.offset.get(p[0], 100000)
        return uid - base if base <= uid < base + 65536 else None


AGENTD = 500


def run(t: Tracker, *datagrams: bytes) -> list[tuple[str, str, dict[str, object], str]]:
    out = []
    for d in datagrams:
        for m in parse(d):
            o = t.handle(m)
            if o is not None:
                out.append((o.cell, o.kind, o.attrs, o.severity))
    return out


def started_cell(fp: FakeProc) -> Tracker:
    """agentd (500) forks 1001, which the host's root moves into ``web`` and which execs:
    the way every cell starts."""
    t = Tracker(fp, self_pid=AGENTD)
    fp.add(1001, "web", AGENTD)  # already moved when the fork is read: no matter
    assert run(t, fork(AGENTD, AGENTD, 1001, 1001)) == []
    assert 1001 not in t.procs and fp.calls == []  # agentd's child: no lookup, no entry
    fp.add(1001, "web", AGENTD, comm="httpd", exe="/bin/httpd", nspid=1)
    [(cell, kind, attrs, sev)] = run(t, exec_(1001))
    assert (cell, kind, sev) == ("web", "exec", "info")
    assert attrs == {"pid": 1, "hpid": 1001, "ppid": None, "comm": "httpd",
                     "exe": "/bin/httpd"}
    return t


def test_a_cell_starts_and_its_children_inherit_its_cell_without_lookups() -> None:
    fp = FakeProc()
    t = started_cell(fp)
    fp.add(1002, "web", 1001, nspid=2)
    fp.calls.clear()
    [(cell, kind, attrs, _)] = run(t, fork(1001, 1001, 1002, 1002))
    assert (cell, kind) == ("web", "fork")
    assert attrs == {"pid": 2, "hpid": 1002, "ppid": 1, "comm": "httpd", "exe": "/bin/httpd"}
    assert ("cell_of", 1002) not in fp.calls  # inherited, not looked up
    fp.add(1002, "web", 1001, comm="true", exe="/bin/true", nspid=2)
    [(_, kind, attrs, _)] = run(t, exec_(1002))
    assert kind == "exec" and attrs["ppid"] == 1 and attrs["exe"] == "/bin/true"
    [(_, kind, attrs, _)] = run(t, exit_(1002, 3 << 8))
    assert kind == "exit" and attrs["code"] == 3 and attrs["signal"] == 0
    assert attrs["comm"] == "true" and 1002 not in t.procs
    assert t.cells() == {"web": 1}


def test_host_processes_make_no_events_and_are_cached_once() -> None:
    fp = FakeProc()
    t = Tracker(fp, self_pid=AGENTD)
    fp.add(300, None, 1)
    fp.add(301, None, 300)
    assert run(t, fork(300, 300, 301, 301), exec_(301), exit_(301, 0)) == []
    assert fp.calls.count(("cell_of", 301)) == 2  # at the fork, again at the exec
    assert run(t, exec_(300)) == []  # the parent is cached now, for the host
    fp.calls.clear()
    fp.add(302, None, 300)
    assert run(t, fork(300, 300, 302, 302)) == []
    assert fp.calls == [] and t.procs[302].cell is None  # inherited: no lookup


def test_a_process_the_hosts_root_moves_into_a_cell_is_seen_from_its_exec() -> None:
    fp = FakeProc()
    t = Tracker(fp, self_pid=AGENTD)
    fp.add(300, None, 1)
    assert run(t, fork(1, 1, 300, 300)) == []
    assert t.procs[300].cell is None
    fp.add(300, "web", 1, comm="moved", nspid=9)  # `echo 300 > .../web/cgroup.procs`
    [(cell, kind, attrs, _)] = run(t, exec_(300))
    assert (cell, kind, attrs["comm"]) == ("web", "exec", "moved")


def test_threads_are_not_processes() -> None:
    fp = FakeProc()
    t = started_cell(fp)
    assert run(t, fork(1001, 1001, 1005, 1001), exec_(1005, 1001),
               exit_(1005, 0, 1001)) == []
    assert 1005 not in t.procs and 1001 in t.procs and t.counts["threads"] == 3


def test_an_unknown_process_is_looked_up_once_at_its_first_event() -> None:
    """It started before agentd, or its fork was lost."""
    fp = FakeProc()
    t = Tracker(fp, self_pid=AGENTD)
    fp.add(2000, "db", 1999, comm="db", nspid=1)
    fp.add(2001, "db", 2000, comm="db", nspid=2)
    [(cell, kind, attrs, _)] = run(t, fork(2000, 2000, 2001, 2001))
    assert (cell, kind, attrs["ppid"]) == ("db", "fork", None)
    fp.calls.clear()
    [(cell, kind, _, _)] = run(t, exit_(2001, 0))
    assert (cell, kind) == ("db", "exit") and fp.calls == []


def test_a_process_gone_before_its_exec_is_read_still_has_its_exec_and_exit() -> None:
    fp = FakeProc()
    t = started_cell(fp)
    fp.add(1002, "web", 1001, nspid=2)
    run(t, fork(1001, 1001, 1002, 1002))
    del fp.procs[1002]
    out = run(t, exec_(1002), exit_(1002, 1 << 8))
    assert [(c, k) for c, k, _, _ in out] == [("web", "exec"), ("web", "exit")]
    assert out[0][2] == {"pid": 2, "hpid": 1002, "ppid": 1, "comm": "", "exe": ""}
    assert out[1][2]["code"] == 1 and 1002 not in t.procs


def test_an_exit_of_an_unknown_process_is_dropped_and_a_gone_one_leaves_nothing() -> None:
    fp = FakeProc()
    t = Tracker(fp, self_pid=AGENTD)
    assert run(t, exit_(4242, 0)) == []
    # gone before its exec was read: no event, and its exit (which follows) clears it
    assert run(t, exec_(4243), uid(4243, 1, 1), exit_(4243, 0)) == []
    assert 4243 not in t.procs and len(t) == 0


def test_uid_changes_in_cell_terms_and_becoming_root_is_a_notice() -> None:
    fp = FakeProc()
    t = started_cell(fp)
    fp.add(1002, "web", 1001, uid=101000, nspid=2)
    run(t, fork(1001, 1001, 1002, 1002), exec_(1002))
    [(_, kind, attrs, sev)] = run(t, uid(1002, 101000, 101001))
    assert kind == "uid" and sev == "info"
    assert (attrs["uid"], attrs["euid"], attrs["was_euid"]) == (1000, 1001, 1000)
    assert (attrs["huid"], attrs["heuid"]) == (101000, 101001)
    [(_, _, attrs, sev)] = run(t, uid(1002, 101000, 100000))
    assert sev == "notice" and attrs["euid"] == 0 and attrs["was_euid"] == 1001
    [(_, _, _, sev)] = run(t, uid(1002, 100000, 100000))  # root already: no news
    assert sev == "info"


def test_comm_renames_the_cached_process() -> None:
    fp = FakeProc()
    t = started_cell(fp)
    assert run(t, comm(1001, b"worker")) == []
    [(_, _, attrs, _)] = run(t, exit_(1001, 0))
    assert attrs["comm"] == "worker"


def test_the_cache_is_bounded_and_a_reset_refills_by_lookups() -> None:
    fp = FakeProc()
    t = Tracker(fp, self_pid=AGENTD, max_procs=8)
    for hpid in range(3000, 3020):
        fp.add(hpid, "web", 1)
        run(t, exec_(hpid))
        assert len(t) <= 8
    assert t.counts["resets"] >= 2
    t.reset()
    assert len(t) == 0 and t.cell_of(3019) == "web"  # by lookup
    fp.calls.clear()
    run(t, exit_(3019, 0))
    assert fp.calls == []  # an exit after a reset is never looked up (too late)


@given(st.lists(st.tuples(st.sampled_from(["fork", "exec", "exit"]), st.integers(0, 15),
                          st.integers(0, 15)), max_size=80))
def test_every_event_names_the_cell_that_holds_the_process(
        steps: list[tuple[str, int, int]]) -> None:
    """Whatever the order of forks, execs and exits over 16 pids split between two cells
    and the host, an event is only ever about a process of a cell, attributed to the cell
    whose cgroup holds it, and the cache never holds more than the live processes."""
    fp = FakeProc()
    home = {p: ("a", "b", None)[p % 3] for p in range(16)}
    t = Tracker(fp, self_pid=AGENTD)
    live: set[int] = set()
    for kind, a, b in steps:
        parent, child = 5000 + a, 5000 + b
        if kind == "fork":
            if child in live or parent not in live or home[a] != home[b]:
                continue
            live.add(child)
            fp.add(child, home[b], parent)
            data = fork(parent, parent, child, child)
        elif kind == "exec":
            if child not in live:
                live.add(child)
                fp.add(child, home[b], 1)
            data = exec_(child)
        else:
            if child not in live:
                continue
            live.discard(child)
            data = exit_(child, 0)
        for cell, _, attrs, sev in run(t, data):
            assert cell == home[int(attrs["hpid"]) - 5000] and cell is not None
            assert sev == "info"
        if kind == "exit":
            del fp.procs[child]
        assert set(t.procs) <= live


# --- the tree ----------------------------------------------------------------------------


def test_tree_order_is_depth_first_with_cell_pids() -> None:
    rows = [{"hpid": 12, "hppid": 10, "pid": 3}, {"hpid": 10, "hppid": 400, "pid": 1},
            {"hpid": 11, "hppid": 10, "pid": 2}, {"hpid": 13, "hppid": 11, "pid": 4}]
    out = tree_order(rows)
    assert [(r["pid"], r["ppid"], r["depth"]) for r in out] == [
        (1, 0, 0), (2, 1, 1), (4, 2, 2), (3, 1, 1)]


def test_tree_order_survives_cycles_and_orphans() -> None:
    rows = [{"hpid": 1, "hppid": 2, "pid": 1}, {"hpid": 2, "hppid": 1, "pid": 2},
            {"hpid": 5, "hppid": 5, "pid": 5}, {"hpid": 7, "hppid": None, "pid": 7}]
    out = tree_order(rows)
    assert sorted(r["hpid"] for r in out) == [1, 2, 5, 7]
    assert all(r["depth"] == 0 for r in out if r["hpid"] in (1, 2, 5, 7) and r["ppid"] == 0)


@given(st.dictionaries(st.integers(1, 50), st.integers(0, 55), max_size=40))
def test_tree_order_lists_every_row_once_and_parents_first(parents: dict[int, int]) -> None:
    rows = [{"hpid": h, "hppid": p, "pid": h} for h, p in parents.items()]
    out = tree_order(rows)
    assert sorted(r["hpid"] for r in out) == sorted(parents)
    seen: set[int] = set()
    for r in out:
        if r["depth"]:
            assert r["ppid"] in seen
        seen.add(r["hpid"])
