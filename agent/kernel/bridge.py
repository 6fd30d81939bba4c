"""The cells' bridge and the host's per-VLAN gateways, through pyroute2.

One VLAN-filtering bridge (``agbr0``) whose ports are the cells' veths; the host has one
VLAN interface per VLAN (``agbr0.<vid>``) holding the gateway address, so traffic between
VLANs is routed (and filtered) by the host (docs/network.md).  Every function takes the
netlink handle and is idempotent.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from agent.core.errors import ConfigError, KernelError
from agent.kernel.netlink import EXISTS, GONE, attr, index, nl, require

__all__ = ["BRIDGE_VLAN_INFO_PVID", "BRIDGE_VLAN_INFO_UNTAGGED", "DEFAULT_BRIDGE", "BridgeVlan",
           "add_vlan_gateway", "bridge_mac", "delete_bridge", "enable_ip_forward", "ensure_bridge",
           "ensure_vlan_gateway", "gateway_ifname", "list_bridge_vlans", "list_vlan_gateways",
           "remove_vlan_gateway"]

DEFAULT_BRIDGE = "agbr0"

# bridge VLAN info flags (include/uapi/linux/if_bridge.h)
BRIDGE_VLAN_INFO_PVID = 0x2
BRIDGE_VLAN_INFO_UNTAGGED = 0x4


def _check_bridge_name(name: str) -> None:
    # room for ".4094" in the gateway interface name (IFNAMSIZ - 1 = 15)
    if not name or len(name) > 10 or "/" in name or "." in name or " " in name:
        raise ConfigError("E_CONFIG", f"bridge name {name!r} is not valid",
                          "use at most 10 characters, no '.', '/' or spaces")


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


def ensure_bridge(ipr: Any, name: str = DEFAULT_BRIDGE) -> int:
    """Create (or adopt) the cells' bridge: VLAN filtering on, no default PVID
    (so no port lands on VLAN 1 by accident), up.  Returns its index."""
    _check_bridge_name(name)
    idx = index(ipr, name)
    if idx is None:
        with nl("link add", f"bridge {name}", ignore=EXISTS):
            ipr.link("add", ifname=name, kind="bridge", br_vlan_default_pvid=0)
        idx = require(ipr, name, "bridge")
    else:
        with nl("link get", f"bridge {name}"):
            msg = ipr.link("get", index=idx)[0]
        kind = attr(msg, "IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind != "bridge":
            raise KernelError("netlink link get", f"bridge {name}", errno.EEXIST,
                              f"{name} exists and is a {kind}, not a bridge")
    # A fixed, locally administered MAC.  Left to the kernel, the bridge takes its
    # lowest port's address and falls back to 00:00:00:00:00:00 when the last port
    # leaves; from then on every `bridge vlan add ... self` fails with EINVAL (the
    # local fdb entry for the VLAN cannot be made from a zero address: "failed insert
    # local address into bridge forwarding table").  An address set explicitly stays.
    mac = bridge_mac(name)
    with nl("link set", f"bridge {name} address {mac}"):
        ipr.link("set", index=idx, address=mac)
    # The default PVID is set while filtering is off (the kernel refuses to
    # change it with filtering on); both are no-ops when already right.
    with nl("link set", f"bridge {name} vlan_default_pvid=0"):
        ipr.link("set", index=idx, kind="bridge", br_vlan_default_pvid=0)
    with nl("link set", f"bridge {name} vlan_filtering=1",
             hint="the kernel needs CONFIG_BRIDGE_VLAN_FILTERING"):
        ipr.link("set", index=idx, kind="bridge", br_vlan_filtering=1)
    with nl("link set", f"bridge {name} up"):
        ipr.link("set", index=idx, state="up")
    return idx


def bridge_mac(name: str) -> str:
    """A stable, locally administered unicast MAC for bridge ``name``."""
    digest = hashlib.sha256(f"agent-bridge:{name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def delete_bridge(ipr: Any, name: str = DEFAULT_BRIDGE) -> None:
    idx = index(ipr, name)
    if idx is not None:
        with nl("link del", f"bridge {name}", ignore=GONE):
            ipr.link("del", index=idx)


def ensure_vlan_gateway(ipr: Any, bridge: str, vlan: int, gateway: IPv4Interface | str) -> int:
    """The host's leg on ``vlan``: the bridge device itself becomes a *tagged*
    member of the VLAN (``bridge vlan add dev agbr0 vid N self``) and a VLAN
    interface ``agbr0.N`` on top of it carries the gateway address.  Returns
    the VLAN interface's index.  Idempotent."""
    return add_vlan_gateway(ipr, bridge, vlan, gateway)[0]


def add_vlan_gateway(ipr: Any, bridge: str, vlan: int,
                     gateway: IPv4Interface | str) -> tuple[int, bool]:
    """:func:`ensure_vlan_gateway`, also telling whether this call made the VLAN
    interface (False: it was there).  Every lookup is by name, never a dump of the
    host's links: the cost does not grow with the number of cells."""
    gw = IPv4Interface(gateway)
    br = require(ipr, bridge, "bridge")
    with nl("vlan_filter add", f"bridge {bridge} vid {vlan} self"):
        ipr.vlan_filter("add", index=br, vlan_info={"vid": vlan}, vlan_flags="self")
    name = gateway_ifname(bridge, vlan)
    idx = index(ipr, name)
    created = False
    if idx is None:
        with nl("link add", f"vlan {name}", ignore=EXISTS):
            ipr.link("add", ifname=name, kind="vlan", link=br, vlan_id=vlan)
            created = True  # not reached when it exists (made meanwhile): not ours
        idx = require(ipr, name, "vlan")
    with nl("addr add", f"{gw} on {name}", ignore=EXISTS):
        ipr.addr("add", index=idx, address=str(gw.ip), prefixlen=gw.network.prefixlen)
    with nl("link set", f"vlan {name} up"):
        ipr.link("set", index=idx, state="up")
    return idx, created


def remove_vlan_gateway(ipr: Any, bridge: str, vlan: int) -> None:
    """Undo :func:`ensure_vlan_gateway`.  Missing pieces are fine."""
    name = gateway_ifname(bridge, vlan)
    idx = index(ipr, name)
    if idx is not None:
        with nl("link del", f"vlan {name}", ignore=GONE):
            ipr.link("del", index=idx)
    br = index(ipr, bridge)
    if br is not None:
        with nl("vlan_filter del", f"bridge {bridge} vid {vlan} self", ignore=GONE):
            ipr.vlan_filter("del", index=br, vlan_info={"vid": vlan}, vlan_flags="self")


def list_vlan_gateways(ipr: Any, bridge: str) -> dict[int, str]:
    """``{vid: ifname}`` of the VLAN interfaces stacked on ``bridge``."""
    br = index(ipr, bridge)
    out: dict[int, str] = {}
    if br is None:
        return out
    with nl("link dump", "all links"):
        for msg in ipr.link("dump"):
            if (
                attr(msg, "IFLA_LINKINFO", "IFLA_INFO_KIND") == "vlan"
                and msg.get_attr("IFLA_LINK") == br
            ):
                vid = attr(msg, "IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_VLAN_ID")
                out[int(vid)] = str(msg.get_attr("IFLA_IFNAME"))
    return out


@dataclass(frozen=True)
class BridgeVlan:
    vid: int
    pvid: bool
    untagged: bool


def list_bridge_vlans(ipr: Any) -> dict[str, list[BridgeVlan]]:
    """``bridge vlan show`` as ``{ifname: [entries]}`` (the bridge itself
    included, for its ``self`` entries).  Ports without VLANs are omitted."""
    out: dict[str, list[BridgeVlan]] = {}
    with nl("link dump", "bridge vlans (AF_BRIDGE, RTEXT_FILTER_BRVLAN)"):
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
