from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import ConfigError
from agent.core.units import (
    MAX_CPU,
    MAX_DURATION_MS,
    MAX_SIZE,
    TableReader,
    UnitError,
    format_cpu,
    format_duration,
    format_size,
    parse_cpu,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64M", 64 << 20), ("64MiB", 64 << 20), ("1G", 1 << 30), ("512K", 512 << 10),
        ("512k", 512 << 10), ("1048576", 1048576), (1048576, 1048576), ("0", 0),
        ("1.5K", 1536), ("1T", 1 << 40), ("64 MiB", 64 << 20), ("100B", 100),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0.5", 500), ("2", 2000), (2, 2000), (0.25, 250), ("150%", 1500), ("250m", 250),
     ("1.5", 1500), ("1024", MAX_CPU)],
)
def test_parse_cpu(text: object, expected: int) -> None:
    assert parse_cpu(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("5s", 5000), ("200ms", 200), ("2m", 120_000), ("1h", 3_600_000), (5, 5000),
     ("1.5s", 1500), ("0s", 0)],
)
def test_parse_duration(text: object, expected: int) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    ("fn", "value", "fragment"),
    [
        (parse_size, "-1M", "negative"), (parse_size, -5, "negative"),
        (parse_size, "2T", "above the limit"), (parse_size, "64X", "unknown suffix 'X'"),
        (parse_size, "M", "invalid size"), (parse_size, True, "got boolean"),
        (parse_size, "0.5", "not a whole number"), (parse_size, float("inf"), "finite"),
        (parse_size, [1], "got array"),
        (parse_cpu, "1025", "above the limit"), (parse_cpu, "-1", "negative"),
        (parse_cpu, "0.0005", "not a whole number"), (parse_cpu, "2 cores", "invalid"),
        (parse_cpu, "5x", "unknown suffix"),
        (parse_duration, "8d", "unknown suffix"), (parse_duration, 1.5, "whole seconds"),
        (parse_duration, "1000h", "above the limit"), (parse_duration, "-1s", "negative"),
    ],
)
def test_unit_errors_name_value_and_forms(fn: object, value: object, fragment: str) -> None:
    assert callable(fn)
    with pytest.raises(UnitError) as ei:
        fn(value)
    e = ei.value
    assert isinstance(e, ConfigError)
    assert e.code == "E_UNITS"
    assert fragment in e.message
    assert repr(value) in e.message
    assert e.hint is not None and e.hint.startswith("write ")


@given(st.integers(0, MAX_SIZE))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(0, MAX_CPU))
def test_cpu_round_trip(n: int) -> None:
    assert parse_cpu(format_cpu(n)) == n


@given(st.integers(0, MAX_DURATION_MS))
def test_duration_round_trip(n: int) -> None:
    assert parse_duration(format_duration(n)) == n


def test_format_is_shortest() -> None:
    assert format_size(64 << 20) == "64M"
    assert format_size(1000) == "1000"
    assert format_size(1536) == "1536"
    assert format_cpu(2000) == "2"
    assert format_cpu(250) == "250m"
    assert format_duration(90_000) == "90s"
    assert format_duration(120_000) == "2m"


@given(st.one_of(st.text(max_size=12), st.integers(), st.floats(), st.booleans(), st.none()))
def test_parsers_raise_only_unit_error(v: object) -> None:
    for fn in (parse_size, parse_cpu, parse_duration):
        try:
            n = fn(v)
        except UnitError:
            continue
        assert isinstance(n, int) and n >= 0


def test_reader_unknown_key_suggests_and_names_path() -> None:
    rd = TableReader({"memroy_max": 1, "pids_max": "x"}, "resources")
    rd.integer("pids_max", 1, 10, 5)
    rd.raw("memory_max", None)
    rd.finish()
    assert [(p.key, p.problem) for p in rd.problems] == [
        ("resources.pids_max", "expected integer, got string"),
        ("resources.memroy_max", "unknown key; did you mean memory_max?"),
    ]


def test_reader_bool_is_not_an_int() -> None:
    rd = TableReader({"n": True})
    assert rd.integer("n", 0, 10, 3) == 3
    assert rd.problems[0].problem == "expected integer, got boolean"
