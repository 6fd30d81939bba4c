"""A partial match: one state machine, one table (pure).

A partial match is a pattern begun: the events bound to its first steps, the step it
awaits, and, while it awaits a counting step, the window of what it counted::

    NEW --start--> WAITING | COUNTING             (NEW --last--> MATCHED: one step)
    WAITING  --step--> WAITING | COUNTING         (the next step counts or not)
    COUNTING --counted--> COUNTING --step--> WAITING | COUNTING
    WAITING | COUNTING --last--> MATCHED
    WAITING | COUNTING --span / until / cap / swap--> EXPIRED / CANCELLED / EVICTED / RETIRED
    WAITING --same--> MERGED

A first step that counts is a COUNTING partial too, one per group of its ``per``
attributes: the window before the match really begins.  ``same`` is the engine's
bound on duplicates: a newer partial awaiting the same step with the same values for
everything later steps look at makes an older one useless (docs/patterns.md).

:data:`TRANSITIONS` is the whole machine: :meth:`Partial.to` refuses any pair it does not
hold with :class:`PartialError` and leaves the phase as it was.  docs/patterns.md embeds
the diagram :func:`render_mermaid` draws from the table.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from agent.core.errors import TransitionError

__all__ = ["TRANSITIONS", "Choice", "Input", "Partial", "PartialError", "Phase",
           "render_mermaid"]


class Phase(enum.StrEnum):  # a str: hashed in C (the table is looked up per step)
    NEW = "new"              # not yet placed (the first event just came)
    WAITING = "waiting"      # awaits the event of a plain step
    COUNTING = "counting"    # a counting step's window is open
    MATCHED = "matched"      # the last step completed (reported, or shadowed by a later
    #                          start completed by the same event)
    EXPIRED = "expired"      # the span passed (a first step's window: it emptied)
    CANCELLED = "cancelled"  # an until event came
    EVICTED = "evicted"      # over the bound of its pattern or cell: oldest first
    MERGED = "merged"        # a partial with a later start and the same keys replaced it
    RETIRED = "retired"      # its pattern changed or left the library (swap)


class Input(enum.StrEnum):
    START = "start"      # the first event: placed at step 1 (or the first step's window)
    STEP = "step"        # an event completed the awaited step, not the last
    COUNTED = "counted"  # an event counted, the count is not reached
    LAST = "last"        # an event completed the last step
    SPAN = "span"        # the pattern's span (a first step's window) passed
    UNTIL = "until"      # an until clause's event
    CAP = "cap"          # its pattern or cell holds too many partials
    SAME = "same"        # a duplicate with a later start awaits the same step
    SWAP = "swap"        # the pattern is no longer loaded as it was


@dataclass(frozen=True)
class Choice:
    """A transition whose target depends on whether the step now awaited counts."""

    rule: str
    plain: Phase
    counting: Phase

    @property
    def targets(self) -> tuple[Phase, ...]:
        return (self.plain, self.counting)


P, In = Phase, Input
_NEXT = Choice("the awaited step counts", P.WAITING, P.COUNTING)
_LIVE_ENDS = {In.SPAN: P.EXPIRED, In.UNTIL: P.CANCELLED, In.CAP: P.EVICTED,
              In.SWAP: P.RETIRED}

TRANSITIONS: dict[tuple[Phase, Input], Phase | Choice] = {
    (P.NEW, In.START): _NEXT,
    (P.NEW, In.LAST): P.MATCHED,  # a one-step pattern
    (P.WAITING, In.STEP): _NEXT,
    (P.WAITING, In.LAST): P.MATCHED,
    (P.WAITING, In.SAME): P.MERGED,
    **{(P.WAITING, i): t for i, t in _LIVE_ENDS.items()},
    (P.COUNTING, In.COUNTED): P.COUNTING,
    (P.COUNTING, In.STEP): _NEXT,
    (P.COUNTING, In.LAST): P.MATCHED,
    **{(P.COUNTING, i): t for i, t in _LIVE_ENDS.items()},
}
LIVE = frozenset({P.WAITING, P.COUNTING})


class PartialError(TransitionError):
    """An input the partial's phase does not accept (code ``E_STATE``)."""

    def __init__(self, pattern: str, phase: Phase, inp: Input) -> None:
        self.phase = phase
        self.input = inp
        super().__init__(f"partial match of {pattern}", f"input {inp.value}",
                         f"phase {phase.value}",
                         (i.value for (p, i) in TRANSITIONS if p is phase))


class Partial:
    """One partial match of a pattern (the engine owns it; see the module doc)."""

    __slots__ = ("binds", "cell", "ident", "infos", "key", "pattern", "phase", "sig",
                 "start_mono", "start_seq", "step", "want", "window")

    def __init__(self, pattern: str, ident: int, steps: int, cell: str | None) -> None:
        self.pattern = pattern
        self.ident = ident  # creation order: the oldest is evicted first
        self.cell = cell  # the first event's cell: the bound per cell
        self.phase = Phase.NEW
        self.step = 0  # the index of the step awaited
        self.binds: list[Any] = [None] * steps  # the event bound to each step
        # (count, first mono, distinct values) of each counting step completed
        self.infos: list[tuple[int, float, tuple[Any, ...]] | None] = [None] * steps
        self.start_mono = 0.0
        self.start_seq = 0
        self.want: tuple[Any, ...] = ()  # the bound values the awaited step compares with
        self.key: Any = None  # its bucket in the awaited step's index
        self.sig: tuple[Any, ...] | None = None  # what later steps look at (duplicates)
        # a counting step's window: value -> (mono, original) for distinct counts, else
        # the monotonic times of the events counted
        self.window: OrderedDict[Any, tuple[float, Any]] | deque[float] | None = None

    def to(self, inp: Input, counting: bool = False) -> Phase:
        """Apply ``inp``; ``counting``: the step awaited next counts (for a Choice)."""
        rule = TRANSITIONS.get((self.phase, inp))
        if rule is None:
            raise PartialError(self.pattern, self.phase, inp)
        self.phase = rule if isinstance(rule, Phase) else (
            rule.counting if counting else rule.plain)
        return self.phase

    def __repr__(self) -> str:
        return (f"Partial({self.pattern} #{self.ident} {self.phase.name} step {self.step} "
                f"cell {self.cell})")


def render_mermaid() -> str:
    """The table as a Mermaid ``stateDiagram-v2`` (embedded in docs/patterns.md)."""
    lines = ["stateDiagram-v2", f"    [*] --> {P.NEW.name}"]
    for (a, i), rule in TRANSITIONS.items():
        if isinstance(rule, Choice):
            lines += [f"    {a.name} --> {t.name}: {i.value} ({rule.rule}: "
                      f"{'yes' if t is rule.counting else 'no'})" for t in rule.targets]
        else:
            lines.append(f"    {a.name} --> {rule.name}: {i.value}")
    ends = [p for p in Phase if p not in LIVE and p is not P.NEW]
    lines += [f"    {p.name} --> [*]" for p in ends]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m agent.monitor.correlation.partial
    print(render_mermaid(), end="")
