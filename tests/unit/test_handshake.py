"""The spawn handshake (agent.core.handshake): messages, the table, the doc's diagram.

The kernel side (a real child going through every step) is tests/privileged/test_spawn.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.handshake import (
    TRANSITIONS,
    HandshakeError,
    Line,
    Msg,
    Phase,
    decode,
    encode,
    next_phase,
    render_mermaid,
)

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {Msg.USERNS: (), Msg.PID: ("4242",), Msg.CGROUP: (), Msg.EXEC: (),
          Msg.FAILED: ("mount(tmpfs)", "/img/tmp", "2"), Msg.TRACE: ("mounts", "123")}


@pytest.mark.parametrize("msg", list(Msg))
def test_every_message_round_trips(msg: Msg) -> None:
    raw = encode(msg, *FIELDS[msg])
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert decode(raw[:-1]) == Line(msg, FIELDS[msg])


def test_a_path_with_tabs_and_newlines_stays_one_line() -> None:
    raw = encode(Msg.FAILED, "mount", "/a\tb\nc", 13)
    assert raw.count(b"\n") == 1 and decode(raw[:-1]).fields == ("mount", "/a b c", "13")


def test_a_wrong_field_count_is_refused_on_both_sides() -> None:
    with pytest.raises(ValueError):
        encode(Msg.PID)
    with pytest.raises(HandshakeError) as info:
        decode(b"P", Phase.STARTED)
    assert info.value.code == "E_SPAWN_PROTOCOL" and "PID with 0 fields" in info.value.message


@given(st.binary(max_size=64))
def test_random_bytes_decode_or_are_refused_cleanly(raw: bytes) -> None:
    try:
        line = decode(raw.replace(b"\n", b""))
    except HandshakeError:
        return
    assert isinstance(line.msg, Msg)


# The sequences a real child sends: with and without a user namespace and a cgroup,
# and pid 1 asking for its cgroup before the intermediate reported its pid.
GOOD = [
    [Msg.PID, Msg.EXEC],
    [Msg.USERNS, Msg.PID, Msg.CGROUP, Msg.EXEC],
    [Msg.USERNS, Msg.CGROUP, Msg.PID, Msg.EXEC],
    [Msg.TRACE, Msg.USERNS, Msg.TRACE, Msg.PID, Msg.TRACE, Msg.CGROUP, Msg.TRACE, Msg.EXEC],
    [Msg.USERNS, Msg.PID, Msg.CGROUP, Msg.FAILED],
    [Msg.PID, Msg.EXEC, Msg.FAILED],  # every execve path failed
    # no cgroup: pid 1 may exec before the intermediate reports its pid (seen on a
    # loaded machine: test_spawn failed with "EXEC not expected in phase started")
    [Msg.USERNS, Msg.EXEC, Msg.PID],
    [Msg.EXEC, Msg.TRACE, Msg.PID],
    [Msg.EXEC, Msg.FAILED, Msg.PID],
    [Msg.FAILED, Msg.TRACE, Msg.FAILED],  # only the first failure counts
]


@pytest.mark.parametrize("seq", GOOD)
def test_what_a_child_sends_is_accepted(seq: list[Msg]) -> None:
    phase = Phase.STARTED
    for msg in seq:
        phase = next_phase(phase, msg)
    assert phase in (Phase.READY, Phase.FAILED)


@pytest.mark.parametrize("seq", [
    [Msg.EXEC, Msg.EXEC],             # two execs
    [Msg.EXEC, Msg.CGROUP],           # the cgroup asked for after exec
    [Msg.PID, Msg.PID],               # two pid 1s
    [Msg.PID, Msg.USERNS],            # maps asked for after the fork
    [Msg.PID, Msg.CGROUP, Msg.CGROUP],
    [Msg.PID, Msg.EXEC, Msg.CGROUP],
])
def test_an_out_of_order_message_is_a_protocol_error(seq: list[Msg]) -> None:
    phase = Phase.STARTED
    with pytest.raises(HandshakeError) as info:
        for msg in seq:
            phase = next_phase(phase, msg)
    assert "not expected" in info.value.message and "accepts" in (info.value.hint or "")


def test_every_phase_is_reachable() -> None:
    reached = {Phase.STARTED} | set(TRANSITIONS.values())
    assert reached == set(Phase)


def test_docs_draw_the_handshake_table() -> None:
    doc = (ROOT / "docs/sandbox.md").read_text()
    assert render_mermaid() in doc, (
        "docs/sandbox.md is stale: paste the output of `python -m agent.core.handshake`")
