"""What the master does about an event (issue 11, "responses"), decided purely.

Every event of the security channels may call for a response, configured per kind in
``agentd.toml``::

    [responses]
    "exec/exec-denied" = "kill"            # channel/kind, shell patterns allowed
    "exec/exec-denied:signature" = "stop"  # channel/kind:reason, for one reason only
    "net/scan" = "isolate"
    "correlation/escapes-across-cells" = "record"  # a pattern's own response, overridden

A correlation alert carries the response its pattern names (docs/patterns.md); a rule
whose channel is literally ``correlation`` and that matches ``correlation/<pattern>``
replaces it (``"correlation/*"`` replaces them all), so an operator can soften or harden
one pattern of a signed bundle without re-signing it.  Catch-alls such as ``"*/*"`` do
not: a pattern's response is more specific than they are.

A response is one of :class:`Response`: ``record`` (the event is the record: nothing
else), ``kill`` (the offending process, through a pidfd, only if it is still in the
cell), ``freeze`` (the whole cell, cgroup freezer), ``isolate`` (the cell's port goes
down: its VLAN no longer reaches it) and ``stop`` (the cell is stopped as by
``agentctl stop``).  The most specific matching rule wins (a rule for the event's reason over
one for its kind, an exact rule over a pattern, a longer pattern over a shorter one);
events of the host (no cell) are only recorded.
Responses are limited per cell and response (:data:`REPEAT_S`), so a flood of events
does not become a flood of kills, and each response carried out is itself an event.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.core.errors import ConfigError

__all__ = ["DEFAULT_RULES", "REPEAT_S", "Response", "ResponsePolicy", "parse_responses"]

REPEAT_S = 10.0  # one response of a kind per cell at most this often


class Response(enum.Enum):
    RECORD = "record"
    KILL = "kill"
    FREEZE = "freeze"
    ISOLATE = "isolate"
    STOP = "stop"


# Sensible defaults: what the kernel already blocked is recorded; a file whose hash is a
# known signature had its exec denied, but the process that tried is compromised.
DEFAULT_RULES: Mapping[str, Response] = {
    "*/*": Response.RECORD,
    "exec/exec-denied:signature": Response.KILL,
}


def _specificity(pattern: str) -> tuple[int, int]:
    """Exact patterns first, then by the length of their literal part."""
    wild = sum(pattern.count(c) for c in "*?[")
    return (0 if wild else 1, len(pattern) - wild)


@dataclass(frozen=True)
class ResponsePolicy:
    rules: Mapping[str, Response] = field(default_factory=lambda: dict(DEFAULT_RULES))
    repeat_s: float = REPEAT_S

    @functools.cached_property
    def _ordered(self) -> tuple[tuple[str, Response], ...]:
        return tuple(sorted(self.rules.items(), key=lambda kv: _specificity(kv[0]),
                            reverse=True))

    def decide(self, cell: str | None, channel: str, kind: str,
               reason: str | None = None) -> Response:
        """The response to an event of ``channel``/``kind`` (with an attribute ``reason``,
        if it has one) in ``cell``."""
        if cell is None:
            return Response.RECORD
        keys = ([f"{channel}/{kind}:{reason}"] if reason else []) + [f"{channel}/{kind}"]
        for key in keys:
            for pattern, response in self._ordered:
                if (":" in pattern) == (":" in key) and fnmatch.fnmatchcase(key, pattern):
                    return response
        return Response.RECORD

    def override(self, channel: str, name: str) -> Response | None:
        """The response configured for ``channel/name`` by a rule of that very channel
        (no wildcard in it): for a correlation alert, whose pattern names its own."""
        key = f"{channel}/{name}"
        for pattern, response in self._ordered:
            if ":" not in pattern and pattern.split("/", 1)[0] == channel \
                    and fnmatch.fnmatchcase(key, pattern):
                return response
        return None


def parse_responses(table: object, where: str = "[responses]") -> ResponsePolicy:
    """The ``[responses]`` table of agentd.toml: ``"channel/kind" = "response"``, over
    the defaults.  A bad key or value is a ConfigError naming it."""
    if table is None:
        return ResponsePolicy()
    if not isinstance(table, Mapping):
        raise ConfigError("E_CONFIG", f"{where} must be a table",
                          'write lines like "exec/exec-denied" = "kill"')
    rules = dict(DEFAULT_RULES)
    names = ", ".join(r.value for r in Response)
    for key, value in table.items():
        kind = key.split("/", 1)[-1].split(":")[0] if isinstance(key, str) else ""
        if not isinstance(key, str) or key.count("/") != 1 or key.count(":") > 1 \
                or not key.split("/")[0] or not kind or key.endswith(":"):
            raise ConfigError("E_CONFIG", f"{where}: key {key!r} is not channel/kind",
                              'e.g. "net/scan", "correlation/*" or '
                              '"exec/exec-denied:signature"')
        try:
            rules[key] = Response(value)
        except ValueError:
            raise ConfigError("E_CONFIG", f"{where}: {key} = {value!r} is not a response",
                              f"one of {names}") from None
    return ResponsePolicy(rules)
