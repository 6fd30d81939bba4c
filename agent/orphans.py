"""Agent-owned kernel objects, found and collected for the reclaim loop (thin adapter).

:class:`KernelObjects` lists what agentd may have left in the kernel, each with the
journaled cell that owns it (or None): cell cgroup leaves, pinned netns files, cell
veths on the agent's bridge and the bridge's VLAN gateways.  :mod:`agent.reclaim`
decides what is an orphan; this module only scans and removes.  Called from a worker
thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent import net
from agent.cgroup import CgroupBackend
from agent.reclaim import CollectOrphan

__all__ = ["KernelObjects"]


class KernelObjects:
    """Scan and collect agent-owned kernel objects: cell cgroup leaves, pinned netns
    files, cell veths on the agent's bridge and the bridge's VLAN gateways.  Called
    from a worker thread.  (Mounts live in the cells' own mount namespaces and die with
    them; nftables objects are not scanned yet.)"""

    def __init__(self, backend: CgroupBackend, bridge: str,
                 netns_dir: Path = net.NETNS_DIR) -> None:
        self.backend = backend
        self.bridge = bridge
        self.netns_dir = netns_dir

    @contextlib.contextmanager
    def _ipr(self) -> Iterator[Any]:
        from pyroute2 import IPRoute
        from pyroute2 import config as pyroute2_config

        pyroute2_config.disable_mp_signal = True  # see agent.masterops.LockedNet
        ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def scan(self, vlan_owner: Mapping[int, str]) -> list[tuple[str, str, str | None]]:
        """``(kind, name, owning cell or None)``; ``vlan_owner`` maps VLAN ids to a
        journaled cell using them (a gateway serves every cell of its VLAN)."""
        out: list[tuple[str, str, str | None]] = [
            ("cgroup", c, c) for c in self.backend.list_cells()]
        out += [("netns", c, c) for c in net.list_cell_netns(self.netns_dir)]
        with self._ipr() as ipr:
            br = ipr.link_lookup(ifname=self.bridge)
            if not br:
                return out
            for v in net.list_cell_veths(ipr):
                if v.master in (None, br[0]):
                    out.append(("veth", v.ifname, v.cell))
            for vid in net.list_vlan_gateways(ipr, self.bridge):
                out.append(("vlan", str(vid), vlan_owner.get(vid)))
        return out

    def collect(self, a: CollectOrphan) -> None:
        if a.object_kind == "cgroup":
            self.backend.kill(a.name)
            self.backend.remove(a.name)
        elif a.object_kind == "netns":
            net.destroy_cell_netns(a.name, self.netns_dir)
        elif a.object_kind in ("veth", "vlan"):
            with self._ipr() as ipr:
                if a.object_kind == "vlan":
                    net.remove_vlan_gateway(ipr, self.bridge, int(a.name))
                else:
                    for idx in ipr.link_lookup(ifname=a.name):
                        ipr.link("del", index=idx)
