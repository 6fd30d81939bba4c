"""Thin kernel adapters: each takes its roots, paths and handles as parameters.

What belongs here: libc wrappers (ctypes), the spawn child, seccomp user notification,
cgroup v1/v2 behind one protocol and their detection, cgroup knobs and samples, PSI
triggers, netlink through pyroute2 (one host-network class), nftables, the journal file,
orphan scans, kernel probes, the instance lock, what /proc says about the host.

Nothing here decides: decisions come from :mod:`agent.core`.  May import
:mod:`agent.core` and :mod:`agent.kernel`; tested for real in the host privileged tier
and in the emulated box.
"""
