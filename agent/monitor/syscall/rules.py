"""What a trapped syscall is, and what the master answers when no operation applies
(pure).

Everything the filter sends to the master falls in one of three kinds (see the
package doc): :func:`classify` says which, from the notification's ABI and number
alone, and :func:`op_of` names the manifest operation a trapped call belongs to.  A
call that belongs to no granted operation is refused here, without reading the cell's
memory; the operations' own argument checks are in :mod:`agent.monitor.syscall.ops`.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core import syscalls as abi
from agent.core.syscallpolicy import DEFAULT_TRAP, OP_SYSCALLS, REASONS

__all__ = [
    "DENY_ERRNO",
    "Kind",
    "Trapped",
    "Verdict",
    "attrs",
    "classify",
    "deny_errno",
    "op_of",
    "severity",
]

Kind = Literal["trap", "denied", "killed"]
Verdict = Literal["allowed", "denied", "killed"]

# What a refused call returns when it is not the default EPERM: a refused socket
# family looks like a family the kernel does not have, as callers expect.
DENY_ERRNO: dict[str, int] = {"socket": errno.EAFNOSUPPORT, "socketpair": errno.EAFNOSUPPORT}

_OP_BY_SYSCALL: dict[str, str] = {s: op for op, calls in OP_SYSCALLS.items() for s in calls}


@dataclass(frozen=True)
class Trapped:
    """One notification, classified: ``name`` as its ABI knows it, ``op`` the manifest
    operation it belongs to (``none`` when no manifest may grant it)."""

    kind: Kind
    name: str
    nr: int
    abi: str
    args: tuple[int, ...] = field(default=(0, 0, 0, 0, 0, 0))

    @property
    def op(self) -> str:
        return op_of(self.name) if self.kind == "trap" else "none"

    def arg(self, i: int, *, signed: bool = False) -> int:
        """Argument ``i`` as the kernel reads an ``int``/``unsigned int`` (low 32 bits)."""
        v = self.args[i] & 0xFFFFFFFF
        return v - (1 << 32) if signed and v & 0x80000000 else v


def classify(native: str, audit_arch: int, nr: int, args: tuple[int, ...] = ()) -> Trapped:
    """The kind of a notification from a filter compiled for ``native``."""
    full = (*args, 0, 0, 0, 0, 0, 0)[:6]
    foreign = audit_arch != abi.AUDIT_ARCH[native]
    if foreign or (native == "x86_64" and nr & abi.X32_SYSCALL_BIT):
        return Trapped("killed", abi.describe_call(audit_arch, nr), nr,
                       abi.arch_name(audit_arch, nr), full)
    name = abi.syscall_name(nr, native) or f"{native}_{nr}"
    kind: Kind = "trap" if name in DEFAULT_TRAP or name in _OP_BY_SYSCALL else "denied"
    return Trapped(kind, name, nr, native, full)


def op_of(name: str) -> str:
    """The privileged operation a trapped syscall asks for, ``none`` if it maps to none."""
    return _OP_BY_SYSCALL.get(name, "none")


def deny_errno(name: str) -> int:
    return DENY_ERRNO.get(name, errno.EPERM)


def severity(kind: Kind) -> Literal["notice", "alert"]:
    """A call from a foreign ABI is an alert (it never happens by accident); the rest
    notices (persisted, and coalesced per cell and kind by the bus)."""
    return "alert" if kind == "killed" else "notice"


def attrs(t: Trapped, verdict: str, proc: Mapping[str, Any], **extra: Any
          ) -> dict[str, Any]:  # fmt: skip
    """The event's attributes (docs/events.md, channel ``syscall``)."""
    out: dict[str, Any] = {"syscall": t.name, "verdict": verdict, "nr": t.nr, **proc}
    if t.kind == "trap":
        out["op"] = t.op
    elif t.kind == "killed":
        out["arch"] = t.abi
    else:
        out["reason"] = REASONS.get(t.name, "not allowed")
    out.update({k: v for k, v in extra.items() if v is not None})
    return out
