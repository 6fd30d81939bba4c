"""Descriptors handed from one agentd to the next across ``execve`` (the master's respawn
and an ordinary upgrade, issue 12).

The old process names each descriptor it must not lose (the control socket, the instance
lock, every cell's seccomp listener, the exec monitor's fanotify group, ...), clears its
close-on-exec flag, and puts the table in the environment variable :data:`ENV` as JSON
``{"name": fd, ...}`` plus the pid it was made for.  The new process takes the table
once (:func:`take`): it checks that the table was made for it (the pid is the same
across exec), that every fd is open, and sets close-on-exec again on each one, so no
child (a cell's set-up child above all) inherits them by accident.  Anything named
that is not claimed by a service is closed by :func:`Inherited.close_unclaimed`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

__all__ = ["ENV", "Inherited", "prepare", "take"]

ENV = "AGENT_INHERIT"
_NAME_MAX = 128


def prepare(fds: Mapping[str, int], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the exec: ``fds`` made inheritable and listed in :data:`ENV`."""
    env = dict(os.environ if environ is None else environ)
    table: dict[str, int] = {}
    for name, fd in fds.items():
        if not name or len(name) > _NAME_MAX:
            raise ValueError(f"bad descriptor name {name!r}")
        os.set_inheritable(fd, True)
        table[name] = fd
    env[ENV] = json.dumps({"pid": os.getpid(), "fds": table}, sort_keys=True)
    return env


class Inherited:
    """The descriptors this process was given; each is claimed once."""

    def __init__(self, fds: Mapping[str, int] | None = None) -> None:
        self._fds = dict(fds or {})

    def __bool__(self) -> bool:
        return bool(self._fds)

    def names(self, prefix: str = "") -> list[str]:
        return sorted(n for n in self._fds if n.startswith(prefix))

    def claim(self, name: str) -> int | None:
        """The descriptor named ``name`` (now the caller's to close), or None."""
        return self._fds.pop(name, None)

    def close_unclaimed(self) -> list[str]:
        """Close what nobody claimed; their names."""
        left = sorted(self._fds)
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        return left


def take(environ: dict[str, str] | None = None) -> Inherited:
    """The table left by the previous agentd, removed from the environment; an empty one
    when there is none, it was made for another process, or it is malformed (its fds are
    then left alone: they may not be ours)."""
    env = os.environ if environ is None else environ
    raw = env.pop(ENV, None)
    if not raw:
        return Inherited()
    try:
        doc = json.loads(raw)
        pid, fds = doc["pid"], doc["fds"]
        ok = isinstance(pid, int) and isinstance(fds, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 2
            for k, v in fds.items())
    except (ValueError, KeyError, TypeError):
        return Inherited()
    if not ok or pid != os.getpid():
        return Inherited()
    good: dict[str, int] = {}
    for name, fd in fds.items():
        try:
            os.set_inheritable(fd, False)
        except OSError:
            continue  # not open: nothing to claim
        good[name] = fd
    return Inherited(good)
