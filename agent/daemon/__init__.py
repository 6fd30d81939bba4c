"""agentd: one process, one asyncio loop, and the services on it.

What belongs here: :mod:`agent.daemon.main` (the one place that builds everything and
passes each service what it needs), the server (control socket, dispatcher, built-in
ops), the event bus, the cell manager and its op handlers, the spawner, the tuner
service, the reclaim service, and (to come) the monitors' services and the respawn.

May import :mod:`agent.core`, :mod:`agent.kernel` and :mod:`agent.monitor`.  Services
never import each other, the server or another service's handlers: they receive what
they need, typed by narrow protocols (tests/unit/test_layers.py enforces it).
"""
