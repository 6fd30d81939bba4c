"""Kernel configuration: what the agent needs from the kernel, and a parser.

Pure code, no I/O.  ``FEATURES`` is the one source of truth for the kernel
options the agent uses: the Yocto and Buildroot kernel fragments in
``recipes/`` are generated from it (``python -m agent.core.kconfig``) and a unit
test checks that the checked-in fragments are identical to the output.
``agent.cli.checkconfig`` combines the table with probes of the running kernel.

Each feature lists the options it *needs* (without any of them the feature
is missing), the options it *wants* (without them it works, degraded) and
the options it wants *unset*.  A ``=m`` option counts as enabled: the agent
or the init scripts load modules before ``agentd`` starts.
"""

from __future__ import annotations

import gzip
import re
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from agent.core.errors import ConfigError

__all__ = [
    "EXTRA_SYMBOLS",
    "FEATURES",
    "Feature",
    "KernelConfig",
    "Status",
    "config_status",
    "feature",
    "fragment_symbols",
    "is_enabled",
    "parse_config",
    "parse_config_gz",
    "render_fragment",
]

# symbol (without CONFIG_) -> value: "y", "m", "n" (from "is not set"), or the
# literal value of string/int/hex options (quotes removed).
KernelConfig = Mapping[str, str]

_SET = re.compile(r"^CONFIG_([A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# CONFIG_([A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Parse kernel ``.config`` text.  Unknown or malformed lines are ignored,
    like Kconfig itself does; later assignments win."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _SET.match(line)
        if m:
            value = m.group(2).strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            out[m.group(1)] = value
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def parse_config_gz(data: bytes) -> dict[str, str]:
    """Parse the gzip-compressed config as found in ``/proc/config.gz``."""
    try:
        text = gzip.decompress(data).decode("utf-8", errors="replace")
    except (OSError, EOFError, zlib.error) as exc:
        raise ConfigError(
            "E_KCONFIG",
            f"kernel config is not valid gzip data: {exc}",
            "pass an uncompressed .config with --config",
        ) from exc
    return parse_config(text)


def is_enabled(config: KernelConfig, symbol: str) -> bool:
    """True if ``CONFIG_<symbol>`` is built in (``y``) or a module (``m``)."""
    return config.get(symbol) in ("y", "m")


class Status(StrEnum):
    PRESENT = "present"
    DEGRADED = "degraded"
    MISSING = "missing"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Feature:
    """One thing the agent uses from the kernel.

    ``probe`` names a live check in ``agent.cli.checkconfig`` (or is empty when
    the running kernel cannot be asked without privilege).  ``required``
    features make ``agentctl checkconfig`` exit 1 when missing; the others
    only degrade the agent, as ``consequence`` says.
    """

    name: str
    title: str
    need: tuple[str, ...]
    want: tuple[str, ...] = ()
    unset: tuple[str, ...] = ()
    probe: str = ""
    required: bool = False
    consequence: str = ""
    why: str = ""
    degraded: str = ""

    @property
    def degraded_consequence(self) -> str:
        """What the agent loses when the feature is only partly usable."""
        return self.degraded or self.consequence


FEATURES: tuple[Feature, ...] = (
    Feature(
        "namespaces", "namespaces: mount, uts, ipc, pid, net",
        need=("NAMESPACES", "UTS_NS", "IPC_NS", "PID_NS", "NET_NS"),
        probe="namespaces", required=True,
        consequence="cells cannot be created",
        why="each cell is a set of fresh namespaces",
    ),
    Feature(
        "user_ns", "user namespaces",
        need=("USER_NS",), probe="user_ns",
        consequence="cells run without a user namespace: uid 0 in a cell is host root; "
        "manifests asking for in-cell root are refused",
        why="root inside a cell maps to an unprivileged host uid",
        degraded="user namespaces are disabled by sysctl: cells run without one",
    ),
    Feature(
        "cgroup_ns", "cgroup namespaces",
        need=("CGROUP_NS",), probe="cgroup_ns",
        consequence="processes in a cell see host cgroup paths in /proc/self/cgroup",
        why="a cell sees its own leaf as the cgroup root",
    ),
    Feature(
        "cgroups", "control groups",
        need=("CGROUPS",), probe="cgroups", required=True,
        consequence="no resource control: cells cannot be created",
        why="every cell is a cgroup leaf",
    ),
    Feature(
        "cgroup2", "cgroup v2 unified hierarchy at /sys/fs/cgroup",
        need=("CGROUPS",), probe="cgroup2",
        consequence="falls back to the cgroup-v1 backend (cgroupspy): no per-cell PSI, "
        "no memory.high throttling, coarser accounting",
        why="the design's cell is a cgroup v2 leaf",
    ),
    Feature(
        "memory", "memory controller",
        need=("MEMCG",), probe="ctrl_memory", required=True,
        consequence="memory budgets cannot be enforced: cells are refused",
        why="memory.max/memory.high per cell, memory.events for the tuner",
        degraded="memory limits only through the cgroup-v1 backend (no memory.high)",
    ),
    Feature(
        "cpu", "cpu controller with bandwidth control",
        need=("CGROUP_SCHED", "FAIR_GROUP_SCHED"), want=("CFS_BANDWIDTH",),
        probe="ctrl_cpu",
        consequence="cells are not CPU-limited (without CFS_BANDWIDTH only cpu.weight works)",
        why="cpu.weight and cpu.max per cell",
        degraded="no hard CPU cap per cell (cpu.weight only, or the cgroup-v1 backend)",
    ),
    Feature(
        "pids", "pids controller",
        need=("CGROUP_PIDS",), probe="ctrl_pids",
        consequence="a fork bomb in a cell is not contained by pids.max",
        why="pids.max per cell",
        degraded="pids.max only through the cgroup-v1 backend",
    ),
    Feature(
        "io", "io controller",
        need=("BLK_CGROUP",), probe="ctrl_io",
        consequence="no I/O weighting between cells",
        why="io.weight per cell",
        degraded="I/O weights only through the cgroup-v1 backend (blkio)",
    ),
    Feature(
        "cpuset", "cpuset controller",
        need=("CPUSETS",), probe="ctrl_cpuset",
        consequence="cells cannot be pinned to cores",
        why="cpuset.cpus for cells that ask for dedicated cores",
        degraded="core pinning only through the cgroup-v1 backend",
    ),
    Feature(
        "devices", "device access control (cgroup BPF)",
        need=("CGROUP_BPF", "BPF_SYSCALL"),
        consequence="cell device access relies only on the minimal /dev the cell gets",
        why="cgroup v2 device controller is a BPF program",
    ),
    Feature(
        "psi", "pressure stall information",
        need=("PSI",), unset=("PSI_DEFAULT_DISABLED",), probe="psi",
        consequence="tuner falls back to periodic samples; bursts are noticed at the next sample",
        why="PSI triggers wake the tuner on pressure, without polling",
        degraded="PSI is off unless the kernel is booted with psi=1: tuner falls back "
        "to periodic samples",
    ),
    Feature(
        "seccomp", "seccomp filter",
        need=("SECCOMP", "SECCOMP_FILTER"), probe="seccomp", required=True,
        consequence="no syscall filter in cells: cells cannot be created",
        why="every cell's first process installs a filter before exec",
    ),
    Feature(
        "seccomp_notify", "seccomp user notification",
        need=("SECCOMP_FILTER",), probe="seccomp_notify",
        consequence="privileged syscalls are denied outright (EPERM) instead of "
        "being trapped to the master (channel 2 loses trap-and-decide)",
        why="channel 2: privileged syscalls are trapped to the master",
    ),
    Feature(
        "fanotify", "fanotify with permission events",
        need=("FANOTIFY",), want=("FANOTIFY_ACCESS_PERMISSIONS",), probe="fanotify",
        consequence="exec allow-list and signature checks are off (channel 1 sees "
        "no file events; without permission events it can alert but not block)",
        why="channel 1: exec allow-list and signature check on cell files",
        degraded="no FAN_OPEN_EXEC_PERM: exec protection is report-only (FAN_OPEN_EXEC: "
        "an unsealed or listed file runs, then exec/exec-unverified is an alert)",
    ),
    Feature(
        "proc_connector", "proc connector (process events)",
        need=("CONNECTOR", "PROC_EVENTS"),
        consequence="no process events: channel 2 sees no fork, exec, uid change or exit "
        "in cells (agentctl ps --tree still reads /proc)",
        why="channel 2: fork/exec/uid/exit events of cell processes",
    ),
    Feature(
        "timerfd", "timerfd (clock-set notification)",
        need=("TIMERFD",),
        consequence="a set of the wall clock is not reported (channel 2: host/clock-set)",
        why="channel 2: a timerfd with TFD_TIMER_CANCEL_ON_SET wakes on every clock set",
    ),
    Feature(
        "bridge", "bridge",
        need=("BRIDGE",), probe="mod_bridge", required=True,
        consequence="no bridge for cell ports: networked cells are refused",
        why="cell ports hang off one host bridge",
    ),
    Feature(
        "bridge_vlan", "bridge VLAN filtering",
        need=("BRIDGE_VLAN_FILTERING",), required=True,
        consequence="cells cannot be separated by VLAN on the shared bridge: "
        "networked cells are refused",
        why="each cell is one VLAN port of a VLAN-filtering bridge",
    ),
    Feature(
        "vlan", "802.1Q VLAN interfaces",
        need=("VLAN_8021Q",), probe="mod_8021q",
        consequence="no VLAN sub-interfaces on the host side: inter-cell routing "
        "through the host is unavailable",
        why="host-side VLAN interfaces route inter-cell traffic (channel 3)",
    ),
    Feature(
        "veth", "virtual ethernet pairs",
        need=("VETH",), probe="mod_veth", required=True,
        consequence="cells have no network interface: networked cells are refused",
        why="a veth pair links a cell's netns to the bridge",
    ),
    Feature(
        "nftables", "nftables (inet family)",
        need=("NETFILTER", "NF_TABLES", "NF_TABLES_INET"),
        probe="mod_nf_tables", required=True,
        consequence="no per-cell firewall and no inter-cell policy: networked cells are refused",
        why="channel 1 table in each cell netns, channel 3 forwarding policy on the host",
    ),
    Feature(
        "conntrack", "connection tracking for nftables",
        need=("NF_CONNTRACK", "NFT_CT"), required=True,
        consequence="stateful rules (ct state established) fail to load: "
        "networked cells are refused",
        why="per-cell and inter-cell rules are stateful",
    ),
    Feature(
        "nft_log", "nftables logging to NFLOG, rate-limited",
        need=("NFT_LOG", "NFT_LIMIT", "NETFILTER_NETLINK_LOG"), want=("NFT_REJECT",),
        consequence="refusals, spoofing and layer-2 abuse are still dropped but not "
        "reported: channel 3 has no flow-denied, l2-drop or scan events",
        why="channel 3: rate-limited log rules carry drops to agentd (NFLOG groups)",
        degraded="blocked connections time out instead of being rejected",
    ),
    Feature(
        "nft_bridge", "nftables bridge family",
        need=("NF_TABLES_BRIDGE",),
        consequence="no layer-2 rules on the cells' bridge ports: root in a cell's netns "
        "could forge MAC, ARP and IP sources on its VLAN, send tagged frames, DHCP or "
        "router advertisements (the cells' own tables still stop ordinary processes)",
        why="channel 3: MAC, ARP, IP, VLAN-tag, DHCP and RA rules on each cell port",
    ),
    Feature(
        "conntrack_events", "conntrack events to userspace",
        need=("NF_CONNTRACK_EVENTS", "NF_CT_NETLINK"),
        consequence="no flow events for allowed connections between cells "
        "(refusals are still reported)",
        why="channel 3: new connections between cells as conntrack events",
    ),
    Feature(
        "socket_diag", "TCP socket monitoring (sock_diag)",
        need=("INET_DIAG", "INET_TCP_DIAG"),
        consequence="no listen events: a cell's listener is seen only by the flows "
        "that reach it",
        why="channel 3: each cell's TCP listeners, dumped through sock_diag",
    ),
    Feature(
        "nft_nat", "nftables NAT",
        need=("NF_NAT", "NFT_NAT"), want=("NFT_MASQ",),
        consequence="cells cannot reach the uplink through NAT",
        why="masquerade cell subnets toward the uplink",
        degraded="no masquerade: the uplink address must be fixed for SNAT",
    ),
    Feature(
        "tmpfs", "tmpfs",
        need=("TMPFS",), probe="fs_tmpfs", required=True,
        consequence="cells get no private /dev, /run and /tmp: cells cannot be created",
        why="private /dev, /run and /tmp per cell",
    ),
    Feature(
        "overlayfs", "overlay filesystem",
        need=("OVERLAY_FS",), probe="fs_overlay",
        consequence="a cell's root is a read-only bind of its image, with no writable layer",
        why="a writable upper layer over a read-only service image",
    ),
    Feature(
        "ikconfig", "kernel config in /proc/config.gz",
        need=("IKCONFIG", "IKCONFIG_PROC"), probe="ikconfig",
        consequence="checkconfig needs /boot/config-<release> or --config",
        why="lets agentctl checkconfig read the running kernel's options",
    ),
)

# Options the fragments enable that no feature checks: support for the
# cgroup-v1 backend (legacy BSP kernels) and plumbing the features rely on.
EXTRA_SYMBOLS: tuple[str, ...] = (
    "CGROUP_FREEZER",
    "CGROUP_DEVICE",
    "CGROUP_CPUACCT",
    "NETFILTER_ADVANCED",
    "NF_TABLES_BRIDGE",
)


def feature(name: str) -> Feature:
    for f in FEATURES:
        if f.name == name:
            return f
    raise KeyError(name)


def config_status(config: KernelConfig, feat: Feature) -> tuple[Status, list[str]]:
    """What the configuration alone says about ``feat``, and why.

    The reasons name the offending options (``CONFIG_X not set``,
    ``CONFIG_Y=y should be unset``).
    """
    reasons: list[str] = []
    missing_need = [s for s in feat.need if not is_enabled(config, s)]
    if missing_need:
        reasons.extend(f"CONFIG_{s} not set" for s in missing_need)
        return Status.MISSING, reasons
    reasons.extend(f"CONFIG_{s} not set" for s in feat.want if not is_enabled(config, s))
    reasons.extend(f"CONFIG_{s}=y should be unset" for s in feat.unset if is_enabled(config, s))
    return (Status.DEGRADED if reasons else Status.PRESENT), reasons


def fragment_symbols() -> dict[str, str]:
    """The option values the fragments set (``y`` or ``n``), in fragment order."""
    seen: dict[str, str] = {}
    for feat in FEATURES:
        for s in (*feat.need, *feat.want):
            seen.setdefault(s, "y")
        for s in feat.unset:
            seen.setdefault(s, "n")
    for s in EXTRA_SYMBOLS:
        seen.setdefault(s, "y")
    return seen


def render_fragment() -> str:
    """Kernel configuration fragment text, identical for Yocto and Buildroot."""
    lines = [
        "# Kernel options used by agentd.",
        "# Generated by `python -m agent.core.kconfig` from agent/core/kconfig.py; do not edit.",
    ]
    done: set[str] = set()
    for feat in FEATURES:
        block: list[str] = []
        for s in (*feat.need, *feat.want):
            if s not in done:
                done.add(s)
                block.append(f"CONFIG_{s}=y")
        for s in feat.unset:
            if s not in done:
                done.add(s)
                block.append(f"# CONFIG_{s} is not set")
        if block:
            lines.append("")
            lines.append(f"# {feat.title}: {feat.why}")
            lines.extend(block)
    extra = [s for s in EXTRA_SYMBOLS if s not in done]
    if extra:
        lines.append("")
        lines.append("# cgroup-v1 backend and netfilter plumbing")
        lines.extend(f"CONFIG_{s}=y" for s in extra)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - generator entry point
    sys.stdout.write(render_fragment())
