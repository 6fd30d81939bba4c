"""agentctl: the operator CLI, its views (top, diag, checkconfig's report) and the client.

May import :mod:`agent.core` and, for what it reads without the daemon (``checkconfig``,
``diag``), the kernel probes :mod:`agent.kernel.probes` and the cgroup-mode detector; the
tree sealer :mod:`agent.kernel.seal` (``agent-seal``); the channels' pure modules
(``agent-patterns`` compiles, signs and checks pattern bundles with
:mod:`agent.monitor.correlation`).  Everything else it learns from agentd over the control
socket.
"""
