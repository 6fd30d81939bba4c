"""The fast paths of cell creation work on the box's kernel (functional only, no timings).

* netns creation and the inside configuration fork no process (a thread enters the
  netns; pyroute2's NetNS helper is not used) and leave no thread behind;
* a spawned cell with a cgroup joins it late but still execs inside it, with its cgroup
  namespace rooted at the leaf, under a tight cpu.max.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from agent.core import names
from agent.core.sandbox import SpawnSpec, UidMap
from agent.kernel import bridge as kbr
from agent.kernel import net
from agent.kernel import netns as kns
from agent.kernel.spawn import spawn_cell

BRIDGE = "agtpbr0"
IMAGE = Path("/usr/share/agent/images/demo")


@pytest.fixture
def ipr() -> Iterator[Any]:
    h = IPRoute()
    try:
        kbr.ensure_bridge(h, BRIDGE)
        kbr.ensure_vlan_gateway(h, BRIDGE, 310, "10.79.0.1/24")
        yield h
    finally:
        kbr.remove_vlan_gateway(h, BRIDGE, 310)
        kbr.delete_bridge(h, BRIDGE)
        h.close()


def test_netns_and_link_fork_nothing(ipr: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cell = f"agtp-{secrets.token_hex(3)}"

    def no_fork() -> int:
        raise AssertionError("a process was forked")

    threads = threading.active_count()
    monkeypatch.setattr(os, "fork", no_fork)
    path = kns.create_cell_netns(cell)
    try:
        net.create_cell_link(ipr, cell, path, BRIDGE, 310, "10.79.0.5/24", "10.79.0.1")
        ns = kns.open_netns(path)
        try:
            links = {str(m.get_attr("IFLA_IFNAME")): m for m in ns.link("dump")}
            assert set(links) == {"lo", "eth0"}
            assert all(m["flags"] & 1 for m in links.values())  # IFF_UP
            eth0 = links["eth0"]["index"]
            addrs = {(m.get_attr("IFA_ADDRESS"), m["prefixlen"]) for m in ns.addr("dump")
                     if m["index"] == eth0 and m["family"] == 2}
            assert addrs == {("10.79.0.5", 24)}
            gws = [r.get_attr("RTA_GATEWAY") for r in ns.route("dump")
                   if r["dst_len"] == 0 and r.get_attr("RTA_GATEWAY")]
            assert gws == ["10.79.0.1"]
        finally:
            ns.close()
        host = names.veth_names(cell)[0]
        idx = ipr.link_lookup(ifname=host)[0]
        msg = ipr.link("get", index=idx)[0]
        assert msg.get_attr("IFLA_IFALIAS") == net.ALIAS_PREFIX + cell
        assert msg.get_attr("IFLA_MASTER") == ipr.link_lookup(ifname=BRIDGE)[0]
        assert msg["flags"] & 1
    finally:
        net.destroy_cell_link(ipr, cell)
        kns.destroy_cell_netns(cell)
    assert not ipr.link_lookup(ifname=names.veth_names(cell)[0])
    assert not path.exists()
    assert threading.active_count() == threads


def test_cell_execs_in_its_throttled_cgroup(tmp_path: Path) -> None:
    if not IMAGE.is_dir():
        pytest.fail(f"no demo image at {IMAGE}")
    cg = Path(f"/sys/fs/cgroup/agtp-{secrets.token_hex(3)}")
    cg.mkdir()
    r, w = os.pipe()
    try:
        if (cg / "cpu.max").exists():  # 10 %: the setup must not run under it
            (cg / "cpu.max").write_text("10000 100000\n")
        spec = SpawnSpec(argv=("/bin/busybox", "sh", "-c", "cat /proc/self/cgroup; sleep 30"),
                         rootfs=str(IMAGE), cgroup_path=str(cg), stdout=w,
                         userns=UidMap(900000))  # uid 0 without one is refused
        cell = spawn_cell(spec)
        os.close(w)
        w = -1
        try:
            assert str(cell.pid) in (cg / "cgroup.procs").read_text().split()
            deadline = time.monotonic() + 30
            seen = b""
            while b"\n" not in seen and time.monotonic() < deadline:
                seen += os.read(r, 100)
            assert seen.decode().strip() == "0::/"  # cgroup namespace rooted at the leaf
        finally:
            os.kill(cell.pid, 9)
            os.waitpid(cell.pid, 0)
            os.close(cell.pidfd)
            if cell.seccomp_fd is not None:
                os.close(cell.seccomp_fd)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.1)
