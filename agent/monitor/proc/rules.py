"""Process events of cells (pure): the proc connector's messages, the pid cache that
attributes them to cells, and what each one becomes as an event.

**Messages.**  :func:`parse` reads a datagram of the connector (``struct nlmsghdr``,
``struct cn_msg``, ``struct proc_event`` of ``linux/cn_proc.h``, native byte order) into
:class:`Msg` records; anything that is not a process event of ``CN_IDX_PROC`` is skipped.
Pids are the host's (the connector reports in the initial pid namespace).

**Attribution.**  :class:`Tracker` keeps one :class:`Proc` per host pid (a process, not a
thread): its cell (None: the host), its pid in the cell, name and executable.  A fork's
child inherits its parent's entry: a cell cannot move a process to another cgroup (it
has no cgroupfs and no way to mount one).  Only the host's root can: agentd moves the
set-up child of every new cell into the cell's cgroup before the service is exec'd, so

* agentd's own fork makes no event and no entry (a cell starts at its set-up child's
  exec, looked up then: by the time the connector's message is read, the child may
  already be in the cell and have exec'd the service);
* a process held for the host is looked up again when it execs or changes uid, so a
  process the host's root moved into a cell is seen from its next exec;
* a process the cache does not know (it started before agentd, or its fork was lost when
  the socket overflowed) is looked up once (``/proc/PID/cgroup``: :class:`Lookup`).

Lookups happen when a message is read, not when it was sent: a process may be gone by
then.  Its exec is still reported (``comm`` and ``exe`` empty: unknown) and its entry kept,
so that its exit, which follows, is reported too.  An exit drops the entry; an overflow
clears the whole cache (:meth:`Tracker.reset`), which refills itself by lookups.
The cache is bounded (:data:`MAX_PROCS`).

**Events** (docs/events.md, channel ``proc``): ``fork``, ``exec``, ``uid``, ``exit`` of a
process in a cell; nothing for the host's processes and nothing for threads.  All are
``info`` (the bus coalesces them per cell and kind), except a ``uid`` change that makes a
process root in its cell when it was not (``notice``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from agent.core.events import Severity

__all__ = [
    "CN_IDX_PROC",
    "CN_VAL_PROC",
    "COMM",
    "EXEC",
    "EXIT",
    "FORK",
    "MAX_PROCS",
    "NONE",
    "UID",
    "Info",
    "Lookup",
    "Msg",
    "Out",
    "Proc",
    "Tracker",
    "ack_of",
    "listen_message",
    "map_id",
    "parse",
    "tree_order",
    "wait_status",
]

# linux/connector.h, linux/cn_proc.h
CN_IDX_PROC: Final = 1
CN_VAL_PROC: Final = 1
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2
NONE: Final = 0x00000000  # the answer to LISTEN/IGNORE (an ack)
FORK: Final = 0x00000001
EXEC: Final = 0x00000002
UID: Final = 0x00000004
COMM: Final = 0x00000200
EXIT: Final = 0x80000000

NLMSG_DONE: Final = 3
NLMSG_ERROR: Final = 2
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_TWO = struct.Struct("=II")
_FOUR = struct.Struct("=IIII")
_SIX = struct.Struct("=IIiiII")  # exit: pid, tgid, exit_code, exit_signal, ppid, ptgid
_EVENT_AT = _NLMSG.size + _CN.size  # 36
_DATA_AT = _EVENT_AT + _HEAD.size  # 52

MAX_PROCS = 65536  # entries of the pid cache (a box runs a few hundred processes)


def listen_message(on: bool = True, tag: int = 0) -> bytes:
    """The netlink message that starts (``PROC_CN_MCAST_LISTEN``) or stops the events;
    the kernel's answer carries ``tag + 1`` (:func:`ack_of`)."""
    op = struct.pack("=I", PROC_CN_MCAST_LISTEN if on else PROC_CN_MCAST_IGNORE)
    cn = _CN.pack(CN_IDX_PROC, CN_VAL_PROC, 0, tag & 0xFFFFFFFF, len(op), 0) + op
    return _NLMSG.pack(_NLMSG.size + len(cn), NLMSG_DONE, 0, 0, 0) + cn


@dataclass(frozen=True, slots=True)
class Msg:
    """One process event.  ``pid``/``tgid``: the thread and process it is about (a fork's
    child); ``ppid``/``ptgid``: a fork's parent thread and process; ``a``/``b``: ``uid``
    the real and effective uid (host), ``exit`` the wait status and the signal sent to
    the parent, ``NONE`` (an ack) the error in ``a``; ``comm`` for ``COMM``."""

    what: int
    pid: int
    tgid: int
    ppid: int = 0
    ptgid: int = 0
    a: int = 0
    b: int = 0
    comm: str = ""
    ts_ns: int = 0


def parse(data: bytes) -> list[Msg]:
    """Every process event in ``data`` (one datagram: one or more netlink messages)."""
    out: list[Msg] = []
    off, end = 0, len(data)
    while off + _NLMSG.size <= end:
        length, mtype = _NLMSG.unpack_from(data, off)[:2]
        if length < _NLMSG.size or off + length > end:
            break  # malformed: the rest cannot be framed
        msg = _one(data, off, length) if mtype != NLMSG_ERROR else None
        if msg is not None:
            out.append(msg)
        off += (length + 3) & ~3
    return out


def _one(data: bytes, off: int, length: int) -> Msg | None:
    if length < _DATA_AT + 4:
        return None
    idx, val, _seq, _ack, dlen, _flags = _CN.unpack_from(data, off + _NLMSG.size)
    if idx != CN_IDX_PROC or val != CN_VAL_PROC or dlen < _HEAD.size + 4 \
            or _EVENT_AT + dlen > length:
        return None
    what, _cpu, ts = _HEAD.unpack_from(data, off + _EVENT_AT)
    at, room = off + _DATA_AT, dlen - _HEAD.size
    if what == FORK and room >= 16:
        ppid, ptgid, pid, tgid = _FOUR.unpack_from(data, at)
        return Msg(FORK, pid, tgid, ppid, ptgid, ts_ns=ts)
    if what == EXEC and room >= 8:
        pid, tgid = _TWO.unpack_from(data, at)
        return Msg(EXEC, pid, tgid, ts_ns=ts)
    if what == UID and room >= 16:
        pid, tgid, ruid, euid = _FOUR.unpack_from(data, at)
        return Msg(UID, pid, tgid, a=ruid, b=euid, ts_ns=ts)
    if what == EXIT and room >= 16:
        padded = data[at:at + 24].ljust(24, b"\0")
        pid, tgid, code, sig, ppid, ptgid = _SIX.unpack(padded)
        return Msg(EXIT, pid, tgid, ppid, ptgid, a=code, b=sig, ts_ns=ts)
    if what == COMM and room >= 24:
        pid, tgid = _TWO.unpack_from(data, at)
        raw = data[at + 8:at + 24].split(b"\0", 1)[0]
        return Msg(COMM, pid, tgid, comm=raw.decode("utf-8", "replace"), ts_ns=ts)
    if what == NONE and room >= 4:
        return Msg(NONE, 0, 0, a=struct.unpack_from("=I", data, at)[0], ts_ns=ts)
    return None


def map_id(id_map: str, host_id: int) -> int | None:
    """A host uid or gid as the namespace of ``id_map`` sees it (the text of
    ``/proc/PID/uid_map`` read from the initial user namespace: ``inside outside count``
    lines); None when it is not mapped."""
    for line in id_map.splitlines():
        parts = line.split()
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            continue
        inside, outside, count = (int(x) for x in parts)
        if outside <= host_id < outside + count:
            return inside + host_id - outside
    return None


def ack_of(data: bytes, tag: int) -> int | None:
    """The error (0: none) the connector answered our LISTEN/IGNORE tagged ``tag`` with,
    if ``data`` is that answer (answers go to every listener; the kernel numbers them
    itself, so they are told apart by ``cn_msg.ack``, our tag plus one)."""
    if len(data) < _DATA_AT + 4:
        return None
    idx, val, _seq, ack, dlen, _flags = _CN.unpack_from(data, _NLMSG.size)
    what = _HEAD.unpack_from(data, _EVENT_AT)[0]
    if idx != CN_IDX_PROC or val != CN_VAL_PROC or ack != (tag + 1) & 0xFFFFFFFF \
            or what != NONE or dlen < 20:
        return None
    return int(struct.unpack_from("=I", data, _DATA_AT)[0])


def wait_status(status: int) -> tuple[int, int, bool]:
    """``(exit code, terminating signal, core dumped)`` of a wait status (``exit_code``
    of the kernel's task: ``code << 8 | core << 7 | signal``)."""
    return (status >> 8) & 0xFF, status & 0x7F, bool(status & 0x80)


# --- attribution ------------------------------------------------------------------------


@dataclass(slots=True)
class Proc:
    """A process the cache knows: its cell (None: the host) and, for a cell's, what its
    events carry."""

    cell: str | None
    nspid: int | None = None
    comm: str = ""
    exe: str = ""
    euid: int | None = None  # on the host, as of its last exec or uid change
    hppid: int = 0  # its parent on the host, as of its fork or exec


@dataclass(frozen=True, slots=True)
class Info:
    """What ``/proc`` says of a live process (:meth:`Lookup.describe`)."""

    nspid: int | None  # its pid in its own pid namespace
    ppid: int  # its parent, on the host
    comm: str
    exe: str
    uid: int  # real and effective, on the host
    euid: int


class Lookup(Protocol):
    """What the tracker reads of a live process (agent.monitor.proc.adapter)."""

    def cell_of(self, hpid: int) -> str | None:
        """The cell whose cgroup holds it; None for the host, or when it is gone."""
        ...

    def nspid(self, hpid: int) -> int | None:
        """Its pid in its pid namespace; None when it is gone."""
        ...

    def describe(self, hpid: int) -> Info | None:
        """None when it is gone."""
        ...

    def cell_uid(self, hpid: int, uid: int) -> int | None:
        """A host uid as the process's user namespace sees it (None: unmapped, gone)."""
        ...


@dataclass(frozen=True, slots=True)
class Out:
    """An event to publish: channel ``proc``."""

    cell: str
    kind: str
    attrs: dict[str, Any]
    severity: Severity = "info"


class Tracker:
    """The pid cache and the events of cells' processes (see the module doc)."""

    def __init__(self, lookup: Lookup, *, self_pid: int, max_procs: int = MAX_PROCS) -> None:
        self.lookup = lookup
        self.self_pid = self_pid
        self.max_procs = max_procs
        self.procs: dict[int, Proc] = {}
        self.counts = {"lookups": 0, "resets": 0, "threads": 0}

    def __len__(self) -> int:
        return len(self.procs)

    def reset(self) -> None:
        """Forget everything (events were lost: an exit may be among them)."""
        self.procs.clear()
        self.counts["resets"] += 1

    def cell_of(self, hpid: int) -> str | None:
        """The cell of a live process: the cache's answer, else one lookup (not cached:
        a caller's pid may be a thread or about to change)."""
        p = self.procs.get(hpid)
        if p is not None:
            return p.cell
        self.counts["lookups"] += 1
        return self.lookup.cell_of(hpid)

    def cells(self) -> dict[str, int]:
        """How many processes of each cell the cache holds."""
        out: dict[str, int] = {}
        for p in self.procs.values():
            if p.cell is not None:
                out[p.cell] = out.get(p.cell, 0) + 1
        return out

    def _put(self, hpid: int, p: Proc) -> None:
        if len(self.procs) >= self.max_procs and hpid not in self.procs:
            self.reset()
        self.procs[hpid] = p

    def _resolve(self, hpid: int) -> Proc:
        self.counts["lookups"] += 1
        return Proc(self.lookup.cell_of(hpid))

    def handle(self, m: Msg) -> Out | None:
        if m.what == FORK:
            return self._fork(m)
        if m.pid != m.tgid:  # a thread's exec, uid change, exit or rename
            self.counts["threads"] += 1
            return None
        if m.what == EXEC:
            return self._exec(m)
        if m.what == EXIT:
            return self._exit(m)
        if m.what == UID:
            return self._uid(m)
        if m.what == COMM:
            p = self.procs.get(m.tgid)
            if p is not None:
                p.comm = m.comm
        return None

    def _fork(self, m: Msg) -> Out | None:
        if m.pid != m.tgid:  # a new thread: the cache is per process
            self.counts["threads"] += 1
            return None
        child = m.tgid
        if m.ptgid == self.self_pid:
            return None  # agentd's own child: a cell's set-up child starts at its exec
        parent = self.procs.get(m.ptgid)
        if parent is None:
            p = self._resolve(child)
            p.hppid = m.ptgid
            if p.cell is None:
                self._put(child, p)
                return None
            info = self.lookup.describe(child)
            if info is not None:
                p.nspid, p.comm, p.exe, p.euid = info.nspid, info.comm, info.exe, info.euid
            self._put(child, p)
            return Out(p.cell, "fork", {"pid": p.nspid, "hpid": child, "ppid": None,
                                        "comm": p.comm, "exe": p.exe})
        cell = parent.cell
        if cell is None:
            self._put(child, Proc(None, hppid=m.ptgid))
            return None
        p = Proc(cell, self.lookup.nspid(child), parent.comm, parent.exe, parent.euid, m.ptgid)
        self._put(child, p)
        return Out(cell, "fork", {"pid": p.nspid, "hpid": child, "ppid": parent.nspid,
                                    "comm": p.comm, "exe": p.exe})

    def _exec(self, m: Msg) -> Out | None:
        hpid = m.tgid
        p = self.procs.get(hpid)
        if p is None or p.cell is None:  # unknown, or perhaps moved by the host's root
            p = self._resolve(hpid)
            if p.cell is None:
                self._put(hpid, p)
                return None
        info = self.lookup.describe(hpid)
        if info is not None:
            p.nspid, p.comm, p.exe, p.euid = info.nspid, info.comm, info.exe, info.euid
            p.hppid = info.ppid
        else:  # gone before this was read: what it ran is unknown; its exit follows
            p.comm, p.exe = "", ""
        self._put(hpid, p)
        parent = self.procs.get(p.hppid)
        ppid = parent.nspid if parent is not None and parent.cell == p.cell else None
        return Out(p.cell, "exec", {"pid": p.nspid, "hpid": hpid, "ppid": ppid,
                                    "comm": p.comm, "exe": p.exe})

    def _uid(self, m: Msg) -> Out | None:
        hpid = m.tgid
        p = self.procs.get(hpid)
        if p is None or p.cell is None:
            p = self._resolve(hpid)
            if p.cell is None:
                self._put(hpid, p)
                return None
            info = self.lookup.describe(hpid)
            if info is not None:
                p.nspid, p.comm, p.exe = info.nspid, info.comm, info.exe
            self._put(hpid, p)
        before = None if p.euid is None else self.lookup.cell_uid(hpid, p.euid)
        uid, euid = self.lookup.cell_uid(hpid, m.a), self.lookup.cell_uid(hpid, m.b)
        p.euid = m.b
        sev: Severity = "notice" if euid == 0 and before not in (0, None) else "info"
        return Out(p.cell, "uid", {"pid": p.nspid, "hpid": hpid, "comm": p.comm,
                                   "exe": p.exe, "uid": uid, "euid": euid, "huid": m.a,
                                   "heuid": m.b, "was_euid": before}, sev)

    def _exit(self, m: Msg) -> Out | None:
        p = self.procs.pop(m.tgid, None)
        if p is None or p.cell is None:
            return None  # gone: too late to look it up
        code, sig, core = wait_status(m.a)
        return Out(p.cell, "exit", {"pid": p.nspid, "hpid": m.tgid, "comm": p.comm,
                                    "exe": p.exe, "code": code, "signal": sig, "core": core})


# --- the tree of a cell's processes -----------------------------------------------------


def tree_order(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A cell's processes depth first, each with its ``depth`` and ``ppid`` in the cell.

    ``rows`` carry ``hpid`` and ``hppid`` (the parent on the host); a process whose parent
    is not among them is a root (its ``ppid`` is 0: outside the cell).  Siblings in
    ascending host pid, so the order is the order they started in."""
    by_hpid = {int(r["hpid"]): dict(r) for r in rows}
    children: dict[int, list[int]] = {}
    roots: list[int] = []
    for hpid, r in by_hpid.items():
        up = int(r.get("hppid") or 0)
        if up in by_hpid and up != hpid:
            children.setdefault(up, []).append(hpid)
        else:
            roots.append(hpid)
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    stack: list[tuple[int, int]] = [(h, 0) for h in sorted(roots, reverse=True)]
    while stack:
        hpid, depth = stack.pop()
        if hpid in seen:
            continue
        seen.add(hpid)
        r = by_hpid[hpid]
        parent = by_hpid.get(int(r.get("hppid") or 0))
        r["ppid"] = parent.get("pid") if parent is not None and depth else 0
        r["depth"] = depth
        out.append(r)
        stack += [(c, depth + 1) for c in sorted(children.get(hpid, ()), reverse=True)]
    # a cycle (pids reused while the rows were read) leaves rows unreached: list them last
    out += [dict(by_hpid[h], ppid=0, depth=0) for h in sorted(set(by_hpid) - seen)]
    return out

