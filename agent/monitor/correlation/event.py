"""What the engine reads of an event, and a plain record that has it.

The engine does not depend on :class:`agent.core.events.Event`: it reads any object
with the fields of :class:`EventLike` (docs/events.md describes each).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["EventLike", "Record"]


class EventLike(Protocol):
    """What the engine reads of an event (agent.core.events.Event will carry seq/mono)."""

    @property
    def seq(self) -> int: ...  # per-boot sequence number: arrival order
    @property
    def mono(self) -> float: ...  # monotonic seconds: spans and windows use only this
    @property
    def ts(self) -> float: ...  # wall clock, for people (it can be set)
    @property
    def cell(self) -> str | None: ...  # None: the host (the agent, the kernel)
    @property
    def channel(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def severity(self) -> str: ...
    @property
    def attrs(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Record:
    """A plain event record with everything :class:`EventLike` asks for."""

    seq: int
    mono: float
    ts: float
    cell: str | None
    channel: str
    kind: str
    attrs: Mapping[str, Any] = field(default_factory=dict)
    severity: str = "info"
