"""Cell networking through pyroute2: bridge, per-VLAN gateways, veths, netns.

See docs/network.md for the design.  In short: one VLAN-filtering bridge
(``agbr0``); each cell gets a veth whose host side ``vc-<hash>`` is an
untagged, PVID port of the cell's VLAN and whose peer is ``eth0`` in the cell's
netns ``/run/netns/cell-<name>``; the host has one VLAN interface per VLAN
(``agbr0.<vid>``) holding the gateway address, so traffic between VLANs is
routed (and filtered) by the host.

Only the classic synchronous ``IPRoute`` API is used, which pyroute2 0.7.x
provides natively and 0.9.x keeps as a wrapper over its asyncio core.  Inside a
cell's netns no pyroute2 ``NetNS`` (which forks a helper process per use) is
used: a short-lived thread enters the netns (``unshare``/``setns`` of
CLONE_NEWNET change only the calling thread), opens a netlink socket there (a
socket stays in the netns it was made in) and ends; an ``IPRoute`` then runs
over that socket from any thread (docs/performance.md).

Every function takes the netlink handle (for the "host" side) and the paths it
touches, so tests can run the whole thing inside a namespace of their
own.  Every failure is a :class:`~agent.core.errors.KernelError` naming the netlink
operation and the object.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from agent.core.errors import KernelError
from agent.core.names import PEER_PREFIX, VETH_PREFIX, cell_mac, veth_names
from agent.kernel.bridge import (
    BRIDGE_VLAN_INFO_PVID,
    BRIDGE_VLAN_INFO_UNTAGGED,
    DEFAULT_BRIDGE,
    enable_ip_forward,
    ensure_bridge,
    ensure_vlan_gateway,
    list_vlan_gateways,
    remove_vlan_gateway,
)
from agent.kernel.netlink import EXISTS, GONE, LOOPBACK_INDEX, nl, require
from agent.kernel.netns import (
    NETNS_DIR,
    create_cell_netns,
    destroy_cell_netns,
    netns_path,
    open_netns,
)

__all__ = ["ALIAS_PREFIX", "CELL_IFNAME", "CellLink", "CellVeth", "HostNet", "create_cell_link",
           "destroy_cell_link", "list_cell_veths"]

ALIAS_PREFIX = "agent-cell:"
CELL_IFNAME = "eth0"


@dataclass(frozen=True)
class CellLink:
    cell: str
    host_ifname: str
    host_index: int
    vlan: int | None
    address: IPv4Interface
    gateway: IPv4Address


def create_cell_link(
    ipr: Any,
    cell: str,
    netns_file: Path,
    bridge: str,
    vlan: int | None,
    address: IPv4Interface | str,
    gateway: IPv4Address | str,
) -> CellLink:
    """Wire a cell: veth ``vc-<hash>`` on the host, its peer moved into the
    cell's netns and renamed ``eth0``; host side enslaved to ``bridge`` and,
    when ``vlan`` is given, made an untagged PVID port of that VLAN only
    (VLAN 1 removed).  Inside: lo and eth0 up, the address, a default route
    via ``gateway``.  All or nothing: on failure the veth is deleted again."""
    addr = IPv4Interface(address)
    gw = IPv4Address(gateway)
    host, peer = veth_names(cell)
    br = require(ipr, bridge, "bridge")
    with nl("link add", f"veth {host} peer {peer}"):
        ipr.link("add", ifname=host, kind="veth", peer=peer)
    try:
        host_idx = require(ipr, host, "veth")
        peer_idx = require(ipr, peer, "veth")
        # A path, not an fd: with pyroute2 0.7 a NetNS handle encodes the
        # request in a helper process, where an fd of ours means nothing.
        if not netns_file.exists():
            raise KernelError("netlink link set", f"veth {peer} netns {netns_file}",
                              errno.ENOENT, "create the cell's netns first")
        with nl("link set", f"veth {peer} netns {netns_file}"):
            ipr.link("set", index=peer_idx, net_ns_fd=str(netns_file))
        # alias, port of the bridge and up in one request; up before the VLAN entries
        # is safe: a new port of a bridge made by ensure_bridge has no VLAN (PVID 0)
        # and so carries nothing until the entries below exist
        with nl("link set", f"veth {host} alias, master {bridge}, up"):
            ipr.link("set", index=host_idx, ifalias=ALIAS_PREFIX + cell, master=br, state="up")
        if vlan is not None:
            flags = BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED
            with nl("vlan_filter add", f"port {host} vid {vlan} pvid untagged"):
                ipr.vlan_filter("add", index=host_idx, vlan_info={"vid": vlan, "flags": flags})
            with nl("vlan_filter del", f"port {host} vid 1", ignore=GONE):
                ipr.vlan_filter("del", index=host_idx, vlan_info={"vid": 1})
        _configure_inside(netns_file, peer, addr, gw, cell_mac(cell))
    except BaseException:
        try:
            destroy_cell_link(ipr, cell)
        except KernelError:
            pass  # the failure to report is the one that made us undo
        raise
    return CellLink(cell, host, host_idx, vlan, addr, gw)


def _configure_inside(netns_file: Path, peer: str, addr: IPv4Interface,
                      gw: IPv4Address, mac: str) -> None:
    where = f"netns {netns_file}"
    ns = open_netns(netns_file)
    try:
        idx = require(ns, peer, f"veth in {where}:")
        # one request: the kernel renames and sets the address before it changes the
        # flags, so the link-local address (made at up) comes from this MAC, which the
        # bridge's layer-2 rules pin (agent.core.l2fw)
        with nl("link set", f"{peer} name {CELL_IFNAME} address {mac} up in {where}"):
            ns.link("set", index=idx, ifname=CELL_IFNAME, address=mac, state="up")
        with nl("link set", f"lo up in {where}"):
            ns.link("set", index=LOOPBACK_INDEX, state="up")
        with nl("addr add", f"{addr} on {CELL_IFNAME} in {where}", ignore=EXISTS):
            ns.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        with nl("route add", f"default via {gw} in {where}", ignore=EXISTS):
            ns.route("add", dst="0.0.0.0", dst_len=0, gateway=str(gw), oif=idx)
    finally:
        ns.close()


def destroy_cell_link(ipr: Any, cell: str) -> None:
    """Delete the cell's veth (the peer and the port's VLAN entries go with
    it).  Missing is fine.  By name: one request when the veth is there (its
    peer goes with it), two when only a stray temporary peer is left."""
    host, peer = veth_names(cell)
    for name in (host, peer):
        try:
            ipr.link("del", ifname=name)
            return
        except NetlinkError as exc:
            if exc.code not in GONE:
                raise KernelError("netlink link del", f"veth {name}", exc.code) from exc
        except OSError as exc:
            raise KernelError.from_oserror("link del", f"veth {name}", exc) from exc


@dataclass(frozen=True)
class CellVeth:
    ifname: str
    index: int
    cell: str | None  # from the alias; None if the alias is gone
    master: int | None


def list_cell_veths(ipr: Any) -> list[CellVeth]:
    """Host-side cell veths (and stray temporary peers), for orphan collection."""
    out = []
    with nl("link dump", "all links"):
        for msg in ipr.link("dump"):
            name = str(msg.get_attr("IFLA_IFNAME"))
            if not name.startswith((VETH_PREFIX, PEER_PREFIX)):
                continue
            alias = msg.get_attr("IFLA_IFALIAS")
            cell = alias[len(ALIAS_PREFIX):] if alias and alias.startswith(ALIAS_PREFIX) else None
            master = msg.get_attr("IFLA_MASTER")
            out.append(CellVeth(name, int(msg["index"]), cell,
                                int(master) if master is not None else None))
    return sorted(out, key=lambda v: v.ifname)


class HostNet:
    """The host's network as the cell plans see it (:class:`agent.core.cellops.CellNet`):
    the functions above bound to one bridge and netns dir.

    Called from the executor's worker threads: one call at a time, each with a netlink
    handle of its own (a pyroute2 handle shared across threads was seen to pair a
    request with an earlier request's error reply)."""

    def __init__(self, bridge: str = DEFAULT_BRIDGE, netns_dir: Path = NETNS_DIR) -> None:
        self.bridge = bridge
        self.netns_dir = netns_dir
        self._lock = threading.Lock()

    @contextmanager
    def _ipr(self) -> Iterator[Any]:
        from pyroute2 import IPRoute
        from pyroute2 import config as pyroute2_config

        # pyroute2 forks a helper per NetNS and stops it with SIGTERM.  The fork inherits
        # Python's SIGTERM handler and asyncio's wake-up fd, so the helper's SIGTERM would
        # reach agentd's loop as if agentd had been told to stop.
        pyroute2_config.disable_mp_signal = True
        with self._lock:
            ipr = IPRoute()
            try:
                yield ipr
            finally:
                ipr.close()

    def setup(self) -> None:
        with self._ipr() as ipr:
            ensure_bridge(ipr, self.bridge)
        enable_ip_forward()

    def create_netns(self, cell: str) -> Path:
        with self._lock:
            return create_cell_netns(cell, self.netns_dir)

    def destroy_netns(self, cell: str) -> None:
        with self._lock:
            destroy_cell_netns(cell, self.netns_dir)

    def netns_path(self, cell: str) -> Path:
        return netns_path(cell, self.netns_dir)

    def ensure_gateway(self, vlan: int, gateway: str) -> bool:
        """True if this call created the gateway (undo removes only what it made)."""
        with self._ipr() as ipr:
            existed = vlan in list_vlan_gateways(ipr, self.bridge)
            ensure_vlan_gateway(ipr, self.bridge, vlan, gateway)
            return not existed

    def remove_gateway(self, vlan: int) -> None:
        with self._ipr() as ipr:
            remove_vlan_gateway(ipr, self.bridge, vlan)

    def gateway_vlans(self) -> set[int]:
        """The VLANs that have a gateway on the bridge now."""
        with self._ipr() as ipr:
            return set(list_vlan_gateways(ipr, self.bridge))

    def create_link(self, cell: str, vlan: int, address: str, gateway: str) -> None:
        with self._ipr() as ipr:
            create_cell_link(ipr, cell, self.netns_path(cell), self.bridge, vlan,
                             address, gateway)

    def destroy_link(self, cell: str) -> None:
        with self._ipr() as ipr:
            destroy_cell_link(ipr, cell)
