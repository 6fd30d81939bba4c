"""The master destroys itself and is re-made from the pristine installed image (issue 12,
design step I); the same path serves an ordinary upgrade.

When an attack on the master is detected (a correlation pattern tagged ``master``, a
failed check of the agent's installed files against their seal, or an operator's
``agentctl respawn``), :meth:`Respawner.respawn`:

1. checks the installed agent against its seal (:mod:`agent.core.seal`, made when the
   image was built): tampered code is never executed; the master stays, says so with an
   alert, and keeps serving;
2. publishes ``master/respawn`` (an alert, so the persistent event log keeps it across
   the exec) and flushes the journal and the event log;
3. names the descriptors that must not be lost (``keep``: the instance lock, the control
   socket, every cell's seccomp listener, the monitors' kernel handles) and re-executes
   the installed interpreter in isolated mode (``python3 -I``: no environment, no user
   site, no current directory on the path) on the installed package, with the same
   arguments and the descriptors listed in :data:`agent.kernel.inherit.ENV`.

Everything else goes with the old process image: in-memory state is rebuilt from the
journal and the kernel, as after a crash, and every cell is re-adopted.  The kernel
enforces limits, filters and firewall rules throughout; a trapped syscall waits in the
kernel for the new master (its listener is passed on).  If the exec itself fails, the
old master goes on serving and reports the failure.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.core.protocol import Handler, Peer, arg, check_args
from agent.core.seal import Mismatch, Seal, SealError
from agent.daemon.bus import EventBus
from agent.kernel import inherit
from agent.kernel.seal import seal_tree

__all__ = ["BOOT", "RETRY_S", "Respawner"]

log = logging.getLogger(__name__)

# What the new interpreter runs: the installed package, found from its own directory
# (``-I`` drops PYTHONPATH and the current directory from the path).
BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); from agent.daemon.main import main; "
        "sys.exit(main(sys.argv[2:]))")
RETRY_S = 10.0  # a detector's next request after an attempt that did not exec


class Respawner:
    """Owns the respawn: what to keep, what to check, how to exec."""

    def __init__(self, bus: EventBus, argv: list[str], *, package_root: Path,
                 seal_path: Path | None, policy_check: Callable[[Peer], None],
                 flush: list[Callable[[], None]] | None = None,
                 execve: Callable[[str, list[str], Mapping[str, str]], Any] = os.execve,
                 interpreter: str = sys.executable) -> None:
        self.bus = bus
        self.argv = list(argv)
        self.package_root = package_root  # the directory that holds agent/
        self.seal_path = seal_path
        self.policy_check = policy_check
        self.flush = flush or []
        self._execve = execve
        self.interpreter = interpreter
        self._keep: list[Callable[[], Mapping[str, int]]] = []
        self.respawns = 0
        self.requests = 0  # requests made through :meth:`request`
        self._pending = False
        self._last_attempt = float("-inf")

    def keep(self, fds: Callable[[], Mapping[str, int]]) -> None:
        """Register a source of named descriptors to pass to the next master."""
        self._keep.append(fds)

    def check(self) -> list[Mismatch] | None:
        """The installed agent against its seal: the differences, or None without a seal
        (a development tree: nothing to check against)."""
        if self.seal_path is None or not self.seal_path.exists():
            return None
        seal = Seal.parse(self.seal_path.read_text(), str(self.seal_path))
        return seal.compare(seal_tree(self.package_root / "agent"))

    def respawn(self, reason: str, **attrs: Any) -> None:
        """Re-make the master now (see the module doc); returns only if it could not."""
        try:
            bad = self.check()
        except (SealError, AgentError, OSError) as exc:
            self.bus.emit("master", "integrity", severity="alert", ok=False,
                          error=str(exc), reason=reason)
            return
        if bad:
            self.bus.emit("master", "integrity", severity="alert", ok=False, reason=reason,
                          files=[f"{m.path} ({m.reason})" for m in bad[:20]], count=len(bad))
            log.error("respawn refused: %d installed files differ from the seal", len(bad))
            return
        fds: dict[str, int] = {}
        for source in self._keep:
            fds.update(source())
        self.respawns += 1
        self.bus.emit("master", "respawn", severity="alert", reason=reason,
                      kept=sorted(fds), pid=os.getpid(), **attrs)
        for fn in self.flush:
            try:
                fn()
            except Exception:
                log.exception("respawn: flush %r failed", fn)
        env = inherit.prepare(fds)
        argv = [self.interpreter, "-I", "-c", BOOT, str(self.package_root), *self.argv]
        log.warning("respawn (%s): exec %s with %d descriptors", reason, self.interpreter,
                    len(fds))
        try:
            self._execve(self.interpreter, argv, env)
        except OSError as exc:
            self.bus.emit("master", "respawn-failed", severity="alert", error=str(exc))
            log.error("respawn: exec failed: %s; this master goes on", exc)

    def request(self, reason: str, **attrs: Any) -> bool:
        """Ask for a respawn on the next turn of the loop (after the caller's events are
        out), from a detector (a pattern tagged ``master``, the integrity watch).  While
        one is pending a request joins it; within ``RETRY_S`` of an attempt that did not
        exec (tampered files: refused) it is deferred to the end of that wait, never
        dropped (a new attack right after the files were restored still re-makes the
        master).  An attack that keeps firing costs one check per ``RETRY_S``, not one per
        event.  True if this request schedules one."""
        self.requests += 1
        if self._pending:
            return False
        self._pending = True
        wait = self._last_attempt + RETRY_S - time.monotonic()

        def attempt() -> None:
            try:
                self.respawn(reason, **attrs)
            finally:  # only reached when no exec happened
                self._pending = False
                self._last_attempt = time.monotonic()

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a tool, a test): now
            attempt()
            return True
        if wait > 0:
            loop.call_later(wait, attempt)
        else:
            loop.call_soon(attempt)
        return True

    def handlers(self) -> dict[str, Handler]:
        return {"respawn": self.op_respawn}

    async def op_respawn(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        """``agentctl respawn``: reply first, then re-make the master on the next loop
        turn (the client sees its answer; its connection then closes)."""
        check_args(args, ("check",))
        self.policy_check(peer)
        if arg(args, "check", bool, False):
            bad = self.check()
            return {"sealed": bad is not None,
                    "differences": [] if bad is None else [f"{m.path} ({m.reason})"
                                                            for m in bad]}
        asyncio.get_running_loop().call_soon(
            lambda: self.respawn("operator", uid=peer.uid, by_pid=peer.pid))
        return {"respawning": True, "pid": os.getpid()}
