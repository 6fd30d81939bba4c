"""What a cell may be granted: Linux capabilities by name, the ones no cell may keep (with
what to ask for instead), and the privileged operations the master performs for a cell
(design step F: trap and decide).  Read by the manifest decoder, the policy and the
sandbox; docs/manifest.md lists them for service authors.
"""

from __future__ import annotations

__all__ = ["CAPABILITIES", "PRIVILEGED_OPS", "REFUSED_CAPABILITIES"]

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
}
