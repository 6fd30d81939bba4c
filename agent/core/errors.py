"""One error type per kind of failure.

Every error carries a stable ``code`` (for scripts and the control protocol),
a human ``message`` naming the object or path involved, and an optional
``hint`` saying how to fix it.  ``agentctl`` prints ``error[CODE]: message``
and ``hint: ...`` on one or two lines; a traceback only with ``--debug``.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Iterable
from dataclasses import dataclass
from os import strerror
from typing import Any

__all__ = [
    "AgentError",
    "ConfigError",
    "KernelError",
    "NotFoundError",
    "ProtocolError",
    "RefusedError",
    "StateError",
    "TransitionError",
]


@dataclass
class AgentError(Exception):
    """Base class. ``code`` is a short upper-case identifier such as ``E_MANIFEST``."""

    code: str
    message: str
    hint: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"error[{self.code}]: {self.message}{hint}"

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            d["hint"] = self.hint
        return d


class ConfigError(AgentError):
    """A manifest, policy or configuration file is invalid."""


class ProtocolError(AgentError):
    """A control message could not be decoded or is malformed."""


class RefusedError(AgentError):
    """A request was understood but refused (policy, admission)."""


class NotFoundError(AgentError):
    """The named object does not exist."""


class StateError(AgentError):
    """The operation is illegal in the object's current state."""


class TransitionError(StateError):
    """An input that a state machine's current state does not accept (code ``E_STATE``):
    names the subject, the input and the state, and lists what the state accepts."""

    def __init__(self, subject: str, what: str, state: str, accepted: Iterable[str],
                 who: str = "it") -> None:
        ok = ", ".join(accepted) or "nothing (terminal)"
        super().__init__("E_STATE", f"{subject}: {what} is not allowed in {state}",
                         f"in {state.split()[-1]} {who} accepts {ok}")


class KernelError(AgentError):
    """A kernel call failed: names the operation, the path or object, and errno."""

    def __init__(self, op: str, target: str, err: int, hint: str | None = None) -> None:
        self.op = op
        self.target = target
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        super().__init__(
            "E_KERNEL", f"{op} `{target}`: {strerror(err)} ({name})", hint
        )

    @classmethod
    def from_oserror(
        cls, op: str, target: str, exc: OSError, hint: str | None = None
    ) -> KernelError:
        return cls(op, target, exc.errno or 0, hint)
