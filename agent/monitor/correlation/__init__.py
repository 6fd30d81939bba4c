"""Channel 4 (design step H): correlation of events from every channel and every cell.

Pure modules only, no I/O (tests/unit/test_layers.py enforces it); reading files and
sockets belongs to the callers (``agent-patterns`` on a build host, the daemon's
correlation service on the box).  docs/patterns.md describes the whole; the modules:

* :mod:`~agent.monitor.correlation.event`: what the engine reads of an event
  (:class:`~agent.monitor.correlation.event.EventLike`) and a plain record that has it;
* :mod:`~agent.monitor.correlation.model`: what a pattern is (frozen, validated), the
  engine version; :mod:`~agent.monitor.correlation.wire` decodes its CBOR form;
* :mod:`~agent.monitor.correlation.syntax` and :mod:`~agent.monitor.correlation.language`:
  the pattern language (text, line-based), with errors naming file, line and fix;
* :mod:`~agent.monitor.correlation.partial`: a partial match, its state machine as a
  table;
* :mod:`~agent.monitor.correlation.compiled`: a pattern turned into fast predicates;
* :mod:`~agent.monitor.correlation.runner`: one pattern's partial matches and what an
  event does to them; :mod:`~agent.monitor.correlation.dispatch`: which patterns an
  event concerns;
* :mod:`~agent.monitor.correlation.engine`: events in, matches out (``feed``), counters,
  ``swap`` of the pattern set; :mod:`~agent.monitor.correlation.match`: a match's chain;
* :mod:`~agent.monitor.correlation.reference`: the brute-force matcher, the executable
  statement of what a match is (tests compare the engine with it);
* :mod:`~agent.monitor.correlation.bundle`: the signed CBOR bundle and its checks;
* :mod:`~agent.monitor.correlation.library`: the loaded bundle, the previous one for
  rollback, and the swap into the engine.

Nothing is imported here: import the module you need (the bundle module needs PyNaCl).
"""
