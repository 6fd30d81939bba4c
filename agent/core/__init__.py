"""The pure core: decisions and data, no I/O.

What belongs here: errors, units, the agent's configuration, manifests, policy, the
admission budget, addresses, the cell lifecycle, plans and plan operations (which act only
through the adapters on the executor's context), the tuner's and the reclaim loop's
decisions, firewall rule generation, the seccomp compiler and the syscall ABI tables,
sandbox specs and mount planning, kernel-config features, the control protocol, events
as records, names of cells and their kernel objects.

May import: the standard library except os-level I/O (no ``os`` beyond ``os.strerror``,
no ``ctypes``, ``socket``, ``fcntl``, ``select``, ``signal``, ``subprocess``,
``threading``, ``asyncio``, ``shutil``), cbor2, and nothing of ours outside
``agent.core``.  Everything here runs and is tested on any host without root
(tests/unit/test_layers.py enforces the rule).
"""
