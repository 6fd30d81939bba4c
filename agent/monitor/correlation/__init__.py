"""Channel 4 (design step H): correlation of events from every channel and every cell.

Pure modules only, no I/O (tests/unit/test_layers.py enforces it); reading files and
sockets belongs to the callers (``agent-patterns`` on a build host, the daemon's
correlation service on the box):

* :mod:`~agent.monitor.correlation.model`: what a pattern is (frozen, validated), the
  events the engine reads (:class:`~agent.monitor.correlation.model.EventLike`), the
  matches it returns, the engine version;
* :mod:`~agent.monitor.correlation.language`: the pattern language (text, line-based)
  compiled into patterns, with errors naming file, line and fix (docs/patterns.md);
* :mod:`~agent.monitor.correlation.partial`: a partial match, its state machine as a
  table;
* :mod:`~agent.monitor.correlation.compiled`: a pattern turned into fast predicates;
* :mod:`~agent.monitor.correlation.engine`: events in, matches out (``feed``), bounded
  partial matches, counters, ``swap`` of the pattern set;
* :mod:`~agent.monitor.correlation.reference`: the brute-force matcher, the executable
  statement of what a match is (tests compare the engine with it);
* :mod:`~agent.monitor.correlation.bundle`: the signed CBOR bundle and its checks;
* :mod:`~agent.monitor.correlation.library`: the loaded bundle, the previous one for
  rollback, and the swap into the engine.

Nothing is imported here: import the module you need (the bundle module needs PyNaCl).
"""
