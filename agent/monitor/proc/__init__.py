"""Channel 2, process half: the life cycle of every process in every cell.

The kernel's proc connector (``NETLINK_CONNECTOR``, ``CN_IDX_PROC``) reports every fork,
exec, uid change and exit on the box, with host pids.  This channel keeps those of cells:

* :mod:`.rules` (pure): the connector's messages parsed, the pid cache that attributes
  each process to its cell (a child inherits its parent's cell: cells cannot move
  processes between cgroups; only the host's root can, so a process the cache holds for
  the host is looked up again when it execs), what each message becomes as an event, and
  a cell's process tree for ``agentctl ps --tree``;
* :mod:`.adapter`: what the rules need from ``/proc`` (a process's cell, its pid in the
  cell, name, executable and uids);
* :mod:`.service`: the loop side: the connector socket read in bounded slices, events on
  the bus.

docs/host-monitor.md describes the channel; docs/events.md its events.
"""
