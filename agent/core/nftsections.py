"""A table made of a base and one section per cell, so that a cell coming or going
changes only its own part (pure).

The host's tables (``inet agent_host``, ``bridge agent_l2``) hold rules for every cell.
Rewritten whole at each start and stop, their ``nft`` run grew with the number of cells
(issue 14: about 27 ms per running cell per rewrite in the box).  Built as a
:class:`Sectioned` batch instead, everything that depends on one cell lives in chains that
cell's section owns, reached through named verdict maps whose elements the section adds;
the base (hooks, shared chains, the maps) depends on no cell.  :func:`change` turns the
applied state and the wanted one into one batch: the whole table when the base changed or
the applied state is unknown (agentd's first refresh), else only the sections that
differ: each one removed (its map elements deleted, its chains flushed and deleted) and
added again, in one transaction, so a section is never seen half made.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.core.nftjson import Batch, Json, batch_json, delete_table

__all__ = ["UNKNOWN", "Applied", "SectionCache", "Sectioned", "change"]


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()  # what the kernel holds is not known: replace the table whole


@dataclass
class _Section:
    cmds: list[Json] = field(default_factory=list)  # add chain / rule / element, in order
    _text: str = ""

    def text(self) -> str:  # made once: a section is not changed after it is built
        if not self._text:
            self._text = batch_json(self.cmds)
        return self._text


SectionCache = dict[Any, _Section]


class Sectioned(Batch):
    """A :class:`Batch` whose commands made inside ``with b.section(name):`` belong to
    that section.  A section must add only chains it owns, rules in those chains, and
    elements of the base's maps; the base must not name a section's chain."""

    def __init__(self, family: str, table: str) -> None:
        super().__init__(family, table)
        self.sections: dict[str, _Section] = {}
        self._into: list[Json] = self.cmds
        self._used: SectionCache = {}  # key -> section, of this build (:meth:`cached`)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        assert self._into is self.cmds, "sections do not nest"
        self._into = self.sections.setdefault(name, _Section()).cmds
        try:
            yield
        finally:
            self._into = self.cmds

    def _add(self, cmd: Json) -> None:
        self._into.append(cmd)

    def cached(self, name: str, key: Any, cache: SectionCache | None,
               build: Callable[[], None]) -> None:
        """Section ``name`` as ``build`` makes it, or as it was made for the same
        ``key`` (everything the section depends on) by an earlier build with ``cache``:
        the cost of a table then grows with the cells that changed, not with all of
        them.  :meth:`keep` then leaves this build's sections as the next cache."""
        hit = None if cache is None else cache.get(key)
        if hit is not None:
            self.sections[name] = hit
        else:
            with self.section(name):
                build()
        self._used[key] = self.sections[name]

    def keep(self, cache: SectionCache | None) -> Sectioned:
        """``cache`` holds this build's sections only (no cell that is gone)."""
        if cache is not None:
            cache.clear()
            cache.update(self._used)
        return self

    def verdict_map(self, name: str, key_type: str | list[str]) -> None:
        self._add({"add": {"map": {"family": self.family, "table": self.table,
                                   "name": name, "type": key_type, "map": "verdict"}}})

    def element(self, map_name: str, key: Any, verdict: Json) -> None:
        self._add({"add": {"element": {"family": self.family, "table": self.table,
                                       "name": map_name, "elem": [[key, verdict]]}}})

    def full(self) -> list[Json]:
        """The batch that replaces the table whole (base, then sections by name)."""
        return [*self.cmds, *(c for _, s in sorted(self.sections.items()) for c in s.cmds)]

    def base_text(self) -> str:
        return batch_json(self.cmds)

    def texts(self) -> dict[str, str]:
        return {name: s.text() for name, s in self.sections.items()}

    def removal(self, name: str) -> list[Json]:
        """Commands that take section ``name`` out: its elements, then its chains (all
        flushed before any is deleted: one may jump to another)."""
        out: list[Json] = []
        chains: list[Json] = []
        for cmd in self.sections[name].cmds:
            (what, obj), = cmd["add"].items()
            if what == "element":
                out.append({"delete": {"element": {
                    **{k: obj[k] for k in ("family", "table", "name")},
                    "elem": [key for key, _ in obj["elem"]]}}})
            elif what == "chain":
                chains.append({k: obj[k] for k in ("family", "table", "name")})
        out += [{"flush": {"chain": dict(c)}} for c in chains]
        out += [{"delete": {"chain": dict(c)}} for c in chains]
        return out


Applied = Sectioned | None | _Unknown  # None: known absent


def change(old: Applied, new: Sectioned | None, family: str, table: str) -> list[Json]:
    """The batch that takes the kernel from ``old`` to ``new`` (None: no table); empty
    when nothing is to be done."""
    if new is None:
        return [] if old is None else delete_table(table, family)
    if not isinstance(old, Sectioned) or old.base_text() != new.base_text():
        return new.full()
    was: Mapping[str, str] = old.texts()
    now = new.texts()
    gone = sorted(n for n in was if now.get(n) is not was[n] and now.get(n) != was[n])
    come = sorted(n for n in now if was.get(n) is not now[n] and was.get(n) != now[n])
    out: list[Json] = [c for n in gone for c in old.removal(n)]
    return out + [c for n in come for c in new.sections[n].cmds]
