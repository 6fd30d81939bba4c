"""Channel 4 in agentd: the correlation service (docs/patterns.md, "The service").

:class:`CorrelationService` holds the engine and the pattern library and wires them to
the event bus and the files:

* **Events in.** A raw bus sink (every event, before the bus's per-key limit) through a
  bounded queue drained by the loop, ``batch`` at a time.  What the queue drops under
  load is counted by the bus and reported: one ``correlation/dropped`` {count, total}
  per ``dropped_every_s`` at most, and in the status.  Events of the ``correlation``
  channel are not fed back, so no pattern can feed on its own alerts.
* **Alerts out.** Each match is a ``correlation/alert`` (the pattern's severity; the
  cell its chain began in; attributes :meth:`Match.attrs`, bounded in size) which the
  bus's event log persists and the responder acts on by its ``response``; the last
  ``alerts_kept`` are kept for ``agentctl patterns``.  A match of a pattern tagged
  ``master`` also publishes ``correlation/master-attack`` and calls
  :attr:`CorrelationService.on_master_attack` (the master's respawn, when wired).
* **Bundles.** At start: the pinned keys, the shipped bundle, the stored ones, then
  the update directory; after that, the update directory on inotify events.  Each
  offer publishes ``bundle-loaded`` or ``bundle-refused``; the files are handled by
  :mod:`.service_files`, the control ops by :mod:`.service_ops`.
* **Expiry.** While partial matches are alive, a timer frees the expired ones every
  ``expire_every_s``; with none alive, nothing runs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, cast

from agent.core.errors import KernelError
from agent.core.events import Event, Severity, Sink
from agent.core.policy import Policy, load_policy
from agent.kernel import inotify as ino
from agent.monitor.correlation import service_files as files
from agent.monitor.correlation.engine import Engine
from agent.monitor.correlation.library import Library, Outcome
from agent.monitor.correlation.match import Match
from agent.monitor.correlation.settings import Settings

__all__ = ["SINK_NAME", "BusLike", "CorrelationService", "bounded"]

log = logging.getLogger(__name__)

SINK_NAME = "correlation"
_WATCH = ino.IN_CLOSE_WRITE | ino.IN_MOVED_TO | ino.IN_ONLYDIR | ino.IN_DELETE_SELF \
    | ino.IN_MOVE_SELF
_TEXT_MAX = 256  # characters of one text value in an alert
_LIST_MAX = 32  # items of one list in an alert


class BusLike(Protocol):
    """What the service uses of :class:`agent.daemon.bus.EventBus`."""

    mono: Callable[[], float]

    def add_sink(self, sink: Sink, *, all_events: bool = ..., raw: bool = ...,
                 channel: str | None = ..., queue: int = ..., batch: int = ...,
                 name: str | None = ..., after_batch: Callable[[], None] | None = ...
                 ) -> None: ...
    def remove_sink(self, sink: Sink) -> None: ...
    def emit(self, channel: str, kind: str, *, cell: str | None = ...,
             severity: Severity = ..., **attrs: Any) -> Event: ...
    def sink_stats(self) -> list[dict[str, Any]]: ...


def bounded(value: Any, depth: int = 0) -> Any:
    """``value`` with texts clipped to 256 characters and lists to 32 items (an alert
    is persisted on flash: one attribute of an event must not make it huge)."""
    if isinstance(value, str):
        return value if len(value) <= _TEXT_MAX else value[:_TEXT_MAX - 1] + "…"
    if depth > 8:
        return None
    if isinstance(value, dict):
        out = {k: bounded(v, depth + 1) for k, v in value.items()}
        vals = value.get("values")
        if isinstance(vals, list) and len(vals) > _LIST_MAX:
            out["values_total"] = len(vals)
        return out
    if isinstance(value, list | tuple):
        return [bounded(v, depth + 1) for v in value[:_LIST_MAX]]
    return value


class CorrelationService:
    """See the module doc.  ``policy``: who may install and roll back (``None``: loaded
    from ``policy_path`` at start; unreadable, nobody may)."""

    def __init__(self, bus: BusLike, settings: Settings, *, policy: Policy | None = None,
                 policy_path: Path | None = None, engine: Engine | None = None) -> None:
        self.bus = bus
        self.settings = settings
        self.engine = engine if engine is not None else Engine()
        self.library = Library(self.engine, ())
        self.store = files.Store(settings.store_dir)
        self.policy = policy
        self.policy_path = policy_path
        self.on_master_attack: Callable[[Match], object] | None = None
        self.on_loaded: list[Callable[[], object]] = []  # after a bundle is in place
        self.alerts: collections.deque[dict[str, Any]] = \
            collections.deque(maxlen=settings.alerts_kept)
        self.problems: dict[str, str] = {}  # what keeps the service from doing all it should
        self.dropped_reported = 0
        self.expiries = 0  # expiry timer runs
        self.seen = 0  # events the queue delivered (those of channel correlation too)
        self._last_drop_report = float("-inf")
        self._drop_timer: asyncio.TimerHandle | None = None
        self._expire_timer: asyncio.TimerHandle | None = None
        self._inotify: ino.Inotify | None = None
        self._wd = -1
        bus.add_sink(self._on_event, raw=True, queue=settings.queue, batch=settings.batch,
                     name=SINK_NAME, after_batch=self._after_batch)

    # ------------------------------------------------------------------ start, stop
    async def start(self) -> None:
        """Keys, the shipped bundle, the stored ones, the update directory, the watch.
        Never raises: agentd runs on without patterns, and the status says why."""
        try:
            self._start()
        except Exception as exc:
            log.exception("correlation: start-up failed")
            self._problem("start", f"start-up failed: {exc}")

    def _start(self) -> None:
        if self.policy is None:
            self.policy = self._load_policy()
        keys, bad = files.load_keys(self.settings.keys_dir)
        for path, exc in bad:
            self._refused_event(exc.code, exc.message, str(path))
        self.library = Library(self.engine, keys)
        if not keys:
            self._problem("keys", f"no pinned key in {self.settings.keys_dir}: no bundle "
                          "can be loaded")
        self._load_shipped()
        self._load_store()
        self._watch()
        self.process(files.stems(self.settings.update_dir))

    def _load_policy(self) -> Policy:
        if self.policy_path is None:
            return Policy(source="(none)")
        try:
            return load_policy(str(self.policy_path))
        except Exception as exc:  # PolicyError, OSError: nobody may install
            log.error("correlation: policy %s not loaded, pattern installs are refused: %s",
                      self.policy_path, exc)
            return Policy(source=str(self.policy_path))

    async def close(self) -> None:
        self.bus.remove_sink(self._on_event)
        for t in (self._drop_timer, self._expire_timer):
            if t is not None:
                t.cancel()
        self._drop_timer = self._expire_timer = None
        self._unwatch()

    def _problem(self, key: str, text: str) -> None:
        log.warning("correlation: %s", text)
        self.problems[key] = text

    # ------------------------------------------------------------------ bundles
    def publish(self, out: Outcome) -> Outcome:
        """Publish what an offer or a rollback did (bundle-loaded / bundle-refused)."""
        self.bus.emit("correlation", out.kind, severity=cast(Severity, out.severity),
                      **bounded(out.attrs))
        if out.ok:
            log.info("correlation: loaded patterns version %s from %s (%s patterns)",
                     out.attrs.get("version"), out.attrs.get("origin"),
                     out.attrs.get("patterns"))
            for fn in self.on_loaded:
                fn()
        else:
            log.warning("correlation: refused a bundle from %s: %s: %s",
                        out.attrs.get("origin"), out.attrs.get("reason"),
                        out.attrs.get("message"))
        return out

    def _refused_event(self, code: str, message: str, origin: str) -> None:
        loaded = self.library.current.version if self.library.current else None
        self.bus.emit("correlation", "bundle-refused", severity="alert", reason=code,
                      message=message, origin=origin, loaded=loaded)

    def _load_shipped(self) -> None:
        path = self.settings.bundle
        stem = path.name.removesuffix(files.BUNDLE)
        try:
            pair = files.read_pair(path.parent, stem) if path.name.endswith(files.BUNDLE) \
                else None
        except OSError as exc:
            self._problem("shipped", f"cannot read {path}: {exc.strerror or exc}")
            return
        if pair is None:
            self._problem("shipped", f"no shipped bundle {path} with its {files.SIG}")
            return
        self.publish(self.library.offer(pair.data, pair.sig, str(path)))

    def _load_store(self) -> None:
        """What was loaded from the update directory before: again, in order."""
        for v in self.store.versions():
            cur = self.library.current
            if cur is not None and v <= cur.version:
                self.store.remove(v)  # superseded, e.g. by a newer shipped bundle
                continue
            try:
                pair = self.store.read(v)
            except OSError as exc:
                self._problem("store", f"cannot read stored v{v}: {exc.strerror or exc}")
                continue
            if pair is not None and not self.publish(self.library.offer(
                    pair.data, pair.sig, str(self.store.dir / f"v{v}{files.BUNDLE}"))).ok:
                self.store.remove(v)
        self._prune_store()

    def _prune_store(self) -> None:
        keep = {b.version for b in (self.library.current, self.library.previous) if b}
        try:
            self.store.keep(keep)
        except OSError as exc:
            self._problem("store", f"cannot prune {self.store.dir}: {exc.strerror or exc}")

    def process(self, stems: Iterable[str], origin: str | None = None
                ) -> dict[str, Outcome]:
        """Offer the complete pairs among ``stems`` of the update directory, lowest
        version first, and remove them; a loaded bundle goes to the store."""
        d = self.settings.update_dir
        pairs: list[files.Pair] = []
        for stem in stems:
            try:
                pair = files.read_pair(d, stem)
            except OSError as exc:
                self._problem("update_file", f"cannot read {d / stem}: {exc.strerror or exc}")
                continue
            if pair is not None:
                pairs.append(pair)
        out: dict[str, Outcome] = {}
        for pair in sorted(pairs, key=lambda p: (files.peek_version(p.data), p.stem)):
            res = out[pair.stem] = self.publish(self.library.offer(
                pair.data, pair.sig, origin or str(d / (pair.stem + files.BUNDLE))))
            if res.ok and res.bundle is not None:
                try:
                    self.store.put(res.bundle.version, pair.data, pair.sig)
                    self.problems.pop("store", None)
                except OSError as exc:  # loaded, but a restart will not load it again
                    self._problem("store", f"loaded version {res.bundle.version} is not "
                                  f"stored: {exc}")
                self._prune_store()
            try:
                files.consume(d, pair)
            except OSError as exc:
                self._problem("update_file", f"cannot remove {pair.stem}: {exc}")
        return out

    def rollback(self) -> Outcome:
        """Back to the previous bundle; the one left is no longer stored."""
        cur = self.library.current
        out = self.publish(self.library.rollback())
        if out.ok and cur is not None:
            try:
                self.store.remove(cur.version)
            except OSError as exc:
                self._problem("store", f"cannot remove v{cur.version}: {exc}")
        return out

    # ------------------------------------------------------------------ the watch
    def _watch(self) -> None:
        d = self.settings.update_dir
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o022:
                self._problem("update_dir_mode", f"{d} is writable by group or others: "
                              "only agentd and the fleet's updater should write there")
            self._inotify = self._inotify or ino.Inotify()
            self._wd = self._inotify.add_watch(d, _WATCH)
            asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._on_inotify)
        except (OSError, KernelError) as exc:
            self._problem("update_dir", f"not watching {d}: {exc}")
            self._unwatch()
            return
        self.problems.pop("update_dir", None)

    def _unwatch(self) -> None:
        if self._inotify is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            except RuntimeError:
                pass
            self._inotify.close()
            self._inotify = None
        self._wd = -1

    def _on_inotify(self) -> None:
        if self._inotify is None:
            return
        try:
            events = self._inotify.read()
        except KernelError as exc:
            self._problem("update_dir", f"inotify: {exc}")
            return
        rescan = any(e.overflow for e in events)
        lost = any(e.wd == self._wd and e.mask & (ino.IN_IGNORED | ino.IN_DELETE_SELF |
                                                   ino.IN_MOVE_SELF) for e in events)
        stems = {s for e in events if e.wd == self._wd
                 and (s := files.stem_of(e.name)) is not None}
        if lost:  # the directory went away: make it again, watch it again
            self._unwatch()
            self._watch()
            rescan = True
        self.process(files.stems(self.settings.update_dir) if rescan else sorted(stems))

    # ------------------------------------------------------------------ events
    def _on_event(self, e: Event) -> None:
        self.seen += 1
        if e.channel == "correlation":
            return
        for m in self.engine.feed(e):
            self._alert(m)

    def _alert(self, m: Match) -> None:
        attrs = bounded(m.attrs())
        ev = self.bus.emit("correlation", "alert", cell=m.chain[0].cell,
                           severity=cast(Severity, m.severity), **attrs)
        self.alerts.append({"seq": ev.seq, "ts": ev.ts, "pattern": m.pattern,
                            "severity": m.severity, "response": m.response,
                            "tags": list(m.tags), "cells": attrs["cells"],
                            "latency_s": round(ev.mono - m.chain[-1].mono, 6)})
        if "master" in m.tags:
            hook = self.on_master_attack
            self.bus.emit("correlation", "master-attack", severity="notice",
                          pattern=m.pattern, alert=ev.seq, hooked=hook is not None)
            if hook is not None:
                try:
                    hook(m)
                except Exception:
                    log.exception("correlation: the master-attack hook failed")

    def dropped(self) -> int:
        """Events the engine's queue dropped since start (counted by the bus)."""
        return next((int(s["dropped"]) for s in self.bus.sink_stats()
                     if s.get("name") == SINK_NAME), 0)

    def queued(self) -> int:
        return next((int(s["queued"]) for s in self.bus.sink_stats()
                     if s.get("name") == SINK_NAME), 0)

    def _after_batch(self) -> None:
        if self.dropped() > self.dropped_reported:
            wait = self._last_drop_report + self.settings.dropped_every_s - self.bus.mono()
            if wait <= 0:
                self.report_drops()
            elif self._drop_timer is None:
                self._drop_timer = self._later(wait, self._on_drop_timer)
        if self.engine.live and self._expire_timer is None:
            self._expire_timer = self._later(self.settings.expire_every_s, self._on_expire)

    def report_drops(self) -> None:
        total = self.dropped()
        if total > self.dropped_reported:
            self.bus.emit("correlation", "dropped", severity="notice",
                          count=total - self.dropped_reported, total=total)
            log.warning("correlation: the engine's queue dropped %d events (%d in all)",
                        total - self.dropped_reported, total)
            self.dropped_reported = total
            self._last_drop_report = self.bus.mono()

    def _on_drop_timer(self) -> None:
        self._drop_timer = None
        self.report_drops()

    def _on_expire(self) -> None:
        self._expire_timer = None
        self.expiries += 1
        if not self.queued():  # queued events may be older than now: they come first
            self.engine.expire(self.bus.mono())
        if self.engine.live:
            self._expire_timer = self._later(self.settings.expire_every_s, self._on_expire)

    @staticmethod
    def _later(delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle | None:
        try:
            return asyncio.get_running_loop().call_later(delay, fn)
        except RuntimeError:  # no loop (tests): the next feed sweeps
            return None

    # ------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """The ``correlation`` field of ``agentctl status``."""
        b = self.library.current
        st = self.engine.stats()
        return {"version": b.version if b else None, "signer": b.signer if b else None,
                "patterns": len(self.engine.patterns), "events": st.events,
                "dropped": self.dropped(), "partials": st.partials, "matches": st.matches,
                "previous": self.library.previous.version if self.library.previous else None,
                "update_dir": str(self.settings.update_dir),
                "watching": self._inotify is not None,
                "problems": sorted(self.problems.values())}
