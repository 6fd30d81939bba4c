"""What a cell may be granted: Linux capabilities by name, the ones no cell may keep (with
what to ask for instead), the ones a cell may keep only inside a user namespace (with what
each reaches without one), and the privileged operations the master performs for a cell
(design step F: trap and decide).  Read by the manifest decoder, the policy and the
sandbox; docs/manifest.md lists them for service authors, docs/isolation.md has the
table of capabilities per mode (drawn from :data:`CAPABILITY_MODES` by
:func:`capability_table`; a unit test fails when that copy is stale).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CAPABILITIES", "CAPABILITY_MODES", "NOUSERNS_KEEPABLE", "PRIVILEGED_OPS",
           "REFUSED_CAPABILITIES", "CapabilityMode", "capability_table", "without_userns"]

# Linux capability names and numbers (include/uapi/linux/capability.h, up to 6.x).
CAPABILITIES: dict[str, int] = {
    f"CAP_{n}": i
    for i, n in enumerate(
        "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
        "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
        "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
        "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
        "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
        "CHECKPOINT_RESTORE".split()
    )
}

# Capabilities no cell may keep, with what to do instead.  Each one either reaches the
# host kernel directly or is a known container escape.
REFUSED_CAPABILITIES: dict[str, str] = {
    "CAP_SYS_ADMIN": "mounts, namespaces, many escapes; ask for a privileged op such as mount_usb",
    "CAP_SYS_MODULE": "loads kernel code; modules are part of the firmware image",
    "CAP_SYS_RAWIO": "raw port and memory I/O; drivers belong to the host",
    "CAP_SYS_BOOT": "reboots the box; ask for the privileged op 'reboot'",
    "CAP_SYS_TIME": "changes the host clock; ask for the privileged op 'set_time'",
    "CAP_MAC_ADMIN": "changes the LSM policy of the host",
    "CAP_MAC_OVERRIDE": "bypasses the LSM policy of the host",
    "CAP_SYS_PTRACE": "reads and writes other processes' memory",
    "CAP_NET_ADMIN": "the cell's network is configured by the agent from [network]",
    "CAP_BPF": "loads BPF programs into the host kernel",
    "CAP_PERFMON": "host-wide performance monitoring, a side channel",
    "CAP_DAC_READ_SEARCH": "open_by_handle_at() escapes any mount namespace",
    "CAP_SYSLOG": "reads kernel addresses from the host log",
    "CAP_AUDIT_CONTROL": "changes the host audit rules",
    "CAP_AUDIT_READ": "reads the host audit log",
    "CAP_LINUX_IMMUTABLE": "the image is read-only; use a [[writable]] area",
    "CAP_MKNOD": "device nodes are provided by the agent",
    "CAP_SYS_PACCT": "host process accounting",
    "CAP_BLOCK_SUSPEND": "keeps the whole box awake",
    "CAP_CHECKPOINT_RESTORE": "sets pids and reads other processes' state",
    "CAP_SYS_TTY_CONFIG": "reconfigures host terminals such as the serial console",
}

# Privileged operations a cell may ask the master for (trapped by seccomp or requested
# over the cell's channel); the master re-checks the arguments of each one.
PRIVILEGED_OPS: dict[str, str] = {
    "set_time": "set the system clock (clock_settime, adjtimex): an NTP client",
    "set_hostname": "set the box's host name",
    "mount_usb": "mount a USB storage partition (nosuid, nodev, noexec) into the cell",
    "reboot": "reboot the box (a firmware updater, a watchdog service)",
    "sysctl_net": "write net.* sysctls from the master's allow-list",
    "dvb_tuner": "open the DVB tuner/demux device nodes under /dev/dvb",
    "leds": "drive the front-panel LEDs under /sys/class/leds",
    "memfd": "create memory-only files (memfd_create): exec protection cannot see their "
             "execs (docs/exec.md)",
}


@dataclass(frozen=True)
class CapabilityMode:
    """What a grantable capability reaches in each mode, and whether a cell may keep it
    when agentd runs without user namespaces (``[userns] enabled = false``)."""

    with_userns: str
    without_userns: str
    keep_without_userns: bool


# Every capability that is not in REFUSED_CAPABILITIES.  With a user namespace the cell's
# capabilities count only in that namespace: checks made with capable() (against the
# host's user namespace) fail, and the inode checks (capable_wrt_inode_uidgid) pass only
# for inodes whose owner is mapped into the cell.  The cell's network namespace is made
# by agentd in the host's user namespace, so the network capabilities count there not
# at all.  Without a user namespace the cell's processes are in the host's user
# namespace: every one of these checks passes, and what a capability reaches is bounded
# only by what the cell can name (its own pid, ipc, uts, mount and network namespaces,
# and every inode it can open, host inodes such as its stdout FIFO or its data dir
# included).
CAPABILITY_MODES: dict[str, CapabilityMode] = {
    "CAP_CHOWN": CapabilityMode(
        "chown of inodes owned by ids mapped into the cell",
        "chown of any inode it can reach, host inodes included (its stdout FIFO, its "
        "data dir on the host's flash): hands files to host root", False),
    "CAP_DAC_OVERRIDE": CapabilityMode(
        "bypasses file modes only on inodes owned by ids mapped into the cell",
        "bypasses file modes on every inode it reaches: root-only /proc entries (BSP "
        "drivers' knobs, /proc/slabinfo), its FIFOs", False),
    "CAP_FOWNER": CapabilityMode(
        "owner checks only on inodes owned by ids mapped into the cell",
        "chmod, utimes and xattrs on every inode it reaches, host inodes included", False),
    "CAP_FSETID": CapabilityMode(
        "keeps set-id bits on its own files",
        "keeps set-id bits on files it may write anyway: without CAP_CHOWN/CAP_FOWNER only "
        "its own files, with its own ids", True),
    "CAP_KILL": CapabilityMode(
        "signals any process of the cell's pid namespace",
        "the same: a process outside the cell's pid namespace cannot be named", True),
    "CAP_SETGID": CapabilityMode(
        "setgid to groups mapped into the cell",
        "setgid to any host group, root's included", False),
    "CAP_SETUID": CapabilityMode(
        "setuid to ids mapped into the cell",
        "setuid(0): real host root, owner of every root-owned inode (/proc/scsi/scsi, "
        "/proc/sysrq-trigger by mode alone); or any host user", False),
    "CAP_SETPCAP": CapabilityMode(
        "changes its own bounding set, inheritable set and securebits",
        "the same: its own process only, and only ever less", True),
    "CAP_NET_BIND_SERVICE": CapabilityMode(
        "nothing: the cell's netns belongs to the host's user namespace",
        "ports below 1024 in the cell's own netns", True),
    "CAP_NET_BROADCAST": CapabilityMode(
        "nothing (no kernel check uses it)", "nothing (no kernel check uses it)", True),
    "CAP_NET_RAW": CapabilityMode(
        "nothing: the cell's netns belongs to the host's user namespace",
        "raw and packet sockets on its veth: forged frames and addresses on its VLAN "
        "(ARP spoofing of its neighbours and of the gateway)", False),
    "CAP_IPC_LOCK": CapabilityMode(
        "nothing (checked with capable())",
        "mlock without RLIMIT_MEMLOCK: memory the tuner can no longer reclaim", False),
    "CAP_IPC_OWNER": CapabilityMode(
        "bypasses permissions on the IPC objects of the cell's own IPC namespace",
        "the same: the IPC namespace is the cell's own", True),
    "CAP_SYS_CHROOT": CapabilityMode(
        "chroot inside the cell's own mount namespace",
        "the same; no_new_privs voids the set-id tricks a chroot allows", True),
    "CAP_SYS_NICE": CapabilityMode(
        "nothing (checked with capable())",
        "real-time scheduling that cpu.max does not bound: a SCHED_FIFO loop takes a "
        "host CPU", False),
    "CAP_SYS_RESOURCE": CapabilityMode(
        "nothing (checked with capable())",
        "raises hard rlimits, ignores quotas and ext4's reserved blocks (fills the "
        "flash), negative oom_score_adj", False),
    "CAP_LEASE": CapabilityMode(
        "nothing (checked with capable())",
        "leases on host files it can open (its image): the host's writers stall for "
        "lease-break-time", False),
    "CAP_AUDIT_WRITE": CapabilityMode(
        "nothing: audit takes user messages only from the initial pid namespace",
        "nothing: audit takes user messages only from the initial pid namespace", True),
    "CAP_SETFCAP": CapabilityMode(
        "namespaced file capabilities, valid only in the cell's user namespace",
        "host-valid file capabilities on data-dir files: a host process running one "
        "gets them", False),
    "CAP_WAKE_ALARM": CapabilityMode(
        "nothing (checked with capable())",
        "alarm timers that wake the box from standby", False),
}

# Capability numbers a cell may keep without a user namespace (agent.core.sandbox re-checks
# every spawn spec against this set).
NOUSERNS_KEEPABLE = frozenset(CAPABILITIES[c] for c, m in CAPABILITY_MODES.items()
                              if m.keep_without_userns)


def without_userns(caps: Iterable[str], uid: int, gid: int) -> list[tuple[str, str]]:
    """What a cell asking for ``caps`` (``CAP_`` names) as ``uid``/``gid`` may not have when
    agentd runs without user namespaces: ``(key, why)`` pairs, empty if nothing.  There the
    cell's ids are host ids: uid or gid 0 would make the cell's processes owners of every
    root-owned inode they reach, with no capability needed."""
    out: list[tuple[str, str]] = []
    if uid == 0:
        out.append(("service.uid", "uid 0 in a cell without a user namespace is host root"))
    if gid == 0:
        out.append(("service.gid", "gid 0 in a cell without a user namespace is host root's "
                                   "group"))
    for cap in sorted(caps):
        mode = CAPABILITY_MODES.get(cap)
        if mode is None or not mode.keep_without_userns:
            why = mode.without_userns if mode else REFUSED_CAPABILITIES.get(cap, "unknown")
            out.append(("privileges.capabilities", f"{cap}: {why}"))
    return out


def capability_table() -> str:
    """The markdown table of docs/isolation.md: every capability, what it reaches in each
    mode, and whether a cell may keep it there."""
    rows = ["| capability | with a user namespace | without one | kept |",
            "|---|---|---|---|"]
    for cap in CAPABILITIES:
        mode = CAPABILITY_MODES.get(cap)
        if mode is None:
            rows.append(f"| `{cap}` | never granted: {REFUSED_CAPABILITIES[cap]} | never "
                        "granted | no |")
        else:
            kept = "both modes" if mode.keep_without_userns else "with a user namespace only"
            rows.append(f"| `{cap}` | {mode.with_userns} | {mode.without_userns} | {kept} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(capability_table(), end="")
