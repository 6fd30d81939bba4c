"""The power-cut test's judge (tests/powercut/cutkit.py: check_journal) finds what it must:
an acknowledged fact missing from the journal, a corrupt record before the last complete
one, a hole in the sequence numbers; and accepts what a power cut may legally leave: a
torn tail, any outcome of a request that was in flight."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "powercut"))

from cutkit import check_after_cut, check_journal, runs_in_flight  # noqa: E402

from agent.kernel.journal import encode_record  # noqa: E402

PIN = {"cpu": 200, "memory_high": 18 << 20, "memory_max": 20 << 20}


def cell(name: str, state: str, pid: int | None, pin: Any = None) -> tuple[str, dict[str, Any]]:
    return "cell", {"name": name, "cell": {"state": state}, "pid": pid, "pin": pin}


def image(records: list[tuple[str, dict[str, Any]]], first_seq: int = 1) -> bytes:
    return b"".join(encode_record(t, first_seq + i, 0.0, d) for i, (t, d) in enumerate(records))


def ack(cell: str, op: str, phase: str, reply: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"cell": cell, "op": op, "phase": phase, "reply": reply or {}}


def pin_reply(p: dict[str, int]) -> dict[str, int]:
    return {"cpu_max": p["cpu"], "memory_high": p["memory_high"], "memory_max": p["memory_max"]}


RECS = [cell("a", "admitted", None), cell("a", "running", 41), cell("b", "running", 42),
        cell("a", "running", 41, PIN), cell("b", "stopping", 42), ("cell-gone", {"name": "b"})]
ACKS = [ack("a", "run", "sent"), ack("b", "run", "sent"), ack("a", "run", "ok", {"pid": 41}),
        ack("b", "run", "ok", {"pid": 42}), ack("a", "pin", "sent"),
        ack("a", "pin", "ok", pin_reply(PIN)), ack("b", "stop", "sent"),
        ack("b", "stop", "ok")]


def test_a_journal_that_holds_every_acknowledged_fact_passes() -> None:
    records, torn, facts, problems = check_journal(image(RECS), ACKS)
    assert (records, torn, problems) == (6, 0, []) and facts == 3


def test_a_torn_tail_and_requests_in_flight_are_allowed() -> None:
    blob = image(RECS)
    torn = image([cell("a", "stopping", 41)], first_seq=7)[:-5]  # the cut came mid-write
    acks = [*ACKS, ack("a", "stop", "sent"), ack("c", "run", "sent")]
    records, cut, facts, problems = check_journal(blob + torn, acks)
    assert problems == [] and cut == len(torn) and records == 6
    assert facts == 1  # only b (stopped) is checked: a's stop and c's run were in flight


def test_a_lost_acknowledged_record_is_found() -> None:
    """The journal ends early (records written before the acknowledgement, lost)."""
    for keep, what in ((1, "a: acknowledged running"), (3, "a: acknowledged pin"),
                       (5, "b: acknowledged stopped")):
        _, _, _, problems = check_journal(image(RECS[:keep]), ACKS)
        assert any(p.startswith(what) for p in problems), (keep, problems)


def test_corruption_before_the_end_and_a_hole_in_the_sequence_are_found() -> None:
    blob = bytearray(image(RECS))
    blob[30] ^= 0x40  # inside the first record's payload: a valid one follows
    _, _, _, problems = check_journal(bytes(blob), ACKS)
    assert any("corrupt regions" in p for p in problems), problems
    holey = image(RECS[:2]) + image(RECS[2:], first_seq=5)
    _, _, _, problems = check_journal(holey, ACKS)
    assert any("hole in the sequence" in p for p in problems), problems


BOOT = {"demo-web": {"state": "running"}, "demo-client": {"state": "running"}}


def after(ps: dict[str, Any]) -> dict[str, Any]:
    """A next boot's check report that found the cells ``ps`` (with their objects)."""
    names = sorted(ps)
    return {"settled": True, "journal_at_start": {"skipped_bytes": 0}, "ps": ps,
            "cgroups": names, "netns": [f"cell-{n}" for n in names],
            "journal": {"cells": names, "leases": names, "open_plans": []}}


def test_after_the_cut_only_the_boot_cells_or_a_run_in_flight_may_be_there() -> None:
    acks = [ack("pc-0", "run", "sent"), ack("pc-0", "run", "ok", {"pid": 7}),
            ack("pc-0", "stop", "sent"), ack("pc-0", "stop", "ok"), ack("pc-0", "run", "sent"),
            ack("pc-1", "run", "sent"), ack("pc-1", "run", "ok", {"pid": 8}),
            ack("pc-2", "stop", "sent")]
    assert runs_in_flight(acks) == {"pc-0"}
    assert check_after_cut(after(BOOT), runs_in_flight(acks)) == []
    # pc-0's run was admitted before the cut: the next agentd may carry it out
    carried = after({**BOOT, "pc-0": {"state": "running"}})
    assert check_after_cut(carried, runs_in_flight(acks)) == []
    # pc-1 was running when the power went (acknowledged): it must not come back,
    # nor pc-0 when its run was not in flight
    for ps, in_flight in (({**BOOT, "pc-1": {"state": "running"}}, {"pc-0"}),
                          ({**BOOT, "pc-0": {"state": "running"}}, set())):
        problems = check_after_cut(after(ps), in_flight)
        assert any(p.startswith("cells after the restart") for p in problems), problems
    # a boot-time cell missing is found whatever was in flight
    problems = check_after_cut(after({"demo-web": {"state": "running"}}), {"pc-0"})
    assert any(p.startswith("cells after the restart") for p in problems), problems
