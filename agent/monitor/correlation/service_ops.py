"""The correlation service's control ops: ``patterns``, ``patterns.install``,
``patterns.rollback`` (``agentctl patterns``; docs/patterns.md, "agentctl patterns").

* ``patterns`` lists what is loaded (version, signer, counters, each pattern with its
  matches so far, the last alerts), a page at a time so that a reply fits one frame;
  ``name`` gives one pattern with its description.  Read-only, like ``status``.
* ``patterns.install`` takes a bundle and its signature as bytes.  A request is one
  frame (64 KiB), a bundle up to 2 MiB, so the bundle comes in chunks: ``offset`` and
  ``total`` say where each goes, the signature comes with every chunk and names the
  upload (with the caller's uid).  The whole is written into the update directory
  (atomically, so a crash leaves it for the next start) and processed there exactly as
  a pair an updater dropped: the same checks, the same event, the same store.
* ``patterns.rollback`` goes back to the previous bundle.

Installing and rolling back need the ``patterns`` operation in the caller's role
(agent.core.policy: ``may``); a refusal is ``E_POLICY_*``, a refused bundle its
``E_BUNDLE_*`` reason, both as error replies.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2

from agent.core.errors import AgentError, KernelError, RefusedError
from agent.core.protocol import MAX_FRAME, Handler, Peer, arg, check_args
from agent.monitor.correlation import service_files as files
from agent.monitor.correlation.bundle import MAX_BUNDLE_BYTES
from agent.monitor.correlation.library import Outcome
from agent.monitor.correlation.service import CorrelationService

__all__ = ["MAX_UPLOADS", "UPLOAD_IDLE_S", "PatternOps"]

MAX_UPLOADS = 4  # installs under way at once (the oldest is forgotten)
UPLOAD_IDLE_S = 120.0  # an upload with no chunk for this long is forgotten
_PAGE_BUDGET = MAX_FRAME // 2  # bytes of pattern rows in one reply
_SIG_MAX = 4096


@dataclass
class _Upload:
    total: int
    last: float
    buf: bytearray = field(default_factory=bytearray)


class PatternOps:
    def __init__(self, svc: CorrelationService,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.svc = svc
        self.clock = clock
        self._uploads: OrderedDict[tuple[int, bytes], _Upload] = OrderedDict()

    def handlers(self) -> dict[str, Handler]:
        return {"patterns": self.op_patterns, "patterns.install": self.op_install,
                "patterns.rollback": self.op_rollback}

    def _authorize(self, peer: Peer) -> None:
        policy = self.svc.policy
        if policy is None:
            raise RefusedError("E_UNAVAILABLE", "the correlation service is starting",
                               "retry in a moment")
        policy.authorize(peer.uid, peer.gid, "patterns", None, None, 0)

    # ------------------------------------------------------------------ list
    async def op_patterns(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("offset", "name"))
        offset = arg(args, "offset", int, 0)
        name = arg(args, "name", str)
        assert offset is not None
        if offset < 0:
            raise AgentError("E_ARGS", "argument `offset` must not be negative")
        d = self.svc.library.describe()
        rows: list[dict[str, Any]] = d.pop("patterns")
        head = {**d, "dropped": self.svc.dropped(), "problems": self.svc.status()["problems"],
                "total": len(rows), "alerts": list(self.svc.alerts)}
        if name is not None:
            row = next((r for r in rows if r["name"] == name), None)
            if row is None:
                raise AgentError("E_NOT_FOUND", f"no pattern {name!r} is loaded",
                                 "agentctl patterns lists them")
            return {**head, "offset": 0, "next": None, "patterns": [row]}
        page: list[dict[str, Any]] = []
        budget = _PAGE_BUDGET
        nxt: int | None = None
        for i in range(offset, len(rows)):
            row = {k: v for k, v in rows[i].items() if k not in ("about", "digest")}
            budget -= len(cbor2.dumps(row))
            if budget < 0 and page:
                nxt = i
                break
            page.append(row)
        return {**head, "offset": offset, "next": nxt, "patterns": page}

    # ------------------------------------------------------------------ install
    async def op_install(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ("bundle", "sig", "offset", "total"))
        self._authorize(peer)
        chunk = arg(args, "bundle", bytes, required=True)
        sig = arg(args, "sig", bytes, required=True)
        offset = arg(args, "offset", int, 0)
        assert chunk is not None and sig is not None and offset is not None
        total = arg(args, "total", int, len(chunk))
        assert total is not None
        if not 0 < total <= MAX_BUNDLE_BYTES:
            raise RefusedError("E_BUNDLE_SIZE", f"a bundle of {total} bytes: a bundle has 1 "
                               f"to {MAX_BUNDLE_BYTES} bytes", "split the library")
        if len(sig) > _SIG_MAX:
            raise AgentError("E_ARGS", f"a signature of {len(sig)} bytes",
                             "the .sig file agent-patterns sign wrote (64 bytes)")
        now = self.clock()
        for key in [k for k, u in self._uploads.items() if now - u.last > UPLOAD_IDLE_S]:
            del self._uploads[key]
        key = (peer.uid, sig)
        up = self._uploads.pop(key, None)
        if offset == 0:
            up = _Upload(total, now)
        elif up is None or up.total != total or offset != len(up.buf):
            have = 0 if up is None or up.total != total else len(up.buf)
            raise AgentError("E_ARGS", f"a chunk at offset {offset}; the upload is at {have}",
                             "send the bundle again from offset 0")
        up.buf += chunk
        up.last = now
        if len(up.buf) > total:
            raise AgentError("E_ARGS", f"{len(up.buf)} bytes sent for a bundle of {total}",
                             "send the bundle again from offset 0")
        if len(up.buf) < total:
            self._uploads[key] = up
            while len(self._uploads) > MAX_UPLOADS:
                self._uploads.popitem(last=False)
            return {"received": len(up.buf), "total": total}
        return self._finish(peer, bytes(up.buf), sig)

    def _finish(self, peer: Peer, data: bytes, sig: bytes) -> dict[str, Any]:
        """Write the pair into the update directory and process it there."""
        d = self.svc.settings.update_dir
        stem = f"install-{hashlib.sha256(data).hexdigest()[:16]}"
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KernelError.from_oserror("mkdir", str(d), exc) from None
        files.write_atomic(d / (stem + files.SIG), sig)
        files.write_atomic(d / (stem + files.BUNDLE), data)
        res = self.svc.process([stem], origin=f"agentctl uid {peer.uid} pid {peer.pid}")
        out = res.get(stem)
        if out is None:
            raise AgentError("E_INTERNAL", f"the bundle written to {d} was not processed",
                             "see the agentd log")
        return self._result(out)

    @staticmethod
    def _result(out: Outcome) -> dict[str, Any]:
        if out.error is not None:
            raise RefusedError(out.error.code, out.error.message, out.error.hint)
        return dict(out.attrs)

    # ------------------------------------------------------------------ rollback
    async def op_rollback(self, peer: Peer, args: Mapping[str, Any]) -> dict[str, Any]:
        check_args(args, ())
        self._authorize(peer)
        return self._result(self.svc.rollback())
