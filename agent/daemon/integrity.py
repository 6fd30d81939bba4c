"""The master's runtime integrity check: its installed files against the image's seal
(issue 12, item 5; docs/master.md, "The integrity watch").

:class:`IntegrityWatch` watches the installed package (every directory under it, with
inotify, and the seal file's directory) and, once at start and after each change
(changes within ``settle_s`` are checked together), compares the tree with its seal in
a worker thread (hashing must not stall the loop).  Each difference not reported before
is an ``agent/integrity`` alert {``path``, ``reason`` (changed, missing, unsealed, mode),
``count``}: the event the default pattern ``master-files-changed`` takes.  Then
``on_tamper`` runs (agentd: :meth:`agent.daemon.respawn.Respawner.request`), whose seal
check refuses to execute tampered code: the attempt is a ``master/integrity`` alert and
the master goes on serving, with the code it loaded from the pristine files.

Without a seal (a development tree) nothing is watched and the status says so.  A
difference that goes away (the file restored) is forgotten, so a second tampering of
the same file is reported again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError, KernelError
from agent.core.seal import Mismatch, Seal
from agent.daemon.bus import EventBus
from agent.kernel import inotify as ino
from agent.kernel.seal import seal_tree

__all__ = ["REPORTED_MAX", "IntegrityWatch"]

log = logging.getLogger(__name__)

REPORTED_MAX = 16  # agent/integrity events per check (the rest are counted in `count`)
_DIR_MASK = (ino.IN_CLOSE_WRITE | ino.IN_MOVED_TO | ino.IN_MOVED_FROM | ino.IN_CREATE
             | ino.IN_DELETE | ino.IN_ATTRIB | ino.IN_DELETE_SELF | ino.IN_MOVE_SELF
             | ino.IN_ONLYDIR)


class IntegrityWatch:
    """See the module doc.  ``root``: the installed package (``.../agent``)."""

    def __init__(self, bus: EventBus, root: Path, seal_path: Path, *,
                 on_tamper: Callable[[list[Mismatch]], Any] | None = None,
                 settle_s: float = 0.5) -> None:
        self.bus = bus
        self.root = root
        self.seal_path = seal_path
        self.on_tamper = on_tamper
        self.settle_s = settle_s
        self.checks = 0
        self.problem: str | None = None
        self.differences: list[str] = []  # of the last check
        self._reported: set[tuple[str, str]] = set()
        self._ino: ino.Inotify | None = None
        self._dirs: dict[int, Path] = {}  # watch descriptor -> directory
        self._seal_wd = -1
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self._again = False

    # ------------------------------------------------------------------ start, stop
    async def start(self) -> None:
        if not self.seal_path.exists():
            self.problem = f"no seal {self.seal_path}: the installed files are not checked"
            log.info("integrity: %s", self.problem)
            return
        try:
            self._ino = ino.Inotify()
            self._seal_wd = self._ino.add_watch(self.seal_path.parent, _DIR_MASK)
            self._watch_tree(self.root)
            asyncio.get_running_loop().add_reader(self._ino.fileno(), self._on_inotify)
        except (KernelError, OSError) as exc:
            self.problem = f"not watching {self.root}: {exc}"
            log.error("integrity: %s", self.problem)
            self._close_ino()
        self._schedule(0.0)  # the first check: tampering while agentd was down

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._close_ino()
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    def _close_ino(self) -> None:
        if self._ino is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._ino.fileno())
            except (RuntimeError, ValueError):
                pass
            self._ino.close()
            self._ino = None
        self._dirs.clear()

    def _watch_tree(self, top: Path) -> None:
        assert self._ino is not None
        for dirpath, _dirs, _files in os.walk(top, followlinks=False):
            self._dirs[self._ino.add_watch(dirpath, _DIR_MASK)] = Path(dirpath)

    # ------------------------------------------------------------------ events
    def _on_inotify(self) -> None:
        if self._ino is None:
            return
        try:
            events = self._ino.read()
        except KernelError as exc:
            self.problem = f"inotify: {exc}"
            events = []
        relevant = False
        for e in events:
            if e.overflow:
                relevant = True
            elif e.wd == self._seal_wd:
                relevant |= e.name == self.seal_path.name
            elif e.wd in self._dirs:
                relevant = True
                if e.mask & ino.IN_ISDIR and e.mask & (ino.IN_CREATE | ino.IN_MOVED_TO):
                    try:  # a new directory in the package: its files are watched too
                        self._watch_tree(self._dirs[e.wd] / e.name)
                    except (KernelError, OSError) as exc:
                        log.warning("integrity: cannot watch %s: %s", e.name, exc)
                if e.mask & ino.IN_IGNORED:
                    self._dirs.pop(e.wd, None)
        if relevant:
            self._schedule(self.settle_s)

    def _schedule(self, delay: float) -> None:
        if self._running is not None:
            self._again = True
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        self._running = asyncio.get_running_loop().create_task(self._check())

    async def _check(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    bad = await asyncio.to_thread(self.compare)
                except (AgentError, OSError) as exc:
                    bad = [Mismatch(str(self.seal_path), "unreadable")]
                    log.error("integrity: check failed: %s", exc)
                self._report(bad)
                if not self._again:
                    return
        finally:
            self._running = None

    def compare(self) -> list[Mismatch]:
        """The installed tree against its seal (run in a thread)."""
        seal = Seal.parse(self.seal_path.read_text(), str(self.seal_path))
        return seal.compare(seal_tree(self.root))

    def _report(self, bad: list[Mismatch]) -> None:
        self.checks += 1
        self.differences = [f"{m.path} ({m.reason})" for m in bad]
        now = {(m.path, m.reason) for m in bad}
        self._reported &= now  # restored files: reported again if tampered again
        new = [m for m in bad if (m.path, m.reason) not in self._reported]
        for m in new[:REPORTED_MAX]:
            self.bus.emit("agent", "integrity", severity="alert",
                          path=str(self.root / m.path), reason=m.reason, count=len(bad))
        self._reported |= {(m.path, m.reason) for m in new}
        if new:
            log.error("integrity: %d installed files differ from the seal: %s", len(bad),
                      ", ".join(self.differences[:5]))
            if self.on_tamper is not None:
                self.on_tamper(bad)

    def status(self) -> dict[str, Any]:
        """The ``integrity`` field of ``agentctl status``."""
        return {"root": str(self.root), "seal": str(self.seal_path),
                "watching": self._ino is not None, "directories": len(self._dirs),
                "checks": self.checks,
                "differences": self.differences[:REPORTED_MAX], "problem": self.problem}
