"""The loaded pattern library: the bundle in use, the one before it, and the swap.

:class:`Library` is what the correlation service holds (pure: it is handed bytes; the
service reads the files, watches the update directory and publishes the outcomes):

* :meth:`Library.offer` verifies a bundle and its signature against the pinned keys
  (:func:`.bundle.verify`) and, only if all is well, swaps its patterns into the engine
  in one step (unchanged patterns keep their partial matches) and keeps the bundle it
  replaces for a rollback.  A refused bundle changes nothing.
* :meth:`Library.rollback` goes back to the previous bundle (one level).
* :meth:`Library.describe` is what ``agentctl patterns`` lists.

Each call returns an :class:`Outcome`: the ``correlation`` event to publish
(``bundle-loaded``, ``bundle-refused``; docs/events.md) and what changed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.monitor.correlation.bundle import Bundle, BundleError, key_id, verify
from agent.monitor.correlation.engine import Engine, SwapReport
from agent.monitor.correlation.model import ENGINE_VERSION

__all__ = ["Library", "Outcome"]


@dataclass(frozen=True)
class Outcome:
    """``kind``/``severity``/``attrs``: the event on channel ``correlation``."""

    kind: str  # bundle-loaded, bundle-refused
    severity: str
    attrs: dict[str, Any] = field(default_factory=dict)
    bundle: Bundle | None = None  # loaded
    error: BundleError | None = None  # refused
    report: SwapReport | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Library:
    def __init__(self, engine: Engine, keys: Iterable[bytes], *,
                 engine_version: int = ENGINE_VERSION) -> None:
        self.engine = engine
        self.keys = tuple(keys)
        self.engine_version = engine_version
        self.current: Bundle | None = None
        self.previous: Bundle | None = None
        self.origin = ""

    def offer(self, data: bytes, signature: bytes, origin: str = "") -> Outcome:
        """Verify and, if it is good and newer, load a bundle (see the module doc)."""
        try:
            b = verify(data, signature, self.keys, engine_version=self.engine_version,
                       after=self.current.version if self.current else None)
        except BundleError as exc:
            return self._refused(exc, origin, exc.version)
        report = self.engine.swap(b.patterns)
        self.previous, self.current, self.origin = self.current, b, origin
        return self._loaded(b, report, origin)

    def rollback(self) -> Outcome:
        """Back to the bundle loaded before the current one."""
        if self.previous is None or self.current is None:
            return self._refused(BundleError(
                "E_BUNDLE_ROLLBACK", "there is no previous bundle to go back to",
                "a rollback needs a bundle loaded after another"), "rollback")
        b = self.previous
        report = self.engine.swap(b.patterns)
        self.current, self.previous, self.origin = b, None, "rollback"
        return self._loaded(b, report, "rollback")

    def describe(self) -> dict[str, Any]:
        """The loaded bundle and each pattern's counters (``agentctl patterns``)."""
        st = self.engine.stats()
        per = {p.name: p for p in st.patterns}
        b = self.current
        return {
            "engine": self.engine_version,
            "keys": [key_id(k) for k in self.keys],
            "version": b.version if b else None, "signer": b.signer if b else None,
            "digest": b.digest if b else None, "origin": self.origin,
            "previous": self.previous.version if self.previous else None,
            "events": st.events, "partials": st.partials, "matches": st.matches,
            "patterns": [{
                "name": p.name, "digest": p.digest[:16], "about": p.about,
                "severity": p.severity, "response": p.response, "tags": list(p.tags),
                "steps": len(p.steps), "matches": per[p.name].matches,
                "partials": per[p.name].partials,
                "evicted": sum(per[p.name].evicted.values())}
                for p in self.engine.patterns],
        }

    def _loaded(self, b: Bundle, report: SwapReport, origin: str) -> Outcome:
        attrs = {"version": b.version, "signer": b.signer, "digest": b.digest,
                 "origin": origin, "patterns": len(b.patterns), "kept": list(report.kept),
                 "added": list(report.added), "changed": list(report.changed),
                 "removed": list(report.removed), "retired": report.retired}
        return Outcome("bundle-loaded", "notice", attrs, bundle=b, report=report)

    def _refused(self, exc: BundleError, origin: str, version: int | None = None
                 ) -> Outcome:
        loaded = self.current.version if self.current else None
        attrs = {"reason": exc.code, "message": exc.message, "origin": origin,
                 "loaded": loaded}
        # a bundle needing a newer agent, a rollback with nothing to go back to, the
        # loaded version delivered again: no attack; anything else may be one
        calm = exc.code in ("E_BUNDLE_ENGINE", "E_BUNDLE_ROLLBACK") or (
            exc.code == "E_BUNDLE_VERSION" and version is not None and version == loaded)
        return Outcome("bundle-refused", "notice" if calm else "alert", attrs, error=exc)
