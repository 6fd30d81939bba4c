"""agent.core.responses: which response an event calls for, and the [responses] table."""

from __future__ import annotations

import pytest

from agent.core.errors import ConfigError
from agent.core.responses import Response, ResponsePolicy, parse_responses


def test_defaults_record_everything_but_a_signature_match() -> None:
    p = ResponsePolicy()
    assert p.decide("web", "net", "scan") is Response.RECORD
    assert p.decide("web", "exec", "exec-denied", "unsealed") is Response.RECORD
    assert p.decide("web", "exec", "exec-denied", "signature") is Response.KILL
    assert p.decide(None, "exec", "exec-denied", "signature") is Response.RECORD  # host


def test_the_most_specific_rule_wins() -> None:
    p = parse_responses({"net/*": "isolate", "net/scan": "freeze", "*/*": "record",
                         "correlation/*": "stop", "exec/exec-denied": "kill",
                         "exec/exec-denied:memfd": "stop"})
    assert p.decide("a", "net", "scan") is Response.FREEZE
    assert p.decide("a", "net", "l2-drop") is Response.ISOLATE
    assert p.decide("a", "correlation", "alert") is Response.STOP
    assert p.decide("a", "exec", "exec-denied", "memfd") is Response.STOP
    assert p.decide("a", "exec", "exec-denied", "changed") is Response.KILL
    assert p.decide("a", "exec", "exec-denied", "signature") is Response.KILL  # default kept
    assert p.decide("a", "syscall", "trap") is Response.RECORD


@pytest.mark.parametrize("table, what", [
    ([1], "must be a table"), ({"scan": "kill"}, "not channel/kind"),
    ({"/scan": "kill"}, "not channel/kind"), ({"net/": "kill"}, "not channel/kind"),
    ({"net/scan:": "kill"}, "not channel/kind"), ({"net/scan": "nuke"}, "not a response"),
])
def test_bad_tables_are_named(table: object, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_responses(table)
    assert what in info.value.message and info.value.hint


def test_override_is_a_rule_of_that_channel_only() -> None:
    p = parse_responses({"correlation/escapes-*": "record", "correlation/memfd-across-cells":
                         "stop", "*/*": "kill", "corr*/*": "isolate"})
    assert p.override("correlation", "escapes-across-cells") is Response.RECORD
    assert p.override("correlation", "memfd-across-cells") is Response.STOP  # exact first
    assert p.override("correlation", "shared-drop-exec") is None  # the pattern's own
    assert ResponsePolicy().override("correlation", "anything") is None  # defaults: none
    assert parse_responses({"correlation/*": "freeze"}).override(
        "correlation", "x") is Response.FREEZE
