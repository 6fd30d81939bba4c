"""Agent-owned kernel objects, found and collected for the reclaim loop (thin adapter).

:class:`KernelObjects` lists what agentd may have left in the kernel, each with the
journaled cell that owns it (or None); :mod:`agent.core.reclaim` decides what is an orphan,
this module only scans and removes.  Called from a worker thread.  Each kind covers
exactly one set of objects, so nothing is counted (or removed) twice:

``cgroup``
    a cell's leaf under the agent's cgroup subtree (the backend's ``list_cells``).
``netns``
    a pinned network namespace ``<netns_dir>/cell-<cell>``: the pin file *and* the
    nsfs bind mount on it (collect = unmount + unlink).  A cell's own nftables table
    (``inet agent_cell``) and everything else in that namespace die with it, so they
    are not scanned on their own.
``veth``
    a cell's host-side veth (``vc-*``) on the agent's bridge (or on no bridge).
``vlan``
    a VLAN gateway ``<bridge>.N`` (owned by a journaled cell on VLAN N).
``mount``
    a mount of agentd's (the host's) mount namespace whose mount point is strictly
    below ``<run_dir>/cells/``: the cell's run dir, where anything mounted for a cell
    from the host side lives; the owner is the first path component.  Mount points are
    reported once each (stacked mounts on one point are one object, a nested mount is
    its own).  Not covered: the netns pins (kind ``netns``, even when ``netns_dir``
    lies below ``run_dir``), the shared bind of ``netns_dir`` on itself (agentd's own)
    and the mounts a cell makes in its own mount namespace (they die with it).
    Collect = ``umount2(MNT_DETACH)`` until nothing is mounted there, then remove the
    mount point if it is empty (everything below ``<run_dir>/cells`` is agentd's).
``nftables``
    an ``inet`` table of the agent's naming in the host's netns (``nft_netns``; None:
    agentd's own): ``agent_cell_<cell>`` (a host-side table of one cell) and a stray
    ``agent_cell`` (a cell's table that belongs in the cell's netns: owner None).  The
    host forward table ``agent_host`` is agentd's own and never reported.  Collect =
    delete the table (agent.kernel.nft, one transaction).

The mount and nftables scans are one read of ``mountinfo`` and one ``nft -j list
tables``; a missing ``nft``, a kernel without nf_tables or an unreadable ``mountinfo``
make that kind "not scanned" (a log line), never a failed pass.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.core import firewall, names
from agent.core import syscalls as abi
from agent.core.errors import AgentError, KernelError, RefusedError
from agent.core.names import check_cell_name
from agent.core.reclaim import CollectOrphan, ObjectKind
from agent.kernel import bridge, net, netns
from agent.kernel import libc as ksys
from agent.kernel.cgroup import CgroupBackend
from agent.kernel.nft import Nft

__all__ = [
    "HOST_CELL_TABLE_PREFIX",
    "MOUNTINFO",
    "RUN_DIR",
    "Found",
    "KernelObjects",
    "host_cell_table",
    "parse_mountinfo",
]

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/agent")  # agent.core.config's default run_dir
MOUNTINFO = Path("/proc/self/mountinfo")
HOST_CELL_TABLE_PREFIX = firewall.CELL_TABLE + "_"
_UMOUNT_NOFOLLOW = 8  # <sys/mount.h>: a symlink put there is not followed
_MAX_STACK = 32  # umounts of one mount point before giving up (stacked mounts)
_ESCAPE = re.compile(r"\\([0-7]{3})")

Found = tuple[ObjectKind, str, str | None]  # (kind, name, owning cell or None)


def host_cell_table(cell: str) -> str:
    """The name of a cell's table in the host's netns: ``agent_cell_<cell>``."""
    return HOST_CELL_TABLE_PREFIX + check_cell_name(cell)


def _owner(name: str) -> str | None:
    try:
        return check_cell_name(name)
    except AgentError:
        return None


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[str]:
    """Mount points of ``/proc/<pid>/mountinfo`` text, octal escapes decoded, in order."""
    out = []
    for line in text.splitlines():
        f = line.split(" ")
        if len(f) > 4:
            out.append(_unescape(f[4]))
    return out


def _below(path: str, top: Path) -> bool:
    """``path`` (absolute, normalized) is strictly below ``top``."""
    return (os.path.isabs(path) and os.path.normpath(path) == path
            and path.startswith(str(top) + "/"))


class KernelObjects:
    """Scan and collect agent-owned kernel objects (see the module docstring for the
    kinds).  Every place it looks is a parameter: ``netns_dir`` (pins), ``run_dir``
    (agentd's run dir: mounts below ``run_dir/cells``), ``mountinfo`` (whose mount
    namespace), ``nft`` (the runner) and ``nft_netns`` (a pinned netns whose tables are
    scanned; None: agentd's own, the host's)."""

    def __init__(self, backend: CgroupBackend, bridge: str,
                 netns_dir: Path = netns.NETNS_DIR, *, run_dir: Path = RUN_DIR,
                 mountinfo: Path = MOUNTINFO, nft: Nft | None = None,
                 nft_netns: Path | None = None) -> None:
        self.backend = backend
        self.bridge = bridge
        self.netns_dir = netns_dir
        # mountinfo shows real paths (/var/run/agent is /run/agent there)
        self.cells_dir = Path(os.path.realpath(run_dir)) / "cells"
        self._pins = Path(os.path.realpath(netns_dir))
        self.mountinfo = mountinfo
        self.nft = nft
        self.nft_netns = nft_netns
        self._unscanned: dict[str, str] = {}  # kind -> why (logged once per new reason)

    @contextlib.contextmanager
    def _ipr(self) -> Iterator[Any]:
        from pyroute2 import IPRoute
        from pyroute2 import config as pyroute2_config

        pyroute2_config.disable_mp_signal = True  # see agent.kernel.net.HostNet._ipr
        ipr = IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    def scan(self, vlan_owner: Mapping[int, str]) -> list[Found]:
        """``(kind, name, owning cell or None)``; ``vlan_owner`` maps VLAN ids to a
        journaled cell using them (a gateway serves every cell of its VLAN)."""
        out: list[Found] = [("cgroup", c, c) for c in self.backend.list_cells()]
        out += [("netns", c, c) for c in netns.list_cell_netns(self.netns_dir)]
        out += self.scan_mounts()
        out += self.scan_nftables()
        with self._ipr() as ipr:
            br = ipr.link_lookup(ifname=self.bridge)
            if not br:
                return out
            for v in net.list_cell_veths(ipr):
                if v.master in (None, br[0]):
                    out.append(("veth", v.ifname, v.cell))
            for vid in bridge.list_vlan_gateways(ipr, self.bridge):
                out.append(("vlan", str(vid), vlan_owner.get(vid)))
        return out

    def _not_scanned(self, kind: str, why: str) -> list[Found]:
        if self._unscanned.get(kind) != why:
            log.warning("reclaim: %s not scanned for orphans: %s", kind, why)
            self._unscanned[kind] = why
        return []

    def _scanned(self, kind: str) -> None:
        if self._unscanned.pop(kind, None) is not None:
            log.info("reclaim: %s scanned for orphans again", kind)

    # ------------------------------------------------------------------ mounts
    def scan_mounts(self) -> list[Found]:
        """Mounts strictly below ``run_dir/cells`` (one read of ``mountinfo``)."""
        try:
            text = self.mountinfo.read_text()
        except OSError as exc:
            return self._not_scanned("mount", f"read {self.mountinfo}: {exc.strerror}")
        self._scanned("mount")
        out: list[Found] = []
        seen: set[str] = set()
        for point in parse_mountinfo(text):
            if point in seen or not self._is_cell_mount(point):
                continue
            seen.add(point)
            cell = Path(point).relative_to(self.cells_dir).parts[0]
            out.append(("mount", point, _owner(cell)))
        return out

    def _is_cell_mount(self, point: str) -> bool:
        if not _below(point, self.cells_dir):
            return False
        p = Path(point)
        # agentd's shared netns dir, or a netns pin (kind "netns")
        return not (p == self._pins or (p.parent == self._pins
                                        and p.name.startswith(names.NETNS_PREFIX)))

    def _collect_mount(self, point: str) -> None:
        if not self._is_cell_mount(point):
            raise RefusedError("E_ORPHAN", f"mount point {point} is not below "
                               f"{self.cells_dir}", "only agentd's own mounts are collected")
        for _ in range(_MAX_STACK):
            try:
                ksys.umount2(point, abi.MNT_DETACH | _UMOUNT_NOFOLLOW)
            except KernelError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOENT):  # nothing (more) mounted
                    break
                raise
        else:
            raise KernelError("umount2", point, errno.EBUSY,
                              f"more than {_MAX_STACK} mounts stacked there")
        try:
            st = os.lstat(point)
            if stat.S_ISDIR(st.st_mode):
                os.rmdir(point)
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                os.unlink(point)
        except OSError as exc:  # not empty, gone, or still busy: left as it is
            log.info("reclaim: mount point %s kept: %s", point, exc.strerror)

    # ------------------------------------------------------------------ nftables
    def _nft(self) -> Nft:
        if self.nft is None:
            self.nft = Nft()
        return self.nft

    def scan_nftables(self) -> list[Found]:
        """``inet`` tables of the agent's naming in ``nft_netns`` (one ``nft`` run)."""
        try:
            # agent.kernel.nft's runner (nsenter into nft_netns when given); nft.py has no
            # public "list tables" yet
            text = self._nft()._run(["-j", "list", "tables"], None, self.nft_netns,
                                    "list tables")
            data = json.loads(text) if text.strip() else {"nftables": []}
        except AgentError as exc:
            return self._not_scanned("nftables", exc.message)
        except ValueError as exc:
            return self._not_scanned("nftables", f"nft -j list tables: bad JSON ({exc})")
        self._scanned("nftables")
        out: list[Found] = []
        for item in data.get("nftables", []):
            t = item.get("table") if isinstance(item, dict) else None
            if not isinstance(t, dict) or t.get("family") != firewall.FAMILY:
                continue
            name = str(t.get("name", ""))
            if name == firewall.CELL_TABLE:
                out.append(("nftables", name, None))
            elif name.startswith(HOST_CELL_TABLE_PREFIX):
                out.append(("nftables", name, _owner(name[len(HOST_CELL_TABLE_PREFIX):])))
        return out

    def _collect_table(self, name: str) -> None:
        if name != firewall.CELL_TABLE and not name.startswith(HOST_CELL_TABLE_PREFIX):
            raise RefusedError("E_ORPHAN", f"table inet {name} is not a cell's table",
                               "only agent_cell and agent_cell_<cell> are collected")
        self._nft().delete_table(name, self.nft_netns)

    # ------------------------------------------------------------------ collect
    def collect(self, a: CollectOrphan) -> None:
        if a.object_kind == "cgroup":
            self.backend.kill(a.name)
            self.backend.remove(a.name)
        elif a.object_kind == "netns":
            netns.destroy_cell_netns(a.name, self.netns_dir)
        elif a.object_kind == "mount":
            self._collect_mount(a.name)
        elif a.object_kind == "nftables":
            self._collect_table(a.name)
        elif a.object_kind in ("veth", "vlan"):
            with self._ipr() as ipr:
                if a.object_kind == "vlan":
                    bridge.remove_vlan_gateway(ipr, self.bridge, int(a.name))
                else:
                    for idx in ipr.link_lookup(ifname=a.name):
                        ipr.link("del", index=idx)
