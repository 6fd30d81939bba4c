"""Decoding of configuration values: sizes, CPU amounts, durations, typed TOML tables.

Pure functions, no I/O.  Every unit parser accepts either a TOML integer or a
string and returns an ``int`` in a fixed base unit:

* sizes      -> bytes      (``"64M"``, ``"64MiB"``, ``"512K"``, ``"1G"``, ``1048576``);
  suffixes are binary (K = KiB = 1024), as in cgroupfs and systemd;
* CPU        -> millicpu   (``"0.5"``, ``2``, ``"150%"``, ``"250m"``);
* durations  -> milliseconds (``"5s"``, ``"200ms"``, ``"2m"``, ``"1h"``; a bare
  integer is seconds).

The ``format_*`` functions produce the shortest exact string, and
``parse_x(format_x(n)) == n`` for every value in range.

:class:`TableReader` decodes one TOML table against a fixed schema: it tracks the
keys it consumed, reports unknown keys with a ``difflib`` suggestion, names the
full key path, the expected and the actual type, and collects every problem
instead of stopping at the first.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from agent.core.errors import ConfigError

__all__ = [
    "MAX_CPU",
    "MAX_DURATION_MS",
    "MAX_SIZE",
    "ConfigProblems",
    "Problem",
    "TableReader",
    "UnitError",
    "format_cpu",
    "format_duration",
    "format_size",
    "parse_cpu",
    "parse_duration",
    "parse_size",
    "type_name",
]

MAX_SIZE = 1 << 40  # 1 TiB: no set-top box has more; anything above is a typo
MAX_CPU = 1024 * 1000  # 1024 CPUs in millicpu
MAX_DURATION_MS = 7 * 24 * 3600 * 1000  # one week

_SIZE_FORMS = "a byte count (1048576) or a number with K, M, G, T (or KiB, MiB, GiB, TiB)"
_CPU_FORMS = "CPUs (0.5, 2), a percentage of one CPU (150%) or millicores (250m)"
_DURATION_FORMS = "a number with ms, s, m or h (200ms, 5s, 2m, 1h) or whole seconds (5)"

_SIZE_SUFFIX = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "tib": 1 << 40,
}
_DURATION_SUFFIX = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_NUM_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z%]*)\s*$")


class UnitError(ConfigError):
    """A value could not be read as a size, CPU amount or duration."""


# bool before int: a bool is an int to isinstance
_TYPE_NAMES: tuple[tuple[type, str], ...] = ((bool, "boolean"), (int, "integer"), (float, "float"),
                                             (str, "string"), (list, "array"), (dict, "table"))


def type_name(value: object) -> str:
    """The TOML-ish name of a Python value's type, for error messages."""
    return next((name for t, name in _TYPE_NAMES if isinstance(value, t)), type(value).__name__)


def _fail(kind: str, value: object, forms: str, why: str = "") -> UnitError:
    what = f"{kind} {value!r}" + (f": {why}" if why else "")
    return UnitError("E_UNITS", f"invalid {what}", f"write {forms}")


def _split(value: object, kind: str, forms: str) -> tuple[Decimal, str]:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _fail(kind, value, forms, f"expected integer or string, got {type_name(value)}")
    if isinstance(value, int | float):
        if isinstance(value, float) and value != value:  # NaN
            raise _fail(kind, value, forms, "not a number")
        if value < 0:
            raise _fail(kind, value, forms, "negative")
        try:
            d = Decimal(str(value))
        except InvalidOperation:
            raise _fail(kind, value, forms) from None
        if not d.is_finite():
            raise _fail(kind, value, forms, "not a finite number")
        return d, ""
    if value.strip().startswith("-"):
        raise _fail(kind, value, forms, "negative")
    m = _NUM_RE.match(value)
    if m is None:
        raise _fail(kind, value, forms)
    return Decimal(m.group(1)), m.group(2)


def _whole(kind: str, value: object, forms: str, amount: Decimal, limit: int, unit: str) -> int:
    if amount != amount.to_integral_value():
        raise _fail(kind, value, forms, f"not a whole number of {unit}")
    n = int(amount)
    if n > limit:
        raise _fail(kind, value, forms, f"above the limit of {limit} {unit}")
    return n


def parse_size(value: object) -> int:
    """Bytes from ``"64M"``, ``"64MiB"``, ``"512K"``, ``"1G"``, ``"1048576"`` or an int."""
    amount, suffix = _split(value, "size", _SIZE_FORMS)
    mult = _SIZE_SUFFIX.get(suffix.lower())
    if mult is None:
        raise _fail("size", value, _SIZE_FORMS, f"unknown suffix {suffix!r}")
    return _whole("size", value, _SIZE_FORMS, amount * mult, MAX_SIZE, "bytes")


def parse_cpu(value: object) -> int:
    """Millicpu from ``"0.5"``, ``2``, ``"150%"`` or ``"250m"``."""
    amount, suffix = _split(value, "CPU amount", _CPU_FORMS)
    mult = {"": Decimal(1000), "%": Decimal(10), "m": Decimal(1)}.get(suffix)
    if mult is None:
        raise _fail("CPU amount", value, _CPU_FORMS, f"unknown suffix {suffix!r}")
    return _whole("CPU amount", value, _CPU_FORMS, amount * mult, MAX_CPU, "millicpu")


def parse_duration(value: object) -> int:
    """Milliseconds from ``"5s"``, ``"200ms"``, ``"2m"``, ``"1h"`` or whole seconds."""
    amount, suffix = _split(value, "duration", _DURATION_FORMS)
    if isinstance(value, float):
        raise _fail("duration", value, _DURATION_FORMS, "a bare number must be whole seconds")
    mult = _DURATION_SUFFIX.get(suffix.lower() if suffix else "s")
    if mult is None:
        raise _fail("duration", value, _DURATION_FORMS, f"unknown suffix {suffix!r}")
    return _whole("duration", value, _DURATION_FORMS, amount * mult, MAX_DURATION_MS, "ms")


def _fmt(n: int, units: list[tuple[str, int]]) -> str:
    for suffix, mult in units:
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def format_size(n: int) -> str:
    """Shortest exact form: ``67108864 -> "64M"``, ``1000 -> "1000"``."""
    return _fmt(n, [("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)])


def format_cpu(milli: int) -> str:
    """``2000 -> "2"``, ``250 -> "250m"``."""
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def format_duration(ms: int) -> str:
    """``5000 -> "5s"``, ``200 -> "200ms"``, ``0 -> "0s"``."""
    if ms == 0:
        return "0s"
    return _fmt(ms, [("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)])


# --------------------------------------------------------------------------------------------
# Schema-driven table reading


@dataclass(frozen=True)
class Problem:
    """One problem found in a configuration file."""

    key: str
    problem: str
    hint: str | None = None


T = TypeVar("T")
_MISSING: Any = object()


@dataclass
class TableReader:
    """Reads one TOML table; every accessor records problems in ``problems`` (shared)."""

    table: dict[str, Any]
    path: str = ""
    problems: list[Problem] = field(default_factory=list)
    _seen: set[str] = field(default_factory=set)

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str, hint: str | None = None) -> None:
        self.problems.append(Problem(self.key(name), problem, hint))

    def has(self, name: str) -> bool:
        return name in self.table

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        self._seen.add(name)
        if name not in self.table:
            if default is _MISSING:
                self.error(name, "required key is missing")
            return default
        return self.table[name]

    def typed(self, name: str, kind: type[T] | tuple[type, ...], what: str, default: Any) -> Any:
        """Value of ``kind`` (bool is never an int), else ``default`` and a problem."""
        v = self.raw(name, default)
        if v is default:
            return v
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(v, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(v, kinds)
        if not ok:
            self.error(name, f"expected {what}, got {type_name(v)}")
            return default
        return v

    def string(self, name: str, default: Any = _MISSING) -> Any:
        v = self.typed(name, str, "string", default)
        if isinstance(v, str) and "\0" in v:
            self.error(name, "contains a NUL character")
            return default
        return v

    def integer(self, name: str, lo: int, hi: int, default: Any = _MISSING) -> Any:
        v = self.typed(name, int, "integer", default)
        if isinstance(v, int) and v is not default and not lo <= v <= hi:
            self.error(name, f"{v} is out of range {lo}..{hi}")
            return default
        return v

    def boolean(self, name: str, default: Any = _MISSING) -> Any:
        return self.typed(name, bool, "boolean", default)

    def unit(self, name: str, parse: Callable[[object], int], default: Any = _MISSING) -> Any:
        v = self.raw(name, default)
        if v is default:
            return v
        try:
            return parse(v)
        except UnitError as e:
            self.error(name, e.message, e.hint)
            return default

    def strings(self, name: str, default: Any = _MISSING, max_len: int = 256) -> Any:
        v = self.typed(name, list, "array of strings", default)
        if v is default:
            return v
        out: list[str] = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.error(f"{name}[{i}]", f"expected string, got {type_name(item)}")
            elif "\0" in item:
                self.error(f"{name}[{i}]", "contains a NUL character")
            else:
                out.append(item)
        if len(v) > max_len:
            self.error(name, f"{len(v)} entries, at most {max_len} allowed")
        return tuple(out)

    def sub(self, name: str, required: bool = False) -> TableReader | None:
        """Reader for a sub-table; ``None`` when absent (and not required) or not a table."""
        v = self.raw(name, _MISSING if required else None)
        if v is None or v is _MISSING:
            return None
        if not isinstance(v, dict):
            self.error(name, f"expected table, got {type_name(v)}")
            return None
        return TableReader(v, self.key(name), self.problems)

    def tables(self, name: str, max_len: int = 64) -> list[TableReader]:
        """Readers for an array of tables (``[[name]]``); empty when absent."""
        v = self.raw(name, None)
        if v is None:
            return []
        if not isinstance(v, list):
            self.error(name, f"expected array of tables, got {type_name(v)}")
            return []
        if len(v) > max_len:
            self.error(name, f"{len(v)} entries, at most {max_len} allowed")
        out: list[TableReader] = []
        for i, item in enumerate(v[:max_len]):
            if isinstance(item, dict):
                out.append(TableReader(item, f"{self.key(name)}[{i}]", self.problems))
            else:
                self.error(f"{name}[{i}]", f"expected table, got {type_name(item)}")
        return out

    def finish(self) -> None:
        """Report keys present in the table that no accessor asked for."""
        known = sorted(self._seen)
        for k in self.table:
            if k in self._seen:
                continue
            close = difflib.get_close_matches(str(k), known, n=1)
            self.error(
                str(k),
                "unknown key" + (f"; did you mean {close[0]}?" if close else ""),
                f"known keys here: {', '.join(known)}" if known else None,
            )


class ConfigProblems(ConfigError):
    """A configuration file has problems; ``key`` is the first bad key, ``problems`` all.

    ``message`` is ``<file>: <key>: <problem>`` for the first problem.
    """

    def __init__(self, code: str, source: str, problems: list[Problem]) -> None:
        first = problems[0]
        msg = f"{source}: " + (f"{first.key}: " if first.key else "") + first.problem
        if len(problems) > 1:
            msg += f" (and {len(problems) - 1} more problems)"
        super().__init__(code, msg, first.hint)
        self.source = source
        self.key = first.key
        self.keys = tuple(p.key for p in problems)
        self.problems = tuple(
            f"{source}: " + (f"{p.key}: " if p.key else "") + p.problem for p in problems
        )
