"""The spawn handshake between agentd and a cell's set-up child: one message type, one table.

``agent.kernel.spawn`` forks a child that enters the cell's namespaces and forks the
cell's pid 1.  The two talk over a CLOEXEC status pipe (child -> agentd, one line per
:class:`Msg`) and a sync pipe (agentd -> child, one byte: :data:`SYNC_OK` or
:data:`SYNC_FAIL`) for the two steps only the host's root can do:

* ``USERNS``: the child unshared its user namespace; agentd writes its uid/gid maps;
* ``PID``: the intermediate forked pid 1 (its host pid follows) and exits;
* ``CGROUP``: pid 1 built its root and wants its cgroup; agentd moves it there (it may
  come before ``PID``: the two are written by different processes);
* ``EXEC``: everything is set up; execve follows (it too may come before ``PID`` when
  pid 1 has no cgroup to join: nothing makes it wait for the intermediate);
* ``FAILED``: a step failed (step, target, errno follow); the child exits 127;
* ``TRACE``: a timestamp per step when AGENT_SPAWN_TRACE is set (any time).

:data:`TRANSITIONS` is what agentd accepts in each :class:`Phase`; a message it does not
hold is a protocol error (:class:`HandshakeError`), never guessed at.  The table is drawn
in docs/sandbox.md by :func:`render_mermaid`.  Pure: encoding and decoding only.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.core.errors import ProtocolError

__all__ = ["SYNC_FAIL", "SYNC_OK", "TRANSITIONS", "HandshakeError", "Line", "Msg", "Phase",
           "decode", "encode", "next_phase", "render_mermaid"]

SYNC_OK = b"1"
SYNC_FAIL = b"0"


class Msg(enum.Enum):
    USERNS = "U"
    PID = "P"
    CGROUP = "C"
    EXEC = "X"
    FAILED = "F"
    TRACE = "T"


_FIELDS = {Msg.USERNS: 0, Msg.PID: 1, Msg.CGROUP: 0, Msg.EXEC: 0, Msg.FAILED: 3,
           Msg.TRACE: 2}


class Phase(enum.Enum):
    STARTED = "started"      # forked; no pid 1 yet
    JOIN_ASKED = "join-asked"  # pid 1 asked for its cgroup before its pid was known
    PID1 = "pid1"            # pid 1's host pid is known
    JOINED = "joined"        # pid 1 is in its cgroup
    EXEC_EARLY = "exec-early"  # pid 1 execs, but its pid is not known yet
    READY = "ready"          # it execs now
    FAILED = "failed"        # a step failed; only traces may follow


P, M = Phase, Msg
TRANSITIONS: dict[tuple[Phase, Msg], Phase] = {
    (P.STARTED, M.USERNS): P.STARTED,
    (P.STARTED, M.PID): P.PID1,
    (P.STARTED, M.CGROUP): P.JOIN_ASKED,
    (P.STARTED, M.EXEC): P.EXEC_EARLY,  # no cgroup: pid 1 outran the intermediate
    (P.STARTED, M.FAILED): P.FAILED,
    (P.EXEC_EARLY, M.PID): P.READY,
    (P.EXEC_EARLY, M.FAILED): P.FAILED,
    (P.JOIN_ASKED, M.PID): P.JOINED,
    (P.JOIN_ASKED, M.FAILED): P.FAILED,
    (P.PID1, M.CGROUP): P.JOINED,
    (P.PID1, M.EXEC): P.READY,  # no cgroup to join
    (P.PID1, M.FAILED): P.FAILED,
    (P.JOINED, M.EXEC): P.READY,
    (P.JOINED, M.FAILED): P.FAILED,
    (P.READY, M.FAILED): P.FAILED,  # execve itself failed
}
# TRACE is accepted in every phase and changes nothing.


class HandshakeError(ProtocolError):
    """The set-up child sent what the handshake does not allow (code ``E_SPAWN_PROTOCOL``)."""

    def __init__(self, phase: Phase, what: str) -> None:
        self.phase = phase
        ok = ", ".join(m.name for (p, m) in TRANSITIONS if p is phase) or "nothing"
        super().__init__("E_SPAWN_PROTOCOL", f"spawn handshake: {what} in phase {phase.value}",
                         f"in {phase.value} agentd accepts {ok} (and TRACE)")


@dataclass(frozen=True)
class Line:
    msg: Msg
    fields: tuple[str, ...] = ()


def encode(msg: Msg, *fields: object) -> bytes:
    """One status line; tabs and newlines in a field (a path) become spaces."""
    if len(fields) != _FIELDS[msg]:
        raise ValueError(f"{msg.name} carries {_FIELDS[msg]} fields, not {len(fields)}")
    clean = (str(f).replace("\t", " ").replace("\n", " ") for f in fields)
    return "\t".join((msg.value, *clean)).encode() + b"\n"


def decode(raw: bytes, phase: Phase = Phase.STARTED) -> Line:
    """A status line (without its newline) -> :class:`Line`; HandshakeError otherwise."""
    kind, *rest = raw.decode(errors="replace").split("\t")
    try:
        msg = Msg(kind)
    except ValueError:
        raise HandshakeError(phase, f"unknown message {kind[:16]!r}") from None
    if len(rest) != _FIELDS[msg]:
        raise HandshakeError(phase, f"{msg.name} with {len(rest)} fields")
    return Line(msg, tuple(rest))


def next_phase(phase: Phase, msg: Msg) -> Phase:
    """Where the handshake is after ``msg`` (HandshakeError if not allowed)."""
    if msg is Msg.TRACE:
        return phase
    if phase is Phase.FAILED:
        return phase  # the first failure is the one reported; the child is exiting
    target = TRANSITIONS.get((phase, msg))
    if target is None:
        raise HandshakeError(phase, f"{msg.name} not expected")
    return target


def render_mermaid() -> str:
    """The table as a Mermaid ``stateDiagram-v2`` (embedded in docs/sandbox.md)."""
    lines = ["stateDiagram-v2", f"    [*] --> {P.STARTED.name}"]
    lines += [f"    {a.name} --> {b.name}: {m.name}" for (a, m), b in TRANSITIONS.items()]
    lines.append(f"    {P.READY.name} --> [*]")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m agent.core.handshake
    print(render_mermaid(), end="")
