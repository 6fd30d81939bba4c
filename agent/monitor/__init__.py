"""The security channels (design steps E-H), one subpackage per channel.

Each channel subpackage holds three parts: pure decision modules (events in, decisions
out, tested exhaustively on the host), a kernel ``adapter`` (fanotify, seccomp notify,
conntrack, NFLOG...: thin, tested for real), and a ``service`` that the daemon's
``main`` wires to the loop and the event bus.

May import :mod:`agent.core`, :mod:`agent.kernel` and :mod:`agent.monitor`.  Every module
of a channel not named ``adapter*`` or ``service*`` is pure and keeps the core's rules: no
I/O from the standard library (see :mod:`agent.core`), and of ours only the core and other
pure monitor modules (tests/unit/test_layers.py enforces it).  Those pure modules may also
be used by :mod:`agent.cli` (``agent-patterns`` runs them on a build host).
"""
