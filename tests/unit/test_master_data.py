"""The cell manager's data dirs and uid ranges against recording fakes: ranges follow
service names across agentd restarts in any order, a data image is the service's own,
a foreign source needs a share, and admission keeps the journal's room.

The data image adapter is test_cellops.FakeImages (no loop devices); the real one is
tested in tests/privileged/test_dataimage_host.py and tests/guest/test_data_box.py."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_cellops import FakeImages
from test_master import OVERLAY, Kernel, arun, kinds, manager

from agent.core.config import AgentConfig
from agent.core.errors import AgentError
from agent.core.slots import SLOT_RECORD
from agent.daemon.bus import EventBus
from agent.daemon.manager import CellManager
from agent.kernel.journal import read_journal

DATA_APP = """name = "{name}"
[service]
command = "/bin/busybox"
args = ["sleep", "3600"]
uid = 7
gid = 8
[image]
root = "/usr/share/agent/images/demo"
[[writable]]
kind = "data"
path = "/tmp"
{extra}
[lifecycle]
mode = "service"
restart = "no"
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Any]:
    """test_master's environment: the shipped services and policy, a demo image."""
    services = tmp_path / "services"
    shutil.copytree(OVERLAY / "services", services)
    image = tmp_path / "fs/usr/share/agent/images/demo"
    for d in ("bin", "www", "tmp"):
        (image / d).mkdir(parents=True)
    (image / "bin/busybox").write_text("")
    (image / "bin/busybox").chmod(0o755)
    cfg = AgentConfig(state_dir=tmp_path / "state", run_dir=tmp_path / "run",
                      services_dir=services, policy_path=OVERLAY / "policy.toml")
    return {"cfg": cfg, "kernel": Kernel(), "tmp": tmp_path, "bus": EventBus()}


def write(env: dict[str, Any], name: str, extra: str = "") -> None:
    (env["cfg"].services_dir / f"{name}.toml").write_text(DATA_APP.format(name=name,
                                                                         extra=extra))


async def with_images(env: dict[str, Any], images: FakeImages, **kw: Any
                      ) -> CellManager:
    mgr, _ = await manager(env, start=False, **kw)
    mgr.dirs.images = images  # type: ignore[assignment]
    await mgr.start()
    return mgr


def bases(mgr: CellManager) -> dict[str, int | None]:
    return {n: e.alloc.uid_base for n, e in mgr.cells.items()}


def test_uid_ranges_follow_names_across_agentd_restarts_in_any_order(
        env: dict[str, Any]) -> None:
    names = ["demo-web", "demo-client", "demo-echo"]

    async def main() -> None:
        images = FakeImages()
        mgr = await with_images(env, images)
        for n in names:
            await mgr.run(n, 0, 0)
        first = bases(mgr)
        assert len(set(first.values())) == 3
        for n in names:
            await mgr.stop(n, 0, 0)
        await mgr.close()
        for order in (list(reversed(names)), [names[1], names[2], names[0]]):
            mgr = await with_images(env, images)
            assert mgr.journal is not None
            mgr.journal.compact()  # the table survives compaction too
            for n in order:
                await mgr.run(n, 0, 0)
            assert bases(mgr) == first
            for n in order:
                await mgr.stop(n, 0, 0)
            mgr.journal.journal.abandon()  # and a kill -9
        recs = [r for r in read_journal(env["cfg"].state_dir / "agent.journal").records
                if r.t == SLOT_RECORD]
        assert sorted(r.data["name"] for r in recs) == sorted(names)

    arun(main)


def test_a_data_dir_is_the_services_own_image_and_outlives_its_cell(
        env: dict[str, Any]) -> None:
    write(env, "data-app", 'size = "8M"')

    async def main() -> None:
        images = FakeImages()
        mgr = await with_images(env, images)
        out = await mgr.run("data-app", 0, 0)
        base = mgr.cells["data-app"].alloc.uid_base
        assert out["state"] == "running" and base is not None
        (req,) = images.mounted.values()
        cfg = env["cfg"]
        assert req.image == cfg.state_dir / "data/data-app.img"
        assert req.mount == cfg.run_dir / "cells/data-app/data"
        assert (req.size, req.uid, req.gid, req.id_base, req.readonly) == (
            8 << 20, base + 7, base + 8, base, False)
        await mgr.stop("data-app", 0, 0)
        assert images.mounted == {} and req.image.exists()
        assert not (cfg.run_dir / "cells/data-app").exists()

    arun(main)


def test_another_services_source_needs_a_share_and_is_read_only(env: dict[str, Any],
                                                               tmp_path: Path) -> None:
    write(env, "data-app")
    write(env, "data-thief", 'source = "data-app"')

    async def main() -> None:
        images = FakeImages()
        mgr = await with_images(env, images)
        with pytest.raises(AgentError) as ei:
            await mgr.run("data-thief", 0, 0)
        assert ei.value.code == "E_POLICY_SHARE"
        assert "refused" in kinds(env["bus"], "data-thief")
        assert images.mounted == {} and mgr.cells == {}
        policy = env["cfg"].policy_path.read_text()
        shared = tmp_path / "policy.toml"
        shared.write_text(policy + '\n[[share]]\ndata = "data-app"\nreaders = ["data-thief"]\n')
        from agent.core.policy import load_policy
        mgr.policy = load_policy(str(shared))
        with pytest.raises(AgentError) as ei:  # shared, but the owner never ran
            await mgr.run("data-thief", 0, 0)
        assert ei.value.code == "E_DATA_SOURCE" and ei.value.hint == "run data-app once first"
        await mgr.run("data-app", 0, 0)
        await mgr.run("data-thief", 0, 0)
        reader = images.mounted[env["cfg"].run_dir / "cells/data-thief/data"]
        assert reader.readonly and reader.size == 0
        assert reader.image == env["cfg"].state_dir / "data/data-app.img"

    arun(main)


def test_admission_keeps_the_journals_room(env: dict[str, Any]) -> None:
    write(env, "data-big", 'size = "100M"')
    write(env, "data-app", 'size = "8M"')

    async def main() -> None:
        images = FakeImages(avail=100 << 20)  # 100M free, 16M of it the journal's
        mgr = await with_images(env, images)
        for dry in (True, False):
            with pytest.raises(AgentError) as ei:
                await mgr.run("data-big", 0, 0, dry_run=dry)
            assert ei.value.code == "E_DATA_SPACE", ei.value
        assert mgr.cells == {} and images.mounted == {}
        assert "E_DATA_SPACE" in {e.attrs.get("code") for e in env["bus"].recent(
            None, cell="data-big", kind="refused")}
        await mgr.run("data-app", 0, 0)

    arun(main)


def test_a_full_uid_table_refuses_with_a_code(env: dict[str, Any]) -> None:
    from dataclasses import replace
    env["cfg"] = replace(env["cfg"], uid_slots=2)

    async def main() -> None:
        mgr = await with_images(env, FakeImages())
        await mgr.run("demo-web", 0, 0)
        await mgr.run("demo-echo", 0, 0)
        with pytest.raises(AgentError) as ei:
            await mgr.run("demo-client", 0, 0)
        assert ei.value.code == "E_USERNS_FULL"
        await mgr.stop("demo-echo", 0, 0)  # holds no data: its range may be given away
        await mgr.run("demo-client", 0, 0)
        assert mgr.slots.slot_of("demo-echo") is None
        await asyncio.sleep(0)

    arun(main)
