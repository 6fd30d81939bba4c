"""A stop goes on at once for a pid 1 that has already ended.

agentd's stop asks the spawner to SIGTERM pid 1 and, only if that reached a live pid 1,
arms the grace timer (agent.daemon.manager._stop_service); otherwise it posts the exit
at once.  A pid 1 that has ended but is not reaped yet (the loop has not run its pidfd
callback) is a zombie: a kill still succeeds, so the spawner looks at the pidfd itself.
Real child processes and real pidfds; no kernel mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.cell import Exit
from agent.core.cellctx import Paths
from agent.core.sandbox import SpawnSpec
from agent.daemon.bus import EventBus
from agent.daemon.spawner import CellSpawner, ended
from agent.kernel.spawn import Spawned

# a pid 1 that handles SIGTERM (as a real service does) and exits when it gets one
HANDLER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: sys.exit(3))\n"
           "print('ready', flush=True)\n"
           "time.sleep(60)\n")


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def spawner_for(loop: asyncio.AbstractEventLoop, tmp_path: Path,
                child: subprocess.Popen[bytes]) -> tuple[CellSpawner, list[tuple[Any, ...]]]:
    paths = Paths(tmp_path / "state", tmp_path / "run")
    paths.cell_run_dir("c1").mkdir(parents=True)
    exits: list[tuple[Any, ...]] = []

    def spawn(spec: SpawnSpec) -> Spawned:
        return Spawned(child.pid, os.pidfd_open(child.pid), None)

    sp = CellSpawner(loop, paths, EventBus(), lambda *a: exits.append(a), spawn=spawn)
    sp.start("c1", SpawnSpec(argv=("x",), rootfs="/"))
    return sp, exits


def on_loop(loop: asyncio.AbstractEventLoop, fn: Any) -> Any:
    """``fn()`` called from a coroutine on ``loop`` (where the manager calls signal)."""
    async def call() -> Any:
        return fn()
    return loop.run_until_complete(call())


def test_live_pid1_gets_sigterm(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """The control: a live pid 1 is signalled (True), and ends through its handler."""
    child = subprocess.Popen([sys.executable, "-c", HANDLER], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        sp, exits = spawner_for(loop, tmp_path, child)
        assert on_loop(loop, lambda: sp.signal("c1", signal.SIGTERM)) is True

        async def reported() -> None:  # the loop's pidfd callback reaps and reports it
            for _ in range(3000):
                if exits:
                    return
                await asyncio.sleep(0.01)

        loop.run_until_complete(reported())
        assert exits == [("c1", child.pid, Exit(code=3))]  # through its handler
    finally:
        child.kill()
        with contextlib.suppress(ChildProcessError):
            child.wait()
    sp.close()


def test_ended_pid1_is_not_live(loop: asyncio.AbstractEventLoop, tmp_path: Path) -> None:
    """pid 1 exited, not reaped, the loop not run: the spawner says "no live pid 1" (so
    the manager goes on at once), although a kill would still succeed."""
    child = subprocess.Popen([sys.executable, "-c", HANDLER.replace("time.sleep(60)",
                                                                    "sys.exit(5)")],
                             stdout=subprocess.PIPE)
    try:
        sp, exits = spawner_for(loop, tmp_path, child)
        pidfd = os.pidfd_open(child.pid)
        try:
            assert ended(pidfd, 30.0)  # exited: a zombie, since nobody waited for it
        finally:
            os.close(pidfd)
        assert "State:\tZ" in Path(f"/proc/{child.pid}/status").read_text()
        os.kill(child.pid, 0)  # a kill still reaches it
        assert sp.pid("c1") == child.pid  # the loop has not seen it: only the pidfd knows
        assert on_loop(loop, lambda: sp.signal("c1", signal.SIGTERM)) is False
        # its exit went to the manager first, with its status (reaped here: a subreaper's
        # child), so the stop's own "gone" is the second word and changes nothing
        assert exits == [("c1", child.pid, Exit(code=5))]
        assert sp.pid("c1") is None
    finally:
        with contextlib.suppress(ChildProcessError):
            child.wait()
    sp.close()


def test_ended_waits_for_the_exit(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "60"])
    fd = os.pidfd_open(child.pid)
    try:
        assert not ended(fd)
        child.kill()
        assert ended(fd, 30.0)
    finally:
        os.close(fd)
        child.wait()
