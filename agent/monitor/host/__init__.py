"""Channel 2, host half: the host's parameters and hardware, watched without polling.

* kernel uevents: devices and modules added or removed;
* the wall clock set (a ``timerfd`` armed with ``TFD_TIMER_CANCEL_ON_SET``);
* the host's mount table (``/proc/self/mountinfo`` polled for ``POLLPRI``);
* links, addresses and routes of the host's network namespace (rtnetlink groups);
* the sysctls the agent relies on, read again whenever another event hints at a change.

Each change is an event of channel ``host``, attributed to a cell when a trapped syscall
of that cell, allowed by the master, explains it (``syscall/trap`` events just before),
else to the host: a change of a host parameter that nobody asked the master for is a
``notice``.

Modules: :mod:`.rules` (pure: parsers, the sysctl watch list, what counts as a change,
attribution, severities), :mod:`.adapter` (sockets, the timerfd, the mount table, sysctl
reads), :mod:`.service` (the loop side).  docs/host-monitor.md.
"""
