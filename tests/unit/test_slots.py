"""The user-namespace slot table (agent.core.slots): a service keeps its uid range across
restarts in any order, two services never share one, and a full table refuses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.config import AgentConfig
from agent.core.errors import ConfigError, RefusedError
from agent.core.slots import SLOT_RECORD, SlotTable, preferred


@dataclass(frozen=True)
class Rec:
    t: str
    data: dict[str, Any]


def bijective(t: SlotTable) -> None:
    assert len(t.by_name) == len(t.by_slot)
    assert all(t.by_slot[s] == n for n, s in t.by_name.items())
    assert all(0 <= s < t.capacity for s in t.by_slot)


def test_a_name_keeps_its_slot_and_journals_it_once() -> None:
    t = SlotTable(64)
    slot, rec = t.assign("demo-web")
    assert rec == {"name": "demo-web", "slot": slot} and slot == preferred("demo-web", 64)
    assert t.assign("demo-web") == (slot, None)
    assert t.records() == [(SLOT_RECORD, {"name": "demo-web", "slot": slot})]


def test_the_preferred_slot_is_the_same_on_every_box_and_spread() -> None:
    assert preferred("demo-web", 1024) == preferred("demo-web", 1024)
    spread = {preferred(f"svc-{i}", 1024) for i in range(200)}
    assert len(spread) > 150  # a hash, not an order


def test_collisions_probe_to_the_next_free_slot() -> None:
    t = SlotTable(4)
    names = [f"n{i}" for i in range(4)]
    got = [t.assign(n)[0] for n in names]
    assert sorted(got) == [0, 1, 2, 3]
    bijective(t)


def test_a_full_table_refuses_and_changes_nothing() -> None:
    t = SlotTable(3)
    for n in ("a", "b", "c"):
        t.assign(n)
    before = t.copy()
    with pytest.raises(RefusedError) as ei:
        t.assign("d", keep={"a", "b", "c"})
    assert ei.value.code == "E_USERNS_FULL" and "all 3" in ei.value.message
    assert ei.value.hint is not None and "userns.slots" in ei.value.hint
    assert t == before


def test_a_full_table_takes_the_slot_of_a_name_that_holds_nothing() -> None:
    t = SlotTable(3)
    slots = {n: t.assign(n)[0] for n in ("a", "b", "c")}
    slot, rec = t.assign("d", keep={"a", "c"})  # b has no cell and no data image
    assert slot == slots["b"] and rec == {"name": "d", "slot": slot}
    assert t.slot_of("b") is None and t.slot_of("d") == slot
    bijective(t)
    # the one record says it all: replayed, b has lost the slot to d
    records = [Rec(SLOT_RECORD, {"name": n, "slot": s}) for n, s in slots.items()]
    records.append(Rec(SLOT_RECORD, rec))
    assert SlotTable.from_records(3, records) == t


def test_replay_takes_cell_records_of_older_journals_and_drops_slots_out_of_range() -> None:
    recs = [Rec("cell", {"name": "old", "slot": 2}),  # a journal before slot records
            Rec(SLOT_RECORD, {"name": "new", "slot": 1}),
            Rec("cell", {"name": "clash", "slot": 1}),  # slot 1 is new's: not taken
            Rec(SLOT_RECORD, {"name": "far", "slot": 9}),  # userns.slots was lowered
            Rec(SLOT_RECORD, {"name": "bad", "slot": True}),
            Rec("lease", {"name": "x", "slot": 0})]
    t = SlotTable.from_records(4, recs)
    assert t.by_name == {"old": 2, "new": 1}
    bijective(t)


def test_uid_range_refuses_a_slot_outside_the_table() -> None:
    cfg = AgentConfig(uid_slots=4)
    assert cfg.uid_range(3) == (100_000 + 3 * 65536, 65536)
    with pytest.raises(ConfigError, match="slots"):
        cfg.uid_range(4)


# -- properties ---------------------------------------------------------------------------

NAMES = [f"svc-{c}" for c in "abcdefgh"]
# ("run"|"stop"|"data"|"drop-data"|"restart", name index)
EVENTS = st.lists(st.tuples(st.sampled_from(["run", "stop", "data", "drop-data", "restart"]),
                            st.integers(0, len(NAMES) - 1)), max_size=60)


class Box:
    """The manager's use of the table: a journal of slot records, cells and data images;
    an agentd restart replays the journal (sometimes a compacted one)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.journal: list[Rec] = []
        self.table = SlotTable(capacity)
        self.cells: set[str] = set()
        self.data: set[str] = set()
        self.held: dict[str, int] = {}  # names with data: the slot they must keep

    def run(self, name: str) -> int | None:
        try:
            slot, rec = self.table.assign(name, keep=self.cells | self.data)
        except RefusedError:
            return None
        if rec is not None:
            self.journal.append(Rec(SLOT_RECORD, rec))
        self.cells.add(name)
        return slot

    def restart(self, compact: bool) -> None:
        if compact:
            self.journal = [Rec(t, d) for t, d in self.table.records()]
        self.table = SlotTable.from_records(self.capacity, self.journal)


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, capacity=st.integers(1, 10), compact=st.booleans())
def test_ranges_follow_names_across_any_order_of_runs_and_restarts(
        events: Iterable[tuple[str, int]], capacity: int, compact: bool) -> None:
    box = Box(capacity)
    for kind, i in events:
        name = NAMES[i]
        if kind == "run" and name not in box.cells:
            slot = box.run(name)
            if slot is None:  # refused only when every slot holds a cell or data
                assert len(box.table.by_slot) == capacity
                assert set(box.table.by_name) <= box.cells | box.data
                continue
            if name in box.held:
                assert slot == box.held[name], "a service with data lost its uid range"
            if name in box.data:
                box.held[name] = slot
        elif kind == "stop":
            box.cells.discard(name)
        elif kind == "data" and name in box.cells:  # its first run made the image
            box.data.add(name)
            box.held[name] = box.table.by_name[name]
        elif kind == "drop-data" and name not in box.cells:  # an operator removed it
            box.data.discard(name)
            box.held.pop(name, None)
        elif kind == "restart":
            before = box.table.copy()
            box.restart(compact)
            assert box.table == before, "the journal did not give back the same table"
        bijective(box.table)
        for n in box.cells | box.data:  # whatever holds something keeps its slot
            assert box.table.slot_of(n) is not None
        for n, s in box.held.items():
            assert box.table.slot_of(n) == s


@settings(max_examples=100, deadline=None)
@given(order=st.permutations(NAMES), again=st.permutations(NAMES))
def test_restarting_in_another_order_gives_every_name_its_range_back(
        order: list[str], again: list[str]) -> None:
    box = Box(1024)
    first = {n: box.run(n) for n in order}
    box.cells.clear()  # every cell stopped; the box (and agentd) restarts
    box.restart(compact=False)
    second = {n: box.run(n) for n in again}
    assert first == second and len(set(first.values())) == len(NAMES)
