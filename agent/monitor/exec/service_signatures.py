"""The signature database as channel 1's service holds it: loaded at start, reloaded when
its file changes (inotify on the file's directory: written in place and closed, renamed
over, removed), each load or refusal an event.

* ``exec/signatures-loaded`` (notice): ``path``, ``count``, ``added``, ``removed``,
  ``bad`` (lines skipped) and ``bad_lines`` (the first 20, "line N: what");
* ``exec/signatures-refused`` (alert): the file as a whole was refused (no header, not
  text, too big, unreadable, or gone): ``path``, ``error``, ``kept`` (the signatures
  still in force).  The database is never emptied by accident: only a file holding the
  header and nothing else empties it.

A missing file at start is an empty database (``present`` false).  The file is read and
parsed in a worker thread; the swap happens on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.core.errors import AgentError
from agent.monitor.exec.adapter import IN_Q_OVERFLOW, DirWatch, read_bounded
from agent.monitor.exec.signatures import MAX_BYTES, SignatureDB, SignatureFileError, parse

__all__ = ["SignatureKeeper"]

log = logging.getLogger(__name__)
_MISSING = object()


class SignatureKeeper:
    def __init__(self, bus: Any, path: Path,
                 on_load: Callable[[], None] | None = None) -> None:
        self.bus = bus
        self.path = path
        self.on_load = on_load  # a new database: files allowed before are asked again
        self.db = SignatureDB()
        self.loads = 0
        self._watch: DirWatch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload: asyncio.Task[None] | None = None
        self._again = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            self._watch = DirWatch(self.path.parent)
            self._loop.add_reader(self._watch.fileno(), self._on_change)
        except (AgentError, OSError) as exc:
            log.error("exec: %s is not watched for changes: %s", self.path, exc)
            self.bus.emit("exec", "signatures-unwatched", severity="notice",
                          path=str(self.path), error=str(exc))
        await self.load(initial=True)

    def close(self) -> None:
        if self._watch is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._watch.fileno())
            self._watch.close()
            self._watch = None
        if self._reload is not None:
            self._reload.cancel()

    def _on_change(self) -> None:
        assert self._watch is not None
        events = self._watch.read()
        if not any(name == self.path.name or mask & IN_Q_OVERFLOW for mask, name in events):
            return
        if self._reload is not None and not self._reload.done():
            self._again = True  # a change while loading: load once more after
            return
        assert self._loop is not None
        self._reload = self._loop.create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        self._again = True
        while self._again:
            self._again = False
            await self.load()

    def _read(self) -> tuple[SignatureDB, list[str]] | object:
        try:
            data = read_bounded(self.path, MAX_BYTES)
        except FileNotFoundError:
            return _MISSING
        except OSError as exc:
            raise SignatureFileError(str(self.path), f"cannot read: {exc.strerror}") from None
        db, bad = parse(data, str(self.path))
        return db, [str(b) for b in bad]

    async def load(self, initial: bool = False) -> None:
        """Read the file and swap the database in, or keep the one in force."""
        path = str(self.path)
        try:
            got = await asyncio.to_thread(self._read)
        except SignatureFileError as exc:
            log.error("exec: %s; keeping %d signatures", exc.message, len(self.db))
            self.bus.emit("exec", "signatures-refused", severity="alert", path=path,
                          error=exc.message, kept=len(self.db))
            return
        if got is _MISSING:
            if initial:
                self.bus.emit("exec", "signatures-loaded", severity="notice", path=path,
                              count=0, added=0, removed=0, bad=0, bad_lines=[], present=False)
            else:
                self.bus.emit("exec", "signatures-refused", severity="alert", path=path,
                              error="the file is gone", kept=len(self.db))
            return
        assert isinstance(got, tuple)
        db, bad = got
        added, removed = db.diff(self.db)
        self.db = db
        self.loads += 1
        if self.on_load is not None:
            self.on_load()
        log.info("exec: %d signatures from %s (%d bad lines)", len(db), path, len(bad))
        self.bus.emit("exec", "signatures-loaded", severity="notice", path=path,
                      count=len(db), added=added, removed=removed, bad=len(bad),
                      bad_lines=bad[:20], present=True)
