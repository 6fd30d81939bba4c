"""The security channels (design steps E-H), one subpackage per channel.

Each channel subpackage holds three parts: pure ``rules`` (events in, decisions out,
tested exhaustively on the host), a kernel ``adapter`` (fanotify, seccomp notify,
conntrack, NFLOG...: thin, tested for real), and a ``service`` that the daemon's
``main`` wires to the loop and the event bus.

May import :mod:`agent.core`, :mod:`agent.kernel` and :mod:`agent.monitor`.
"""
