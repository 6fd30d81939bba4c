"""The tuner's memory lowering: one state machine, one table (pure).

A memory lowering goes in two phases, is watched, and is rolled back on trouble
(docs/tuner.md has the reasons)::

    STEADY --lower-high--> RECLAIMING --reclaimed--> WATCHING --expire--> STEADY
                           RECLAIMING --give-up / trouble--> COOLDOWN --expire--> STEADY
                                        WATCHING --trouble--> COOLDOWN

* RECLAIMING: ``memory.high`` was lowered; ``memory.max`` follows once a sample shows
  the kernel reclaimed down to it (:class:`PendingLower` holds what to restore).
* WATCHING: ``memory.max`` was lowered; memory trouble before ``Watch.until`` rolls both
  limits back (:class:`Watch` holds the previous values).
* COOLDOWN: after a rollback or an abandoned phase 1, nothing is lowered before
  ``cooldown_until``.
* An operator's pin ends a lowering in flight (the pinned size replaces it).

:data:`TRANSITIONS` is the whole machine: :meth:`Lowering.step` refuses any pair it does
not hold with :class:`LoweringError` and leaves the (frozen) record as it was.
docs/tuner.md embeds the diagram :func:`render_mermaid` draws from the table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from agent.core.errors import TransitionError

__all__ = ["TRANSITIONS", "Lowering", "LoweringError", "PendingLower", "Phase", "Step",
           "Watch", "render_mermaid"]


class Phase(enum.Enum):
    STEADY = "steady"            # no lowering in flight
    RECLAIMING = "reclaiming"    # phase 1: memory.high lowered, waiting for the kernel
    WATCHING = "watching"        # phase 2 done: memory.max lowered, trouble rolls back
    COOLDOWN = "cooldown"        # after a rollback or abandon: no lowering for a while


class Step(enum.Enum):
    LOWER_HIGH = "lower-high"    # idle long enough: memory.high goes down (phase 1)
    WAIT = "wait"                # a sample above the lowered memory.high: wait longer
    RECLAIMED = "reclaimed"      # the kernel reclaimed: memory.max goes down (phase 2)
    GIVE_UP = "give-up"          # not reclaimed in time: restore, cool down
    TROUBLE = "trouble"          # memory trouble while lowering: restore, cool down
    EXPIRE = "expire"            # time passed: a watch or a cooldown ends
    PIN = "pin"                  # an operator's pin replaces the lowering in flight


S, T = Phase, Step
TRANSITIONS: dict[tuple[Phase, Step], Phase] = {
    (S.STEADY, T.LOWER_HIGH): S.RECLAIMING,
    (S.STEADY, T.PIN): S.STEADY,
    (S.RECLAIMING, T.WAIT): S.RECLAIMING,
    (S.RECLAIMING, T.RECLAIMED): S.WATCHING,
    (S.RECLAIMING, T.GIVE_UP): S.COOLDOWN,
    (S.RECLAIMING, T.TROUBLE): S.COOLDOWN,
    (S.RECLAIMING, T.PIN): S.STEADY,
    (S.WATCHING, T.TROUBLE): S.COOLDOWN,
    (S.WATCHING, T.EXPIRE): S.STEADY,
    (S.WATCHING, T.PIN): S.STEADY,
    (S.COOLDOWN, T.EXPIRE): S.STEADY,
    (S.COOLDOWN, T.PIN): S.COOLDOWN,
}


class LoweringError(TransitionError):
    """A step the lowering's phase does not accept (code ``E_STATE``)."""

    def __init__(self, cell: str, phase: Phase, step: Step) -> None:
        self.phase = phase
        self.step = step
        super().__init__(f"cell {cell}", f"lowering step {step.value}", f"phase {phase.value}",
                         (s.value for (p, s) in TRANSITIONS if p is phase))


@dataclass(frozen=True)
class PendingLower:
    """Phase 1 of a memory lowering: ``memory.high`` is lowered, ``memory.max`` not yet."""

    prev_high: int
    prev_max: int
    new_max: int
    samples: int = 0


@dataclass(frozen=True)
class Watch:
    """After ``memory.max`` was lowered: trouble before ``until`` restores ``prev``."""

    prev_high: int
    prev_max: int
    until: float


@dataclass(frozen=True)
class Lowering:
    """Where a cell's memory lowering is.  ``pending`` is set exactly in RECLAIMING,
    ``watch`` exactly in WATCHING; ``cooldown_until`` is the end of the last cooldown."""

    phase: Phase = Phase.STEADY
    pending: PendingLower | None = None
    watch: Watch | None = None
    cooldown_until: float = float("-inf")

    def step(self, cell: str, step: Step, *, pending: PendingLower | None = None,
             watch: Watch | None = None, cooldown_until: float | None = None) -> Lowering:
        """The record after ``step`` (with the data its target phase holds); raises
        :class:`LoweringError` for a pair not in :data:`TRANSITIONS`."""
        target = TRANSITIONS.get((self.phase, step))
        if target is None:
            raise LoweringError(cell, self.phase, step)
        if target is Phase.RECLAIMING and pending is None:
            pending = self.pending
        if (target is Phase.RECLAIMING) != (pending is not None) or (
                target is Phase.WATCHING) != (watch is not None):
            raise ValueError(f"{step.value} to {target.value}: pending/watch do not match")
        return replace(self, phase=target, pending=pending, watch=watch,
                       cooldown_until=self.cooldown_until if cooldown_until is None
                       else cooldown_until)

    def expire(self, cell: str, now: float) -> Lowering:
        """A watch past its end, or a cooldown past its end, is over."""
        if ((self.phase is Phase.WATCHING and self.watch is not None and now > self.watch.until)
                or (self.phase is Phase.COOLDOWN and now >= self.cooldown_until)):
            return self.step(cell, Step.EXPIRE)
        return self

    def in_flight(self, now: float) -> bool:
        """A lowering that may still be rolled back (phase 1, or a watch not over)."""
        return self.phase is Phase.RECLAIMING or (
            self.phase is Phase.WATCHING and self.watch is not None and now <= self.watch.until)


def render_mermaid() -> str:
    """The table as a Mermaid ``stateDiagram-v2`` (embedded in docs/tuner.md)."""
    lines = ["stateDiagram-v2", f"    [*] --> {S.STEADY.name}"]
    lines += [f"    {a.name} --> {b.name}: {s.value}" for (a, s), b in TRANSITIONS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m agent.core.lowering
    print(render_mermaid(), end="")
