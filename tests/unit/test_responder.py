"""agent.daemon.responder: responses carried out for the monitors' events, at most one of
a kind per cell per repeat interval, each one an event; kill only a pid still in the cell."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

from agent.core.lifecycle import Event as CellEvent
from agent.core.responses import ResponsePolicy, parse_responses
from agent.daemon.bus import EventBus
from agent.daemon.responder import Responder


class Entry:
    def __init__(self, name: str) -> None:
        self.name = name
        self.alerts = 0


class Cells:
    def __init__(self, *names: str) -> None:
        self.cells = {n: Entry(n) for n in names}
        self.posted: list[tuple[str, CellEvent]] = []

    def post(self, e: Any, ev: CellEvent) -> None:
        self.posted.append((e.name, ev))


class Backend:
    def __init__(self, owner: dict[int, str]) -> None:
        self.owner = owner
        self.frozen: list[str] = []

    def freeze(self, cell: str, timeout: float = 5.0) -> None:
        self.frozen.append(cell)

    def pid_to_cell(self, pid: int) -> str | None:
        return self.owner.get(pid)


def _run(policy: ResponsePolicy, events: list[dict[str, Any]], owner: dict[int, str],
         clock: list[float] | None = None) -> tuple[EventBus, Cells, Backend, Responder]:
    async def scenario() -> tuple[EventBus, Cells, Backend, Responder]:
        bus = EventBus()
        cells, backend = Cells("web", "tv"), Backend(owner)
        t = clock or [0.0]
        r = Responder(bus, cells, backend, policy, isolate=lambda c, up: True,
                      clock=lambda: t[0])
        r.attach()
        for e in events:
            bus.emit(e.pop("channel"), e.pop("kind"), cell=e.pop("cell"),
                     severity=e.pop("severity", "alert"), **e)
            await asyncio.sleep(0)
        await asyncio.gather(*r._tasks)  # the responses carried out
        return bus, cells, backend, r

    return asyncio.run(scenario())


def test_records_by_default_and_counts_alerts() -> None:
    bus, cells, _backend, r = _run(ResponsePolicy(), [
        {"channel": "net", "kind": "scan", "cell": "web"},
        {"channel": "net", "kind": "flow", "cell": "web", "severity": "info"},
        {"channel": "tuner", "kind": "resize", "cell": "web"},  # not a monitor channel
    ], {})
    assert cells.cells["web"].alerts == 1 and cells.cells["tv"].alerts == 0
    assert bus.recent(kind="response") == [] and r.status()["kill"] == 0


def test_kill_only_a_pid_still_in_the_cell() -> None:
    victim = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        policy = parse_responses({"exec/exec-denied": "kill"})
        bus, _cells, _b, r = _run(policy, [
            {"channel": "exec", "kind": "exec-denied", "cell": "web", "hpid": other.pid},
        ], {other.pid: "tv"})  # that pid is not web's: left alone
        assert other.poll() is None
        (resp,) = bus.recent(kind="response")
        assert resp.attrs["killed"] is None and resp.attrs["ok"]
        bus, _cells, _b, r = _run(policy, [
            {"channel": "exec", "kind": "exec-denied", "cell": "web", "hpid": victim.pid},
        ], {victim.pid: "web"})
        assert victim.wait(5) == -9
        (resp,) = bus.recent(kind="response")
        assert resp.attrs["killed"] == victim.pid and resp.cell == "web"
        assert resp.attrs["for"] == "exec/exec-denied" and r.status()["kill"] == 1
    finally:
        for p in (victim, other):
            p.kill()
            p.wait()


def test_freeze_isolate_stop_and_the_repeat_limit() -> None:
    policy = parse_responses({"net/scan": "freeze", "net/l2-drop": "isolate",
                              "syscall/denied": "stop"})
    clock = [0.0]
    bus, cells, backend, _r = _run(policy, [
        {"channel": "net", "kind": "scan", "cell": "web"},
        {"channel": "net", "kind": "scan", "cell": "web"},  # within repeat_s: not again
        {"channel": "net", "kind": "l2-drop", "cell": "tv", "reason": "arp"},
        {"channel": "syscall", "kind": "denied", "cell": "tv", "severity": "notice"},
    ], {}, clock)
    assert backend.frozen == ["web"]
    assert cells.posted == [("tv", CellEvent.STOP_REQUESTED)]
    kinds = sorted(e.attrs["response"] for e in bus.recent(kind="response"))
    assert kinds == ["freeze", "isolate", "stop"]
    assert cells.cells["tv"].alerts == 1  # the notice is no alert


def test_a_correlation_alert_carries_its_response() -> None:
    _bus, _cells, backend, _r = _run(ResponsePolicy(), [
        {"channel": "correlation", "kind": "alert", "cell": "tv", "response": "freeze",
         "pattern": "shared-drop-exec"},
    ], {})
    assert backend.frozen == ["tv"]



def test_the_operator_overrides_a_patterns_response_by_its_name() -> None:
    alert = {"channel": "correlation", "kind": "alert", "cell": "tv", "response": "freeze",
             "pattern": "escapes-across-cells"}
    # record for that one pattern: nothing done; another pattern keeps its own response
    policy = parse_responses({"correlation/escapes-across-cells": "record"})
    _bus, _cells, backend, _r = _run(policy, [dict(alert)], {})
    assert backend.frozen == []
    _bus, _cells, backend, _r = _run(policy, [dict(alert, pattern="memfd-across-cells")], {})
    assert backend.frozen == ["tv"]
    # "correlation/*" hardens them all; a catch-all of every channel does not touch them
    _bus, cells, _b, _r = _run(parse_responses({"correlation/*": "stop"}), [dict(alert)], {})
    assert cells.posted == [("tv", CellEvent.STOP_REQUESTED)]
    _bus, _cells, backend, _r = _run(parse_responses({"*/*": "record"}), [dict(alert)], {})
    assert backend.frozen == ["tv"]
