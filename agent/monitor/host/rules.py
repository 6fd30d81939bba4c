"""The host's parameters and hardware (pure): what each source's messages say, what counts
as a change, who it is attributed to and how severe it is.

* :func:`parse_uevent`: a kernel uevent datagram (``ACTION@DEVPATH`` then ``KEY=VALUE``
  strings); :func:`uevent_change`: its event (a module loaded or removed is a ``notice``:
  kernel code changed; a device is ``info``).
* :func:`parse_mountinfo` / :func:`mount_changes`: the mount table and its differences
  (``mount``, ``umount``, ``remount``, ``move``), keyed by mount id.
* :class:`NetState`: links, addresses and routes of the host's netns as rtnetlink says
  them (already decoded to plain values by the adapter); only additions, removals and a
  link's name, state and master are changes (a renewed address lifetime is not).
* :data:`WATCHED`: the sysctls the agent relies on and why; :func:`sysctl_changes`.
* :class:`Attributor`: a change explained by a cell's allowed trap (``syscall/trap``,
  verdict ``allowed``, of the operation that makes such a change: :data:`OP_CHANGES`)
  within :data:`WINDOW_S` before it is that cell's; each trap explains one change.
* What is the agent's own (its bridge, VLAN gateways, veth ends; mounts under its run and
  state directories and its netns pins): ``info``, whoever did it.  Everything else that
  changes a host parameter is a ``notice`` at least.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from agent.core.events import Severity
from agent.core.names import PEER_PREFIX, VETH_PREFIX

__all__ = [
    "MAX_ENV",
    "OP_CHANGES",
    "WATCHED",
    "WINDOW_S",
    "Attributor",
    "Change",
    "Mount",
    "NetState",
    "Uevent",
    "Watch",
    "attributed",
    "change_key",
    "mount_change",
    "mount_changes",
    "own_link",
    "own_mount",
    "parse_mountinfo",
    "parse_uevent",
    "sysctl_change",
    "sysctl_changes",
    "sysctl_path",
    "uevent_change",
    "uevent_hints_sysctls",
]

WINDOW_S: Final = 5.0  # a host change this soon after an allowed trap is that trap's
MAX_ENV: Final = 32  # uevent variables kept (a uevent has a dozen)
MAX_TRAPS: Final = 64  # allowed traps remembered
MAX_NET: Final = 4096  # addresses, routes and links remembered (each)


@dataclass(frozen=True)
class Change:
    """One event of channel ``host``: ``cell`` is filled in by attribution."""

    kind: str
    attrs: dict[str, Any]
    severity: Severity = "info"
    own: bool = False  # the agent's own object (no attribution, never above info)


# --- uevents ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Uevent:
    action: str
    devpath: str
    subsystem: str
    env: Mapping[str, str] = field(default_factory=dict)


def parse_uevent(data: bytes) -> Uevent | None:
    """A kernel uevent (group 1 of ``NETLINK_KOBJECT_UEVENT``), or None for anything else
    (udev's own re-broadcasts start with ``libudev``)."""
    if data.startswith(b"libudev"):
        return None
    parts = data.split(b"\0")
    head = parts[0].decode("utf-8", "replace")
    if "@" not in head:
        return None
    env: dict[str, str] = {}
    for raw in parts[1:]:
        key, eq, value = raw.partition(b"=")
        if eq and len(env) < MAX_ENV:
            env[key.decode("ascii", "replace")] = value.decode("utf-8", "replace")
    action, _, devpath = head.partition("@")
    action = env.get("ACTION", action)
    devpath = env.get("DEVPATH", devpath)
    if not action or not devpath:
        return None
    return Uevent(action, devpath, env.get("SUBSYSTEM", ""), env)


def uevent_change(u: Uevent) -> Change:
    attrs: dict[str, Any] = {"action": u.action, "subsystem": u.subsystem,
                             "devpath": u.devpath}
    for key, name in (("DEVNAME", "devname"), ("DRIVER", "driver"), ("INTERFACE", "ifname")):
        if key in u.env:
            attrs[name] = u.env[key]
    if u.subsystem == "module":
        attrs["module"] = u.devpath.rsplit("/", 1)[-1]
        return Change("uevent", attrs, "notice" if u.action in ("add", "remove") else "info")
    return Change("uevent", attrs)


def uevent_hints_sysctls(u: Uevent) -> bool:
    """A module came or went: it may have added sysctls (``br_netfilter``) or changed them."""
    return u.subsystem == "module" and u.action in ("add", "remove")


# --- the mount table --------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    id: int
    parent: int
    target: str
    fstype: str
    source: str
    options: str  # the mount's own options (ro, nosuid, ...), then the superblock's


def _unescape(path: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    if "\\" not in path:
        return path
    out, i = [], 0
    while i < len(path):
        c = path[i]
        digits = path[i + 1:i + 4]
        if c == "\\" and len(digits) == 3 and all(d in "01234567" for d in digits):
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> dict[int, Mount]:
    """``/proc/PID/mountinfo`` by mount id; malformed lines are skipped."""
    out: dict[int, Mount] = {}
    for line in text.splitlines():
        f = line.split(" ")
        try:
            sep = f.index("-", 6)
            mid, parent = int(f[0]), int(f[1])
        except (ValueError, IndexError):
            continue
        if len(f) < sep + 3:
            continue
        opts = f[5] + ("," + f[sep + 3] if len(f) > sep + 3 else "")
        out[mid] = Mount(mid, parent, _unescape(f[4]), f[sep + 1], _unescape(f[sep + 2]),
                         opts)
    return out


MountAction = Literal["mount", "umount", "remount", "move"]


def mount_changes(old: Mapping[int, Mount], new: Mapping[int, Mount]
                  ) -> list[tuple[MountAction, Mount]]:  # fmt: skip
    """What changed from ``old`` to ``new``: mounts gone, mounts new (in id order), and a
    mount whose options (``remount``) or place (``move``) changed."""
    out: list[tuple[MountAction, Mount]] = []
    for mid in sorted(old.keys() - new.keys()):
        out.append(("umount", old[mid]))
    for mid in sorted(new):
        m, before = new[mid], old.get(mid)
        if before is None:
            out.append(("mount", m))
        elif before.target != m.target:
            out.append(("move", m))
        elif before.options != m.options:
            out.append(("remount", m))
    return out


def own_mount(target: str, own: Iterable[str]) -> bool:
    """A mount point of the agent's.  Each entry of ``own`` is a path (that mount point
    only), a path ending in ``/`` (every mount below it: the run and state dirs) or a
    prefix ending in ``*`` (the netns pins ``/run/netns/cell-*``: ``ip netns add`` pins
    others' in the same directory)."""
    for d in own:
        if d.endswith(("*", "/")):
            if target.startswith(d.rstrip("*")):
                return True
        elif target == d:
            return True
    return False


def mount_change(action: MountAction, m: Mount, own_mounts: Iterable[str]) -> Change:
    own = own_mount(m.target, own_mounts)
    attrs = {"action": action, "target": m.target, "fstype": m.fstype, "source": m.source,
             "options": m.options}
    return Change("mount", attrs, "info" if own else "notice", own)


# --- links, addresses and routes --------------------------------------------------------


def own_link(name: str | None, bridge: str) -> bool:
    """The agent's bridge, its VLAN gateways (``<bridge>.<vid>``) and the cells' veth ends."""
    if not name:
        return False
    return (name == bridge or name.startswith(bridge + ".")
            or name.startswith((VETH_PREFIX, PEER_PREFIX)))


@dataclass
class _Link:
    name: str
    up: bool
    master: int


@dataclass
class NetState:
    """The host netns as rtnetlink said it; each method returns the changes a message
    makes (none for a message that changes nothing this channel reports)."""

    bridge: str
    links: dict[int, _Link] = field(default_factory=dict)
    addrs: set[tuple[int, int, str, int]] = field(default_factory=set)
    routes: set[tuple[Any, ...]] = field(default_factory=set)

    def name(self, index: int | None) -> str | None:
        link = self.links.get(index or 0)
        return link.name if link is not None else None

    def _severity(self, name: str | None) -> tuple[Severity, bool]:
        own = own_link(name, self.bridge)
        return ("info" if own else "notice"), own

    def link(self, new: bool, index: int, name: str, up: bool, master: int,
             kind: str | None = None) -> list[Change]:
        sev, own = self._severity(name)
        before = self.links.get(index)
        base: dict[str, Any] = {"name": name, "index": index}
        if kind:
            base["type"] = kind
        if not new:
            self.links.pop(index, None)
            self._forget(index, addresses=True)
            return [Change("link", {**base, "action": "remove"}, sev, own)]
        if len(self.links) >= MAX_NET and before is None:
            return []
        self.links[index] = _Link(name, up, master)
        if before is None:
            return [Change("link", {**base, "action": "add", "up": up}, sev, own)]
        out: list[Change] = []
        if before.name != name:
            out.append(Change("link", {**base, "action": "rename", "old": before.name},
                              sev, own))
        if before.up != up:
            if not up:
                self._forget(index, addresses=False)
            out.append(Change("link", {**base, "action": "up" if up else "down"}, sev, own))
        if before.master != master:
            out.append(Change("link", {**base, "action": "master",
                                       "master": self.name(master)}, sev, own))
        return out

    def _forget(self, index: int, *, addresses: bool) -> None:
        """The kernel flushes a link's routes when it goes down or away (and its addresses
        when it goes away) without a message for each: forget them, so that the same
        route added again is seen as new."""
        self.routes = {r for r in self.routes if r[4] != index}
        if addresses:
            self.addrs = {a for a in self.addrs if a[0] != index}

    def address(self, new: bool, index: int, family: int, address: str, prefixlen: int
                ) -> list[Change]:  # fmt: skip
        key = (index, family, address, prefixlen)
        if new == (key in self.addrs) or (new and len(self.addrs) >= MAX_NET):
            return []  # a lifetime renewed, or a removal of what was never seen added
        (self.addrs.add if new else self.addrs.discard)(key)
        name = self.name(index)
        sev, own = self._severity(name)
        return [Change("address", {"name": name, "address": address, "prefixlen": prefixlen,
                                   "action": "add" if new else "remove"}, sev, own)]

    def route(self, new: bool, table: int, dst: str | None, dst_len: int,
              gateway: str | None, oif: int | None, family: int) -> list[Change]:
        key = (table, dst, dst_len, gateway, oif, family)  # the arguments, in order
        if new == (key in self.routes) or (new and len(self.routes) >= MAX_NET):
            return []
        (self.routes.add if new else self.routes.discard)(key)
        name = self.name(oif)
        sev, own = self._severity(name)
        target = f"{dst}/{dst_len}" if dst else ("default" if dst_len == 0 else None)
        return [Change("route", {"dst": target, "gateway": gateway, "dev": name,
                                 "table": table, "action": "add" if new else "remove"},
                       sev, own)]


# --- sysctls ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Watch:
    name: str
    why: str
    severity: Severity = "notice"  # of a change nobody asked for


# What the agent's code relies on (grep /proc/sys in agent/): a change is reported with
# the old and new value.  A sysctl the kernel lacks (its module not loaded) reads None.
WATCHED: tuple[Watch, ...] = (
    Watch("net.ipv4.ip_forward", "cells reach each other and the uplink through the host "
          "(agent.kernel.bridge.enable_ip_forward)"),
    Watch("net.bridge.bridge-nf-call-iptables", "1 sends bridged frames through the inet "
          "hooks: the host's forwarding policy would see intra-VLAN traffic"),
    Watch("net.bridge.bridge-nf-call-ip6tables", "the same for IPv6"),
    Watch("net.bridge.bridge-nf-call-arptables", "the same for ARP"),
    Watch("net.netfilter.nf_conntrack_events", "channel 3's flow events come from "
          "conntrack events"),
    Watch("kernel.modprobe", "the helper the kernel runs as root to load a module a cell's "
          "socket() asked for: a changed path runs anything", "alert"),
    Watch("kernel.core_pattern", "a pipe here runs as root on every crash in any cell",
          "alert"),
    Watch("kernel.hostname", "the box's name (op set_hostname; cells have their own)"),
    Watch("kernel.domainname", "the box's NIS domain (op set_hostname)"),
    Watch("user.max_user_namespaces", "0 stops new cells from getting a user namespace"),
    Watch("fs.protected_symlinks", "shared data dirs are written by several cells"),
    Watch("fs.protected_hardlinks", "shared data dirs are written by several cells"),
    Watch("fs.protected_fifos", "shared data dirs are written by several cells"),
    Watch("fs.protected_regular", "shared data dirs are written by several cells"),
)


def sysctl_path(name: str) -> str:
    """``net.ipv4.ip_forward`` -> ``sys/net/ipv4/ip_forward`` (below the proc root)."""
    return "sys/" + name.replace(".", "/")


def sysctl_changes(old: Mapping[str, str | None], new: Mapping[str, str | None]
                   ) -> list[tuple[str, str | None, str | None]]:  # fmt: skip
    """(name, old, new) of every watched sysctl whose value differs."""
    return [(n, old.get(n), new.get(n)) for n in new if n in old and old[n] != new[n]]


def sysctl_change(name: str, old: str | None, new: str | None) -> Change:
    watch = next((w for w in WATCHED if w.name == name), None)
    return Change("sysctl", {"name": name, "old": old, "new": new},
                  watch.severity if watch is not None else "notice")


# --- attribution ------------------------------------------------------------------------

# The privileged operations (syscall/trap ``op``) and what each changes on the host:
# a kind, or ``sysctl:<name>`` (a trailing dot: every sysctl below).
OP_CHANGES: Mapping[str, tuple[str, ...]] = {
    "set_time": ("clock-set",),
    "set_hostname": ("sysctl:kernel.hostname", "sysctl:kernel.domainname"),
    "mount_usb": ("mount",),
    "sysctl_net": ("sysctl:net.",),
}


def change_key(c: Change) -> str:
    return f"sysctl:{c.attrs.get('name')}" if c.kind == "sysctl" else c.kind


def _explains(op: str, key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in OP_CHANGES[op])


@dataclass
class _Trap:
    cell: str
    op: str
    mono: float


class Attributor:
    """The allowed traps of the last :data:`WINDOW_S` seconds, and which cell a change is
    (see the module doc)."""

    def __init__(self, window_s: float = WINDOW_S, keep: int = MAX_TRAPS) -> None:
        self.window_s = window_s
        self.traps: collections.deque[_Trap] = collections.deque(maxlen=keep)

    def trap(self, cell: str | None, op: object, verdict: object, mono: float) -> bool:
        """Remember a trap if it is one that changes the host; True if it was."""
        if cell is None or verdict != "allowed" or not isinstance(op, str) \
                or op not in OP_CHANGES:
            return False
        self.traps.append(_Trap(cell, op, mono))
        return True

    def who(self, change: Change, mono: float) -> str | None:
        """The cell whose allowed trap explains ``change`` (that trap is used up), or None."""
        if change.own:
            return None
        key = change_key(change)
        for i in range(len(self.traps) - 1, -1, -1):
            t = self.traps[i]
            if mono - t.mono > self.window_s:
                break
            if t.mono <= mono + 0.001 and _explains(t.op, key):
                del self.traps[i]
                return t.cell
        return None


def attributed(change: Change, cell: str | None) -> tuple[str | None, Severity, dict[str, Any]]:
    """The event's cell, severity and attributes.  ``by`` names the cell whose trap
    explains the change (the pattern language joins on it), None for the host; a change
    a cell asked for and was granted is recorded (``notice``), never an alert."""
    attrs = {**change.attrs, "by": cell}
    if cell is None:
        return None, change.severity, attrs
    return cell, "notice" if change.severity == "alert" else change.severity, attrs
