"""The master's responses to what the security channels report (issue 11).

A bus sink (inline: deciding is a table lookup) sees every kept event of the monitor
channels with severity notice or alert, counts each cell's alerts (``agentctl ps``), and
asks :class:`agent.core.responses.ResponsePolicy` what to do; a correlation alert carries
its pattern's response in ``attrs["response"]``.  What it decides is carried out off the
sink, in a task on the loop (a freeze or a stop takes time):

* ``kill``: the process the event names (``hpid``), through a pidfd, only if the pid is
  still in the cell's cgroup (a pid the cell no longer holds may be anyone's by now);
* ``freeze``: the cell's cgroup freezer;
* ``isolate``: the cell's bridge port goes down (:func:`agent.kernel.ports.set_cell_port`);
* ``stop``: the cell is stopped as by ``agentctl stop``.

At most one response of a kind per cell every ``repeat_s`` seconds; each one carried out,
or failed, is itself an event (channel ``master``, kind ``response``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from agent.core.errors import AgentError
from agent.core.events import Event
from agent.core.lifecycle import Event as CellEvent
from agent.core.responses import Response, ResponsePolicy
from agent.daemon.bus import EventBus
from agent.daemon.cells import CellEntry

__all__ = ["MONITOR_CHANNELS", "Responder"]

log = logging.getLogger(__name__)

MONITOR_CHANNELS = frozenset({"exec", "syscall", "proc", "host", "net", "correlation"})


class Backend(Protocol):
    def freeze(self, cell: str, timeout: float = 5.0) -> None: ...
    def pid_to_cell(self, pid: int) -> str | None: ...


class Cells(Protocol):
    @property
    def cells(self) -> Mapping[str, CellEntry]: ...
    def post(self, e: CellEntry, ev: CellEvent) -> None: ...


class Responder:
    """Decides and carries out responses; see the module doc."""

    def __init__(self, bus: EventBus, cells: Cells, backend: Backend,
                 policy: ResponsePolicy | None = None, *,
                 isolate: Callable[[str, bool], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.host = cells
        self.backend = backend
        self.policy = policy or ResponsePolicy()
        self.isolate = isolate
        self.clock = clock
        self.done: dict[str, int] = {r.value: 0 for r in Response}
        self._last: dict[tuple[str, Response], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self) -> None:
        self.bus.add_sink(self.on_event, name="responder")

    def close(self) -> None:
        self.bus.remove_sink(self.on_event)
        for task in self._tasks:
            task.cancel()

    def status(self) -> dict[str, int]:
        return dict(self.done)

    # ------------------------------------------------------------------ deciding
    def on_event(self, ev: Event) -> None:
        if ev.channel not in MONITOR_CHANNELS or ev.cell is None or ev.severity == "info":
            return
        e = self.host.cells.get(ev.cell)
        if e is None:
            return
        if ev.severity == "alert":
            e.alerts += 1
        response = self._decide(ev)
        if response is Response.RECORD:
            return
        key, now = (ev.cell, response), self.clock()
        if now - self._last.get(key, -1e18) < self.policy.repeat_s:
            return
        self._last[key] = now
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._carry_out(e, response, ev))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _decide(self, ev: Event) -> Response:
        if ev.channel == "correlation" and ev.kind == "alert":
            pattern = ev.attrs.get("pattern")
            own = self.policy.override("correlation", pattern) \
                if isinstance(pattern, str) else None
            if own is not None:  # the operator's [responses] over the pattern's
                return own
            with contextlib.suppress(ValueError):
                return Response(ev.attrs.get("response", "record"))
            return Response.RECORD
        reason = ev.attrs.get("reason")
        return self.policy.decide(ev.cell, ev.channel, ev.kind,
                                  reason if isinstance(reason, str) else None)

    # ------------------------------------------------------------------ acting
    async def _carry_out(self, e: CellEntry, response: Response, ev: Event) -> None:
        attrs: dict[str, Any] = {"response": response.value, "for_seq": ev.seq,
                                 "for": f"{ev.channel}/{ev.kind}"}
        try:
            attrs.update(await self._act(e, response, ev))
            ok = True
        except (AgentError, OSError) as exc:
            attrs["error"] = str(exc)
            ok = False
        if ok:
            self.done[response.value] += 1
        self.bus.emit("master", "response", cell=e.name,
                      severity="alert" if ok else "notice", ok=ok, **attrs)

    async def _act(self, e: CellEntry, response: Response, ev: Event) -> dict[str, Any]:
        if response is Response.KILL:
            return {"killed": self._kill(e.name, ev.attrs.get("hpid"))}
        if response is Response.FREEZE:
            await asyncio.to_thread(self.backend.freeze, e.name)
            return {}
        if response is Response.ISOLATE:
            if self.isolate is None:
                raise AgentError("E_UNAVAILABLE", "isolate: no network adapter")
            return {"port_down": await asyncio.to_thread(self.isolate, e.name, False)}
        self.host.post(e, CellEvent.STOP_REQUESTED)
        return {}

    def _kill(self, cell: str, hpid: object) -> int | None:
        """SIGKILL ``hpid`` if it is still a process of ``cell``; the pid killed, or None."""
        if not isinstance(hpid, int) or isinstance(hpid, bool) or hpid <= 1:
            return None
        try:
            fd = os.pidfd_open(hpid)
        except ProcessLookupError:
            return None
        try:
            # checked after the pidfd is held: the pid cannot be recycled under us now
            if self.backend.pid_to_cell(hpid) != cell:
                return None
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            return hpid
        finally:
            os.close(fd)
