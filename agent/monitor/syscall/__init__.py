"""Channel 2 (design step F): the host's view of the system calls of cells.

The seccomp filter of every cell (compiled by :mod:`agent.core.seccomp` from the policy in
:mod:`agent.core.syscallpolicy`) sends three kinds of calls to the master as user
notifications; everything else is allowed or refused by the kernel alone:

* ``trap``: a privileged call (clock, host name, mount, reboot, modules, swap...); the
  master decides from the manifest's privileged operations and, when granted, performs
  the operation itself with arguments copied out of the cell (:mod:`.ops`);
* ``denied``: an escape attempt (ptrace, bpf, keyctl, setns, namespace flags, io_uring,
  a refused socket family, a device node...): always refused, reported;
* ``killed``: a call from a foreign ABI (i386, arm, x32): the master kills the process.

Modules: :mod:`.rules` (pure: what a trapped call is), :mod:`.ops` (pure: each
operation's arguments and verdict), :mod:`.adapter` (the cell's memory and /proc),
:mod:`.adapter_ops` (the operations on the host), :mod:`.adapter_keeper` (the listener
keeper that outlives agentd), :mod:`.service` (the loop side).  docs/syscall.md.
"""
