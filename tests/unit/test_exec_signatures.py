"""The signature database as channel 1 holds it: loaded at start, reloaded when its file
changes (a real inotify on a temporary directory), never emptied by accident."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from agent.daemon.bus import EventBus
from agent.monitor.exec.service_signatures import SignatureKeeper
from agent.monitor.exec.signatures import HEADER

H1, H2 = "1" * 64, "2" * 64


async def until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {what}")


def test_reloads_on_change_and_keeps_the_database_on_a_refused_file(tmp_path: Path) -> None:
    path = tmp_path / "exec" / "signatures.txt"
    bus = EventBus()
    keeper = SignatureKeeper(bus, path)

    def kinds() -> list[str]:
        return [e.kind for e in bus.recent(channel="exec")]

    async def go() -> None:
        await keeper.start()  # no file yet: empty, said so
        assert len(keeper.db) == 0 and kinds() == ["signatures-loaded"]
        path.write_text(f"{HEADER}\n{H1} one\nnot-a-hash\n")  # written in place
        await until(lambda: len(keeper.db) == 1, "first load")
        loaded = bus.recent(channel="exec")[-1]
        assert loaded.attrs["bad"] == 1 and loaded.attrs["bad_lines"][0].startswith("line 3")
        tmp = path.with_suffix(".new")  # renamed over: the usual atomic update
        tmp.write_text(f"{HEADER}\n{H1} one\n{H2} two\n")
        os.replace(tmp, path)
        await until(lambda: len(keeper.db) == 2, "the renamed file")
        assert bus.recent(channel="exec")[-1].attrs["added"] == 1
        path.write_bytes(b"")  # truncated: refused as a whole, the two stay
        await until(lambda: kinds()[-1] == "signatures-refused", "a refusal")
        assert len(keeper.db) == 2 and bus.recent(channel="exec")[-1].attrs["kept"] == 2
        path.unlink()  # gone: refused too
        await until(lambda: kinds().count("signatures-refused") == 2, "the second refusal")
        assert len(keeper.db) == 2
        path.write_text(HEADER + "\n")  # the header alone empties it, on purpose
        await until(lambda: len(keeper.db) == 0, "the emptied database")
        keeper.close()

    asyncio.run(go())
