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
own.  Every failure is a :class:`~agent.errors.KernelError` naming the netlink
operation and the object.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.core import syscalls as abi
from agent.core.errors import ConfigError, KernelError
from agent.core.names import NETNS_PREFIX, PEER_PREFIX, VETH_PREFIX, check_cell_name, veth_names
from agent.kernel import libc as ksys

__all__ = [
    "ALIAS_PREFIX",
    "DEFAULT_BRIDGE",
    "NETNS_DIR",
    "BridgeVlan",
    "CellLink",
    "CellVeth",
    "HostNet",
    "create_cell_link",
    "create_cell_netns",
    "delete_bridge",
    "destroy_cell_link",
    "destroy_cell_netns",
    "enable_ip_forward",
    "ensure_bridge",
    "ensure_vlan_gateway",
    "gateway_ifname",
    "list_bridge_vlans",
    "list_cell_netns",
    "list_cell_veths",
    "list_vlan_gateways",
    "netns_path",
    "open_netns",
    "remove_vlan_gateway",
]

DEFAULT_BRIDGE = "agbr0"
ALIAS_PREFIX = "agent-cell:"
NETNS_DIR = Path("/run/netns")
CELL_IFNAME = "eth0"
LOOPBACK_INDEX = 1  # lo is ifindex 1 in every network namespace
_NETLINK_ROUTE = 0
_T = TypeVar("_T")

# bridge VLAN info flags (include/uapi/linux/if_bridge.h)
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4
AF_BRIDGE = 7

# Objects that are already in the wanted state: adding twice, deleting twice.
_EXISTS = {errno.EEXIST}
_GONE = {errno.ENODEV, errno.ENOENT, errno.EINVAL, errno.ESRCH}


@contextmanager
def _nl(op: str, obj: str, ignore: set[int] | frozenset[int] = frozenset(),
        hint: str | None = None) -> Iterator[None]:
    """Turn pyroute2 / OS failures into KernelError("netlink <op>", obj)."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code in ignore:
            return
        raise KernelError(f"netlink {op}", obj, exc.code, hint) from exc
    except OSError as exc:
        if exc.errno in ignore:
            return
        raise KernelError.from_oserror(op, obj, exc, hint) from exc


def _attr(msg: Any, *path: str) -> Any:
    """Follow nested netlink attributes; None where one is missing."""
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def _index(ipr: Any, ifname: str) -> int | None:
    with _nl("link lookup", ifname):
        found = list(ipr.link_lookup(ifname=ifname))
    return int(found[0]) if found else None


def _require(ipr: Any, ifname: str, what: str) -> int:
    idx = _index(ipr, ifname)
    if idx is None:
        raise KernelError("netlink link get", f"{what} {ifname}", errno.ENODEV)
    return idx


def _check_bridge_name(name: str) -> None:
    # room for ".4094" in the gateway interface name (IFNAMSIZ - 1 = 15)
    if not name or len(name) > 10 or "/" in name or "." in name or " " in name:
        raise ConfigError("E_CONFIG", f"bridge name {name!r} is not valid",
                          "use at most 10 characters, no '.', '/' or spaces")


def netns_path(cell: str, run_dir: Path = NETNS_DIR) -> Path:
    return run_dir / (NETNS_PREFIX + check_cell_name(cell))


def gateway_ifname(bridge: str, vlan: int) -> str:
    return f"{bridge}.{vlan}"


def enable_ip_forward(proc_root: Path = Path("/proc")) -> None:
    """Routing between cells goes through the host: turn IPv4 forwarding on
    (in the network namespace of the process that owns ``proc_root``)."""
    path = proc_root / "sys/net/ipv4/ip_forward"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            os.write(fd, b"1")
        finally:
            os.close(fd)
    except OSError as exc:
        raise KernelError.from_oserror("write", str(path), exc) from exc


# -- bridge and gateways -------------------------------------------------------


def ensure_bridge(ipr: Any, name: str = DEFAULT_BRIDGE) -> int:
    """Create (or adopt) the cells' bridge: VLAN filtering on, no default PVID
    (so no port lands on VLAN 1 by accident), up.  Returns its index."""
    _check_bridge_name(name)
    idx = _index(ipr, name)
    if idx is None:
        with _nl("link add", f"bridge {name}", ignore=_EXISTS):
            ipr.link("add", ifname=name, kind="bridge", br_vlan_default_pvid=0)
        idx = _require(ipr, name, "bridge")
    else:
        with _nl("link get", f"bridge {name}"):
            msg = ipr.link("get", index=idx)[0]
        kind = _attr(msg, "IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind != "bridge":
            raise KernelError("netlink link get", f"bridge {name}", errno.EEXIST,
                              f"{name} exists and is a {kind}, not a bridge")
    # A fixed, locally administered MAC.  Left to the kernel, the bridge takes its
    # lowest port's address and falls back to 00:00:00:00:00:00 when the last port
    # leaves; from then on every `bridge vlan add ... self` fails with EINVAL (the
    # local fdb entry for the VLAN cannot be made from a zero address: "failed insert
    # local address into bridge forwarding table").  An address set explicitly stays.
    mac = bridge_mac(name)
    with _nl("link set", f"bridge {name} address {mac}"):
        ipr.link("set", index=idx, address=mac)
    # The default PVID is set while filtering is off (the kernel refuses to
    # change it with filtering on); both are no-ops when already right.
    with _nl("link set", f"bridge {name} vlan_default_pvid=0"):
        ipr.link("set", index=idx, kind="bridge", br_vlan_default_pvid=0)
    with _nl("link set", f"bridge {name} vlan_filtering=1",
             hint="the kernel needs CONFIG_BRIDGE_VLAN_FILTERING"):
        ipr.link("set", index=idx, kind="bridge", br_vlan_filtering=1)
    with _nl("link set", f"bridge {name} up"):
        ipr.link("set", index=idx, state="up")
    return idx


def bridge_mac(name: str) -> str:
    """A stable, locally administered unicast MAC for bridge ``name``."""
    digest = hashlib.sha256(f"agent-bridge:{name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def delete_bridge(ipr: Any, name: str = DEFAULT_BRIDGE) -> None:
    idx = _index(ipr, name)
    if idx is not None:
        with _nl("link del", f"bridge {name}", ignore=_GONE):
            ipr.link("del", index=idx)


def ensure_vlan_gateway(ipr: Any, bridge: str, vlan: int, gateway: IPv4Interface | str) -> int:
    """The host's leg on ``vlan``: the bridge device itself becomes a *tagged*
    member of the VLAN (``bridge vlan add dev agbr0 vid N self``) and a VLAN
    interface ``agbr0.N`` on top of it carries the gateway address.  Returns
    the VLAN interface's index.  Idempotent."""
    gw = IPv4Interface(gateway)
    br = _require(ipr, bridge, "bridge")
    with _nl("vlan_filter add", f"bridge {bridge} vid {vlan} self"):
        ipr.vlan_filter("add", index=br, vlan_info={"vid": vlan}, vlan_flags="self")
    name = gateway_ifname(bridge, vlan)
    idx = _index(ipr, name)
    if idx is None:
        with _nl("link add", f"vlan {name}", ignore=_EXISTS):
            ipr.link("add", ifname=name, kind="vlan", link=br, vlan_id=vlan)
        idx = _require(ipr, name, "vlan")
    with _nl("addr add", f"{gw} on {name}", ignore=_EXISTS):
        ipr.addr("add", index=idx, address=str(gw.ip), prefixlen=gw.network.prefixlen)
    with _nl("link set", f"vlan {name} up"):
        ipr.link("set", index=idx, state="up")
    return idx


def remove_vlan_gateway(ipr: Any, bridge: str, vlan: int) -> None:
    """Undo :func:`ensure_vlan_gateway`.  Missing pieces are fine."""
    name = gateway_ifname(bridge, vlan)
    idx = _index(ipr, name)
    if idx is not None:
        with _nl("link del", f"vlan {name}", ignore=_GONE):
            ipr.link("del", index=idx)
    br = _index(ipr, bridge)
    if br is not None:
        with _nl("vlan_filter del", f"bridge {bridge} vid {vlan} self", ignore=_GONE):
            ipr.vlan_filter("del", index=br, vlan_info={"vid": vlan}, vlan_flags="self")


def list_vlan_gateways(ipr: Any, bridge: str) -> dict[int, str]:
    """``{vid: ifname}`` of the VLAN interfaces stacked on ``bridge``."""
    br = _index(ipr, bridge)
    out: dict[int, str] = {}
    if br is None:
        return out
    with _nl("link dump", "all links"):
        for msg in ipr.link("dump"):
            if (
                _attr(msg, "IFLA_LINKINFO", "IFLA_INFO_KIND") == "vlan"
                and msg.get_attr("IFLA_LINK") == br
            ):
                vid = _attr(msg, "IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VLAN_ID")
                out[int(vid)] = str(msg.get_attr("IFLA_IFNAME"))
    return out


# -- cells ---------------------------------------------------------------------


def _in_thread(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a thread of its own and return its result (or raise its error).

    The thread may change its network namespace: it ends with ``fn``, so no other
    code ever runs in the namespace it was left in."""
    out: list[_T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=run, name="agent-netns", daemon=True)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def _rtnl_fd() -> int:
    """A new rtnetlink socket in the calling thread's netns, as a bare fd."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_ROUTE).detach()


def _share_dir(run_dir: Path) -> None:
    """``run_dir`` becomes a shared mount point, so pins made in it show in every mount
    namespace that has it (what ``ip netns add`` and pyroute2 do)."""
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        ksys.mount(None, str(run_dir), None, abi.MS_SHARED | abi.MS_REC)
    except KernelError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: not a mount point yet
            raise
        ksys.mount(str(run_dir), str(run_dir), None, abi.MS_BIND | abi.MS_REC)
        ksys.mount(None, str(run_dir), None, abi.MS_SHARED | abi.MS_REC)


def _ipr_on(fd: int) -> Any:
    try:
        return IPRoute(fileno=fd)
    except BaseException:
        os.close(fd)
        raise


def open_netns(netns_file: Path) -> Any:
    """An ``IPRoute`` whose socket lives in the netns pinned at ``netns_file`` (no helper
    process, unlike pyroute2's ``NetNS``).  The caller closes it."""

    def enter() -> int:
        nsfd = os.open(netns_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            ksys.setns(nsfd, abi.CLONE_NEWNET, str(netns_file))
        finally:
            os.close(nsfd)
        return _rtnl_fd()

    try:
        fd = _in_thread(enter)
    except KernelError as exc:
        raise KernelError(f"netns open ({exc.op})", str(netns_file), exc.errno) from exc
    except OSError as exc:
        raise KernelError.from_oserror("netns open", str(netns_file), exc) from exc
    return _ipr_on(fd)


def create_cell_netns(cell: str, run_dir: Path = NETNS_DIR) -> Path:
    """Create the cell's network namespace, pinned at ``run_dir/cell-<name>``
    (what ``ip netns add`` does), with lo up.  The agent, not the cell, owns it.

    A thread unshares its netns, bind-mounts it on the pin and opens the netlink
    socket that then sets lo up: no process is forked."""
    path = netns_path(cell, run_dir)

    def make() -> int:
        _share_dir(run_dir)
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
        try:
            ksys.unshare(abi.CLONE_NEWNET)
            ksys.mount("/proc/thread-self/ns/net", str(path), None, abi.MS_BIND)
        except BaseException:
            os.unlink(path)
            raise
        return _rtnl_fd()

    try:
        fd = _in_thread(make)
    except KernelError as exc:
        raise KernelError(f"netns create ({exc.op})", str(path), exc.errno) from exc
    except OSError as exc:
        raise KernelError.from_oserror("netns create", str(path), exc) from exc
    try:
        _lo_up(fd, path)
    except BaseException:
        destroy_cell_netns(cell, run_dir)
        raise
    return path


def _lo_up(fd: int, netns_file: Path) -> None:
    """Loopback up: a cell without a [network] link still has a working 127.0.0.1."""
    where = f"netns {netns_file}"
    with _nl("netns open", where):
        ns = _ipr_on(fd)
    try:
        with _nl("link set", f"lo up in {where}"):
            ns.link("set", index=LOOPBACK_INDEX, state="up")
    finally:
        ns.close()


def destroy_cell_netns(cell: str, run_dir: Path = NETNS_DIR) -> None:
    """Unmount and remove the pin; the namespace dies with its last user.
    Missing is fine."""
    path = netns_path(cell, run_dir)
    if not path.exists():
        return
    with _nl("netns remove", str(path), ignore={errno.ENOENT}):
        netns.remove(str(path))


def list_cell_netns(run_dir: Path = NETNS_DIR) -> list[str]:
    """Cell names with a pinned netns under ``run_dir``."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    return sorted(n[len(NETNS_PREFIX):] for n in names if n.startswith(NETNS_PREFIX))


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
    br = _require(ipr, bridge, "bridge")
    with _nl("link add", f"veth {host} peer {peer}"):
        ipr.link("add", ifname=host, kind="veth", peer=peer)
    try:
        host_idx = _require(ipr, host, "veth")
        peer_idx = _require(ipr, peer, "veth")
        # A path, not an fd: with pyroute2 0.7 a NetNS handle encodes the
        # request in a helper process, where an fd of ours means nothing.
        if not netns_file.exists():
            raise KernelError("netlink link set", f"veth {peer} netns {netns_file}",
                              errno.ENOENT, "create the cell's netns first")
        with _nl("link set", f"veth {peer} netns {netns_file}"):
            ipr.link("set", index=peer_idx, net_ns_fd=str(netns_file))
        # alias, port of the bridge and up in one request; up before the VLAN entries
        # is safe: a new port of a bridge made by ensure_bridge has no VLAN (PVID 0)
        # and so carries nothing until the entries below exist
        with _nl("link set", f"veth {host} alias, master {bridge}, up"):
            ipr.link("set", index=host_idx, ifalias=ALIAS_PREFIX + cell, master=br, state="up")
        if vlan is not None:
            flags = BRIDGE_VLAN_INFO_PVID | BRIDGE_VLAN_INFO_UNTAGGED
            with _nl("vlan_filter add", f"port {host} vid {vlan} pvid untagged"):
                ipr.vlan_filter("add", index=host_idx, vlan_info={"vid": vlan, "flags": flags})
            with _nl("vlan_filter del", f"port {host} vid 1", ignore=_GONE):
                ipr.vlan_filter("del", index=host_idx, vlan_info={"vid": 1})
        _configure_inside(netns_file, peer, addr, gw)
    except BaseException:
        try:
            destroy_cell_link(ipr, cell)
        except KernelError:
            pass  # the failure to report is the one that made us undo
        raise
    return CellLink(cell, host, host_idx, vlan, addr, gw)


def _configure_inside(netns_file: Path, peer: str, addr: IPv4Interface,
                      gw: IPv4Address) -> None:
    where = f"netns {netns_file}"
    ns = open_netns(netns_file)
    try:
        idx = _require(ns, peer, f"veth in {where}:")
        # one request: the kernel renames before it changes the flags
        with _nl("link set", f"{peer} name {CELL_IFNAME} up in {where}"):
            ns.link("set", index=idx, ifname=CELL_IFNAME, state="up")
        with _nl("link set", f"lo up in {where}"):
            ns.link("set", index=LOOPBACK_INDEX, state="up")
        with _nl("addr add", f"{addr} on {CELL_IFNAME} in {where}", ignore=_EXISTS):
            ns.addr("add", index=idx, address=str(addr.ip), prefixlen=addr.network.prefixlen)
        with _nl("route add", f"default via {gw} in {where}", ignore=_EXISTS):
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
            if exc.code not in _GONE:
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
    with _nl("link dump", "all links"):
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


@dataclass(frozen=True)
class BridgeVlan:
    vid: int
    pvid: bool
    untagged: bool


def list_bridge_vlans(ipr: Any) -> dict[str, list[BridgeVlan]]:
    """``bridge vlan show`` as ``{ifname: [entries]}`` (the bridge itself
    included, for its ``self`` entries).  Ports without VLANs are omitted."""
    out: dict[str, list[BridgeVlan]] = {}
    with _nl("link dump", "bridge vlans (AF_BRIDGE, RTEXT_FILTER_BRVLAN)"):
        for msg in ipr.get_vlans():
            spec = msg.get_attr("IFLA_AF_SPEC")
            if spec is None:
                continue
            entries = []
            for info in spec.get_attrs("IFLA_BRIDGE_VLAN_INFO"):
                flags = int(info["flags"])
                entries.append(BridgeVlan(int(info["vid"]),
                                          bool(flags & BRIDGE_VLAN_INFO_PVID),
                                          bool(flags & BRIDGE_VLAN_INFO_UNTAGGED)))
            if entries:
                name = str(msg.get_attr("IFLA_IFNAME"))
                out.setdefault(name, []).extend(entries)
    return out


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
