"""agentctl shows, never obeys, what a cell or a reply controls (issue 10, terminal safety).

A real ControlServer answers every op with a result whose strings are all hostile
(window title, clipboard write, cursor moves, a carriage-return fake line, bidi
override, C1 CSI, line separator, NUL, DEL); every command's output, human and JSON,
must hold none of those characters raw and must show them escaped.  ``logs --raw`` is
the control: there the bytes are written as the cell wrote them.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import unicodedata
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_diag import UNAME, make_tree

from agent.cli.checkconfig import render
from agent.cli.diagscreen import DaemonView, Sources, screen
from agent.cli.main import (
    format_event,
    format_inspect,
    format_log_line,
    format_ps,
    format_status,
    main,
)
from agent.cli.top import format_top
from agent.core.errors import AgentError
from agent.core.features import FeatureReport, Report
from agent.core.kconfig import FEATURES, Status
from agent.core.protocol import Peer, check_args
from agent.core.tty import escape
from agent.daemon.control import ControlServer, Dispatcher

H = ("\x1b]0;pwned\x07\x1b]52;c;cHduZWQ=\x07\x1b[2A\x1b[2K\rFAKE root login ok"
     "\u202etxt.exe\x9b1m\u2028\x00\x7f\u2066x")
SHOWN = escape(H)  # what the operator must see instead
RAW = H.encode() + b"\xff\xfe"  # a log line's bytes, not all UTF-8
_UNSAFE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def unsafe(text: str, *, tab_ok: bool = False) -> list[str]:
    """Characters that may drive a terminal (by Unicode category; newlines end lines; a
    log line keeps its tabs, as journalctl does)."""
    return [c for c in text if unicodedata.category(c) in _UNSAFE and c != "\n"
            and not (tab_ok and c == "\t")]


def strings(obj: Any) -> Iterator[str]:
    """Every string in a JSON document, keys too."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)


def event(**over: Any) -> dict[str, Any]:
    return {"ts": 1.7e9, "cell": H, "channel": H, "kind": H, "severity": H,
            "attrs": {"comm": H, H: "key", "exe": RAW, "argv": [H, H]}, **over}


RESULTS: dict[str, Any] = {
    "ping": H,
    "status": {"version": H, "pid": 1, "uptime_s": 5, "kernel": H, "machine": H,
               "cgroup": H, "cells": H, "events": H, H: H, "other": {"k": H},
               "budget": {k: {"cpu_m": 1, "memory": 2, "pids": 3}
                          for k in ("capacity", "reserve", "committed", "free")}
               | {"states": {H: 1}, "leases": H}},
    "ps": [{"name": H, "state": H, "vlan": 100, "address": H, "pid": 7, "cpu_pct": 1.5,
            "memory_current": 1 << 20, "memory_max": 1 << 24, "pids": 3, "uptime_s": 9.0,
            "restarts": H}],
    "inspect": {"name": H, "state": H, "pid": 7, "manifest": {"image": {"root": H}},
                "allocation": {"vlan": H, "address": H, "gateway": H}, "cgroup": H,
                "limits": {H: H}, "error": H, "plan": [H, H], "seccomp": [[H, H, H, H], H],
                "events": [event()]},
    "events": [event(), event(cell=None)],
    "stop": {"name": H, "state": H},
    "top": {"cells": [{"name": H, "state": H, "cpu_pct": 1.0, "cpu_max": 500,
                       "memory_current": 1 << 20, "memory_high": 1 << 21,
                       "memory_max": 1 << 22, "cpu_pressure": 0.1, "memory_pressure": 0.2,
                       "pids": 2, "pinned": True, "level": H, "tuned": True}],
            "budget_free": {"cpu": H, "memory": 1 << 20}, "box_memory_pressure": 0.5},
    "pin": {"name": H, "pinned": True, "cpu_max": H, "memory_high": 1 << 20,
            "memory_max": 1 << 21},
    "unpin": {"name": H, "pinned": False},
}


class Hostile:
    """A ControlServer whose every answer is hostile; ``raw_known`` says whether its
    ``logs`` accepts the ``raw`` argument (the daemon side of ``logs --raw``)."""

    def __init__(self, path: Path, raw_known: bool = True) -> None:
        self.raw_known = raw_known
        self.logs_args: list[dict[str, Any]] = []
        d = Dispatcher()
        for op, result in RESULTS.items():
            d.register(op, self._const(result))
        d.register("run", self._run)
        d.register("logs", self._logs)
        d.register("events.follow", self._follow)
        self.server = ControlServer(path, d)
        self.loop = asyncio.new_event_loop()
        self.server.bind()
        self.loop.run_until_complete(self.server.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def _const(result: Any) -> Any:
        async def handler(peer: Peer, args: Mapping[str, Any]) -> Any:
            if args.get("name") == "fail":
                raise AgentError("E_X\x1b[2J", f"no cell `{H}`", H)
            return result
        return handler

    @staticmethod
    async def _run(peer: Peer, args: Mapping[str, Any]) -> Any:
        if args.get("dry_run"):
            return {"name": H, "dry_run": True, "plan": [H, f"start `{H}`"]}
        return {"name": H, "state": H, "pid": 7, "vlan": 100, "address": H}

    async def _logs(self, peer: Peer, args: Mapping[str, Any]) -> Any:
        check_args(args, ("name", "n", "stream") + (("raw",) if self.raw_known else ()))
        self.logs_args.append(dict(args))
        lines = [{"ts": 1.0, "stream": "stdout", "line": H + "\ttab"},
                 {"ts": 2.0, "stream": "stderr", "line": RAW.decode(errors="replace")}]
        if args.get("raw"):
            lines[0]["raw"] = (H + "\ttab").encode()
            lines[1]["raw"] = RAW
        return {"name": H, "lines": lines, "dropped": 0}

    @staticmethod
    async def _follow(peer: Peer, args: Mapping[str, Any]) -> AsyncIterator[Any]:
        yield event()
        yield {"dropped": H}

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[Hostile]:
    srv = Hostile(tmp_path / "h.sock")
    yield srv
    srv.close()


COMMANDS = [["ping"], ["status"], ["ps"], ["inspect", "x"], ["events"], ["events", "-f"],
            ["logs", "x"], ["run", "x"], ["run", "x", "--dry-run"], ["stop", "x"],
            ["top", "--once"], ["pin", "x", "--cpu", "1"], ["unpin", "x"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_human_output_shows_hostile_strings_escaped(
        hostile: Hostile, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--socket", str(hostile.server.path), *argv])
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    assert unsafe(out, tab_ok=argv[0] == "logs") == [], argv
    assert SHOWN[:30] in out  # shown (escaped), not dropped


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: " ".join(a))
def test_json_output_is_printable_ascii(
        hostile: Hostile, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--socket", str(hostile.server.path), "--json", *argv])
    out, err = capsys.readouterr()
    assert (rc, err) == (0, "")
    assert all(" " <= c <= "~" or c == "\n" for c in out), argv
    docs = [json.loads(x) for x in out.splitlines()] if argv[-1] in ("-f", "--once") \
        else [json.loads(out)]
    assert any(H in x for x in strings(docs))  # the control: it was really there


def test_errors_are_escaped(hostile: Hostile, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["stop", "fail"], ["--debug", "inspect", "fail"]):
        rc = main(["--socket", str(hostile.server.path), *argv])
        out, err = capsys.readouterr()
        assert rc == 1 and out == ""
        assert unsafe(err) == [] and "error[E_X\\x1b[2J]: no cell `" + SHOWN in err
        assert "hint: " + SHOWN in err


def test_logs_escape_bytes_and_raw_writes_them(
        hostile: Hostile, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    sock = str(hostile.server.path)
    assert main(["--socket", sock, "logs", "x"]) == 0
    out = capsysbinary.readouterr().out.decode()
    assert unsafe(out, tab_ok=True) == []
    assert out.splitlines() == [" " + SHOWN + "\ttab", "!" + SHOWN + "\\xff\\xfe"]
    assert main(["--socket", sock, "logs", "x", "--raw"]) == 0
    assert capsysbinary.readouterr().out == (H + "\ttab").encode() + b"\n" + RAW + b"\n"
    assert main(["--socket", sock, "--json", "logs", "x", "--raw"]) == 0
    doc = json.loads(capsysbinary.readouterr().out)
    assert bytes(doc["lines"][1]["raw"]) == RAW  # bytes as byte values, as journalctl does
    assert main(["--socket", sock, "--json", "logs", "x"]) == 0
    assert "raw" not in json.loads(capsysbinary.readouterr().out)["lines"][0]
    assert [a.get("raw") for a in hostile.logs_args] == [True, True, True, None]


def test_logs_against_an_agentd_without_raw(
        tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    srv = Hostile(tmp_path / "old.sock", raw_known=False)
    try:
        assert main(["--socket", str(srv.server.path), "logs", "x"]) == 0
        out = capsysbinary.readouterr().out.decode()
        assert unsafe(out, tab_ok=True) == [] and SHOWN in out
        assert main(["--socket", str(srv.server.path), "logs", "x", "--raw"]) == 0
        raw = capsysbinary.readouterr().out
        assert raw.startswith((H + "\ttab\n").encode())  # the text, as close as it gets
    finally:
        srv.close()


def test_diag_screen_escapes_events_errors_and_the_log(tmp_path: Path) -> None:
    make_tree(tmp_path)
    with (tmp_path / "var/log/agentd.log").open("ab") as f:
        f.write(b"10:00:03.000 agentd[9] E m: \xff\xfe" + H.encode() + b"\n")
    status = dict(RESULTS["status"], budget={"free": {"cpu_m": 1}, "committed": {}})
    view = DaemonView(status=status, ps=RESULTS["ps"], events=[event()],
                      problems=[f"status: {H}", H])
    src = Sources(root=tmp_path, uname=lambda: UNAME, clock=lambda: 1.7e9)
    lines = screen(src, view)
    assert all(unsafe(x) == [] and len(x) <= 80 for x in lines)
    text = "\n".join(lines)
    assert "\\xff\\xfe" in text and "\\x1b]0;pwned" in text
    down = screen(src, DaemonView(down=H))
    assert all(unsafe(x) == [] for x in down)


def test_checkconfig_render_escapes() -> None:
    feats = tuple(FeatureReport(f, Status.MISSING, H) for f in FEATURES[:3])
    text = render(Report(release=H, config_source=H, features=feats))
    assert unsafe(text) == [] and SHOWN[:20] in text


def test_unsafe_oracle_can_fail() -> None:
    assert unsafe(H) and unsafe("\u202e") and unsafe("\x9b") and not unsafe("Grüße\n")
    assert os.linesep == "\n"


# Any reply at all: strings with every kind of character, numbers, bytes, nesting.
_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    [H, "name", "state", "attrs", "ts", "lines", "cells", "plan", "seccomp", "line", "raw"])
_LEAF = (st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats()
         | _TEXT | st.binary(max_size=12))
TREES = st.recursive(_LEAF, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(_TEXT, kids, max_size=6), max_leaves=30)
FORMATTERS = [(format_status, RESULTS["status"]), (format_ps, RESULTS["ps"]),
              (format_inspect, RESULTS["inspect"]), (format_event, event()),
              (format_top, RESULTS["top"]),
              (lambda x: [format_log_line(x)], {"ts": 1.0, "stream": "stderr", "line": H,
                                                "raw": RAW})]


def shaped(template: Any) -> st.SearchStrategy[Any]:
    """Replies of the template's shape, every leaf drawn anew (strings of any character)."""
    if isinstance(template, dict):
        return st.fixed_dictionaries({k: shaped(v) for k, v in template.items()})
    if isinstance(template, list):
        return st.tuples(*(shaped(v) for v in template)).map(list)
    if isinstance(template, bool):
        return st.booleans()
    if isinstance(template, int | float):
        return st.integers(0, 2**40) | st.floats(0, 1e9) | st.none()
    if isinstance(template, bytes):
        return st.binary(max_size=20)
    return _TEXT


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_whatever_a_reply_holds_a_formatter_prints_it_safely_or_refuses_it(
        data: st.DataObject) -> None:
    """A formatter given any reply (of its shape with any leaves, or anything at all)
    either prints lines with no control character, or raises one of the errors agentctl
    turns into E_PROTOCOL (never a traceback)."""
    which = data.draw(st.sampled_from(range(len(FORMATTERS))))
    fmt, template = FORMATTERS[which]
    reply = data.draw(shaped(template) | TREES)
    try:
        lines = fmt(reply)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return
    assert all(unsafe(x, tab_ok=which == 5) == [] for x in lines), lines


def test_a_reply_of_an_unexpected_shape_is_a_protocol_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    srv = Hostile(tmp_path / "shape.sock")
    try:
        RESULTS_BAD = {"ps": {"not": "a list"}, "status": ["not", "a", "map"]}
        for op, bad in RESULTS_BAD.items():
            srv.server.dispatcher._handlers[op] = Hostile._const(bad)
            rc = main(["--socket", str(srv.server.path), op])
            err = capsys.readouterr().err
            assert rc == 4 and "error[E_PROTOCOL]: unexpected reply" in err, (op, err)
            assert "Traceback" not in err and unsafe(err) == []
    finally:
        srv.close()
