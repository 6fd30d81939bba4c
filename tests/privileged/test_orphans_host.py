"""agent.orphans against the host's real kernel, in places of our own.

Made here and removed after: a run dir under a temp dir with real tmpfs mounts below
``cells/`` (a ghost cell's, stacked twice; an owned cell's, with a nested one) and one
outside it; a network namespace pinned by agent.net (as agentd pins a cell's) whose
nftables tables stand in for the host's ruleset: the agent's (``agent_host``,
``agent_cell``, ``agent_cell_<cell>``) and foreign ones.  The host's own ruleset and
mounts are never touched.  Scans and collections are real; the decisions come from
agent.reclaim's pure pass.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.core import names
from agent.core import syscalls as abi
from agent.core.errors import KernelError, RefusedError
from agent.core.reclaim import BoxView, CollectOrphan, KernelObject, ReclaimConfig, reclaim_pass
from agent.kernel import libc as ksys
from agent.kernel import netns as kns
from agent.kernel.cgroupv2 import CgroupV2
from agent.kernel.nft import Nft
from agent.kernel.orphans import KernelObjects, host_cell_table, parse_mountinfo


@pytest.fixture(autouse=True)
def _nft() -> None:
    # A tool ./dev test installs: missing, it fails (a skip would hide the table orphans).
    if shutil.which("nft") is None:
        pytest.fail("nft is not installed: ./dev test installs it (nftables)")


AGENT_TABLES = ("agent_host", "agent_cell", "agent_cell_ghost", "agent_cell_owned",
                "agent_cell_UPPER")
FOREIGN = (("ip", "agent_cell_ghost"), ("inet", "other_fw"), ("inet", "agent_cellar"))


@dataclass
class Env:
    tmp: Path
    run: Path
    netns_dir: Path
    pin: Path
    objs: KernelObjects
    mounts: list[Path]

    def tables(self) -> set[tuple[str, str]]:
        out = Nft()._run(["-j", "list", "tables"], None, self.pin, "list tables")
        return {(t["table"]["family"], t["table"]["name"])
                for t in json.loads(out)["nftables"] if "table" in t}

    def mounted(self) -> list[str]:
        return [p for p in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
                if p.startswith(str(self.tmp) + "/")]


def _umount_all(path: Path) -> None:
    for _ in range(8):
        try:
            ksys.umount2(str(path), abi.MNT_DETACH)
        except KernelError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                return
            raise


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    tmp = Path(tmp_path).resolve()
    run, netns_dir, cg = tmp / "run", tmp / "netns", tmp / "cg"
    cg.mkdir()
    (cg / "cgroup.subtree_control").write_text("cpu memory pids\n")
    mounts: list[Path] = []
    cell = f"orph-{uuid.uuid4().hex[:6]}"
    pin = kns.netns_path(cell, netns_dir)
    try:
        kns.create_cell_netns(cell, netns_dir)
        nft = Nft()
        nft.apply([{"add": {"table": {"family": "inet", "name": t}}} for t in AGENT_TABLES]
                  + [{"add": {"table": {"family": f, "name": t}}} for f, t in FOREIGN], pin)
        for rel, times in (("cells/ghost/usb", 2), ("cells/owned/usb", 1),
                           ("cells/owned/usb/deep", 1), ("other", 1)):
            point = run / rel
            point.mkdir(parents=True, exist_ok=True)
            for _ in range(times):
                ksys.mount("tmpfs", str(point), "tmpfs", 0, "size=64k,mode=0755")
                mounts.append(point)
        objs = KernelObjects(CgroupV2(cg), "orphnobr0", netns_dir, run_dir=run, nft=nft,
                             nft_netns=pin)
        yield Env(tmp, run, netns_dir, pin, objs, mounts)
    finally:
        for point in reversed(mounts):
            _umount_all(point)
        kns.destroy_cell_netns(cell, netns_dir)
        _umount_all(netns_dir)  # agent.net made it a shared bind of itself
        assert not [p for p in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
                    if p.startswith(str(tmp) + "/")], "a test mount was left"


def test_scan_finds_the_agents_mounts_and_tables_and_nothing_else(env: Env) -> None:
    found = env.objs.scan({})
    cells = env.run / "cells"
    cell = env.pin.name.removeprefix(names.NETNS_PREFIX)
    assert sorted(found, key=str) == sorted([
        ("netns", cell, cell),  # the pin's mount is this, not a "mount"
        ("mount", str(cells / "ghost/usb"), "ghost"),  # stacked twice: one object
        ("mount", str(cells / "owned/usb"), "owned"),
        ("mount", str(cells / "owned/usb/deep"), "owned"),
        ("nftables", "agent_cell", None),  # a cell's table in the host's netns: no owner
        ("nftables", "agent_cell_ghost", "ghost"),
        ("nftables", "agent_cell_owned", "owned"),
        ("nftables", "agent_cell_UPPER", None),  # not a cell name
    ], key=str)
    assert host_cell_table("ghost") == "agent_cell_ghost"


def test_reclaim_pass_collects_only_the_orphans(env: Env) -> None:
    cell = env.pin.name.removeprefix(names.NETNS_PREFIX)
    objects = tuple(KernelObject(k, n, c, 0.0)  # type: ignore[arg-type]
                    for k, n, c in env.objs.scan({}))
    box = BoxView(None, False, frozenset({"owned", cell}), objects)
    passed = reclaim_pass([], box, 100.0, ReclaimConfig(orphan_grace_s=1.0))
    actions = [a for a in passed if isinstance(a, CollectOrphan)]
    assert actions == passed
    cells = env.run / "cells"
    assert [(a.object_kind, a.name) for a in actions] == [
        ("mount", str(cells / "ghost/usb")),
        ("nftables", "agent_cell"), ("nftables", "agent_cell_UPPER"),
        ("nftables", "agent_cell_ghost")]
    tables_before, mounts_before = env.tables(), env.mounted()
    for a in actions:
        env.objs.collect(a)
    assert sorted(env.objs.scan({}), key=str) == sorted([
        ("netns", cell, cell),
        ("mount", str(cells / "owned/usb"), "owned"),
        ("mount", str(cells / "owned/usb/deep"), "owned"),
        ("nftables", "agent_cell_owned", "owned"),
    ], key=str)
    # exactly the orphans went: both stacked mounts, the three tables
    assert env.tables() == tables_before - {("inet", "agent_cell"), ("inet", "agent_cell_UPPER"),
                                            ("inet", "agent_cell_ghost")}
    assert {("inet", "agent_host"), *FOREIGN} <= env.tables()
    ghost = str(cells / "ghost/usb")
    assert env.mounted() == [p for p in mounts_before if p != ghost]
    assert not (cells / "ghost/usb").exists()  # the empty mount point went
    assert (cells / "ghost").is_dir() and (cells / "owned/usb/deep").is_dir()
    env.objs.collect(actions[0])  # again: nothing mounted, nothing to remove, no error


def test_collect_refuses_what_is_not_a_cells(env: Env) -> None:
    for kind, name in (("nftables", "agent_host"), ("nftables", "other_fw"),
                       ("mount", str(env.run / "other")),
                       ("mount", str(env.run / "cells")),
                       ("mount", str(env.run / "cells/ghost/../../other")),
                       ("mount", "cells/ghost/usb")):
        with pytest.raises(RefusedError):
            env.objs.collect(CollectOrphan(None, "test", kind, name, 99.0))  # type: ignore[arg-type]
    assert ("inet", "agent_host") in env.tables()
    assert str(env.run / "other") in env.mounted()


def test_nested_netns_dir_pins_are_not_mounts(env: Env) -> None:
    # netns_dir below run_dir/cells: its pins stay kind "netns", never "mount"
    cells = env.run / "cells"
    objs = KernelObjects(env.objs.backend, "orphnobr0", cells / "ghost", run_dir=env.run,
                         nft=Nft(nft="/nonexistent/nft"))
    point = cells / "ghost" / (names.NETNS_PREFIX + "x")
    point.touch()
    ksys.mount(str(env.pin), str(point), None, abi.MS_BIND)
    env.mounts.append(point)
    found = objs.scan({})
    assert ("netns", "x", "x") in found
    assert not [f for f in found if f[0] == "mount" and f[1] == str(point)]
    assert ("mount", str(cells / "ghost/usb"), "ghost") in found


def test_no_nft_or_mountinfo_means_not_scanned(env: Env, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    not_a_netns = tmp_path / "plainfile"
    not_a_netns.touch()
    caplog.set_level(logging.INFO, logger="agent.kernel.orphans")
    for nft, netns in ((Nft(nft="/nonexistent/nft"), None), (Nft(), not_a_netns)):
        objs = KernelObjects(env.objs.backend, "orphnobr0", env.netns_dir, run_dir=env.run,
                             mountinfo=tmp_path / "no-mountinfo", nft=nft, nft_netns=netns)
        caplog.clear()
        assert objs.scan_nftables() == [] and objs.scan_mounts() == []
        assert [f for f in objs.scan({}) if f[0] in ("mount", "nftables")] == []
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 2, warned  # one line per kind, not one per scan
        assert any("nftables not scanned" in w for w in warned)
        assert any("mount not scanned" in w and "no-mountinfo" in w for w in warned)
    # the real ones again: scanned, and said so
    objs.nft, objs.nft_netns, objs.mountinfo = Nft(), env.pin, Path("/proc/self/mountinfo")
    caplog.clear()
    assert objs.scan_nftables() and objs.scan_mounts()
    assert any("scanned for orphans again" in r.getMessage() for r in caplog.records)


def test_parse_mountinfo_decodes_escapes() -> None:
    text = ("36 35 98:0 / /run/agent/cells/a\\040b rw,noatime master:1 - tmpfs tmpfs rw\n"
            "37 35 98:0 / /x\\134y\\011z rw - ext4 /dev/root rw\n")
    assert parse_mountinfo(text) == ["/run/agent/cells/a b", "/x\\y\tz"]
