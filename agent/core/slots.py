"""Which user-namespace slot each service holds: a cell's uid/gid range follows its
service name, not the order in which cells were created (pure).

Slot *n* maps the cell's ids 0..uid_size-1 to ``uid_base + n * uid_size`` onwards
(:meth:`agent.core.config.AgentConfig.uid_range`).  The files in a service's data dir
are owned by ids of that range, so the range must stay the service's own across cell
restarts and agentd restarts in any order, and two services must never share one.

The rules (docs/data-dirs.md has the reasoning):

* A name gets a slot once and keeps it: :meth:`SlotTable.assign` returns the slot the
  name already holds.  A new name starts probing at :func:`preferred` (a hash of the
  name), so a name lands on the same slot on any box where nothing collides, and the
  first free slot from there is taken.
* One slot, one name: assigning a slot to a name takes it from whoever held it, in
  the same journal record (``slot {name, slot}``: the last record for a slot or a name
  wins on replay), so no replay can give two names one range.
* A slot is only taken from a name that holds nothing: no journaled cell and no data
  image (the caller passes those names as ``keep``).  When every slot is held by such
  a name the request is refused (``E_USERNS_FULL``), never served with a shared range.
* The table is journaled beside the cells (``slot`` records, written back by the
  compaction snapshot); journals without ``slot`` records fall back to the ``slot``
  field of each ``cell`` record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.errors import RefusedError

__all__ = ["SLOT_RECORD", "SlotTable", "preferred"]

SLOT_RECORD = "slot"


def preferred(name: str, capacity: int) -> int:
    """Where ``name`` starts probing: the same slot for the same name on every box."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % capacity


@dataclass
class SlotTable:
    """name <-> slot, a bijection over ``0 .. capacity-1``."""

    capacity: int
    by_name: dict[str, int] = field(default_factory=dict)
    by_slot: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError("a slot table needs at least one slot")

    # ----------------------------------------------------------------- journal
    @classmethod
    def from_records(cls, capacity: int, records: Iterable[Any]) -> SlotTable:
        """Fold ``slot`` records (the last for a slot or a name wins); a ``cell`` record's
        ``slot`` counts for a name no ``slot`` record names (older journals).  Records
        naming a slot outside the table (``userns.slots`` was lowered) are dropped: that
        name gets a new slot, and its data dir's owner is shifted on its next mount."""
        table = cls(capacity)
        from_cells: dict[str, int] = {}
        for rec in records:
            d = rec.data
            name, slot = d.get("name"), d.get("slot")
            if not isinstance(name, str) or isinstance(slot, bool) or not isinstance(slot, int):
                continue
            if rec.t == SLOT_RECORD:
                table._put(name, slot)
            elif rec.t == "cell":
                from_cells[name] = slot
        for name, slot in from_cells.items():
            if name not in table.by_name and slot not in table.by_slot:
                table._put(name, slot)
        return table

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        """The table as journal records (for the compaction snapshot)."""
        return [(SLOT_RECORD, {"name": n, "slot": s}) for s, n in sorted(self.by_slot.items())]

    def copy(self) -> SlotTable:
        return SlotTable(self.capacity, dict(self.by_name), dict(self.by_slot))

    def _put(self, name: str, slot: int) -> None:
        if not 0 <= slot < self.capacity:
            self.by_name.pop(name, None)  # (an old slot of the name stays free below)
            return
        old_slot = self.by_name.pop(name, None)
        if old_slot is not None:
            self.by_slot.pop(old_slot, None)
        old_name = self.by_slot.pop(slot, None)
        if old_name is not None:
            self.by_name.pop(old_name, None)
        self.by_name[name] = slot
        self.by_slot[slot] = name

    # ----------------------------------------------------------------- decisions
    def slot_of(self, name: str) -> int | None:
        return self.by_name.get(name)

    def assign(self, name: str, keep: Collection[str] = ()) -> tuple[int, dict[str, Any] | None]:
        """The slot of ``name`` and the record to journal (None: it held it already).

        ``keep``: names that hold something owned by their range (a journaled cell, a
        data image); their slots are never taken.  Raises ``E_USERNS_FULL`` when every
        slot is held by a name in ``keep``."""
        own = self.by_name.get(name)
        if own is not None:
            return own, None
        start = preferred(name, self.capacity)
        order = [(start + i) % self.capacity for i in range(self.capacity)]
        slot = next((s for s in order if s not in self.by_slot), None)
        if slot is None:  # full: the first slot whose holder holds nothing
            slot = next((s for s in order if self.by_slot[s] not in keep), None)
        if slot is None:
            raise RefusedError(
                "E_USERNS_FULL", f"service {name}: all {self.capacity} user-namespace uid "
                "ranges are held by services with a cell or a data dir",
                "raise userns.slots in agentd.toml, or remove the data image of a "
                "retired service (docs/data-dirs.md)")
        self._put(name, slot)
        return slot, {"name": name, "slot": slot}

    def holders(self) -> Mapping[int, str]:
        return dict(self.by_slot)
