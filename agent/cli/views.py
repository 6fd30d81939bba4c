"""agentctl's human views of the daemon's replies: one function per reply, pure, each
line at most 80 columns (a serial console) and escaped.

Every line goes through :func:`agent.core.tty.escape` once, then is cut to 80 columns
(:func:`show`): values are put into a line as they are (:func:`text`) and the line is
escaped as a whole, so nothing a cell, a manifest or a reply controls reaches the
terminal raw.  A formatter given a reply of a shape it does not expect raises
TypeError, ValueError, AttributeError, KeyError or IndexError; agentctl reports that as
``E_PROTOCOL``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.core.tty import escape, escape_bytes, json_text

__all__ = ["WIDTH", "format_budget", "format_event", "format_inspect", "format_log_line",
           "format_ps", "format_status", "show", "text"]

WIDTH = 80


def _clip(line: str, width: int = WIDTH) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def show(line: str, width: int = WIDTH) -> str:
    """One human line as printed: escaped, then cut to ``width`` columns."""
    return _clip(escape(line), width)


def text(value: Any) -> str:
    """A value inside a human line, unescaped yet (the line is escaped as a whole):
    strings as they are, bytes decoded keeping each non-UTF-8 byte (shown ``\\xNN``),
    anything else as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return json_text(value)


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if d or h else "") + (f"{m:02d}m" if d or h or m
                                                                   else "") + f"{s:02d}s"


def format_status(st: dict[str, Any]) -> list[str]:
    """Human lines for a status result; known keys first, then any others."""
    lines = [
        f"agentd {st.get('version', '?')}  pid {st.get('pid', '?')}  "
        f"up {_duration(float(st.get('uptime_s', 0)))}",
        f"kernel    {st.get('kernel', '?')} ({st.get('machine', '?')})",
        f"cgroup    {st.get('cgroup', '?')}",
        f"cells     {st.get('cells', '?')}",
        f"events    {st.get('events', '?')}",
    ]
    known = {"version", "pid", "uptime_s", "kernel", "machine", "cgroup", "cells", "events"}
    budget = st.get("budget")
    if isinstance(budget, dict) and all(isinstance(budget.get(k), dict) for k in
                                        ("capacity", "reserve", "committed", "free")):
        known.add("budget")
        lines += format_budget(budget)
    for key in sorted(k for k in st if k not in known):
        lines += _field_lines(text(key), st[key])
    return [show(line) for line in lines]


def _flat(value: Any, prefix: str = "") -> list[str]:
    """``k=v`` items of a status field: nested tables as ``k.sub=v``, lists by length
    (``[3]``) unless short and flat."""
    if isinstance(value, dict):
        out: list[str] = []
        for k, v in value.items():
            out += _flat(v, f"{prefix}{text(k)}.") if isinstance(v, dict) else \
                [f"{prefix}{text(k)}={_scalar(v)}"]
        return out
    return [f"{prefix.rstrip('.')}={_scalar(value)}" if prefix else _scalar(value)]


def _scalar(v: Any) -> str:
    if isinstance(v, list):
        if len(v) <= 4 and all(not isinstance(x, dict | list) for x in v):
            return ",".join(text(x) for x in v) or "-"
        return f"[{len(v)}]"
    if isinstance(v, float):
        return f"{v:g}"
    return text(v)


def _field_lines(key: str, value: Any, width: int = 80) -> list[str]:
    """One status field on as many 80-column lines as it needs: ``key  k=v k=v ...``,
    continuation lines indented under the first value."""
    lines, line = [], f"{key:<9}"
    for item in _flat(value):
        if len(line) + 1 + len(item) > width and line.strip() != key:
            lines.append(line)
            line = " " * 9
        line += " " + item
    lines.append(line)
    return lines


def format_budget(b: dict[str, Any]) -> list[str]:
    """The budget block of ``status``: per resource what is free of the capacity, what
    the host keeps and what cells hold; then cells by state and address leases."""
    fmt: dict[str, Callable[[int], str]] = {
        "cpu_m": lambda n: f"{n}m", "memory": lambda n: f"{n / (1 << 20):.1f} MiB",
        "pids": str}
    lines = []
    for key, label in (("cpu_m", "cpu"), ("memory", "memory"), ("pids", "pids")):
        try:
            f = fmt[key]
            lines.append(f"  {label:<7} free {f(int(b['free'][key]))} of "
                         f"{f(int(b['capacity'][key]))} (host keeps "
                         f"{f(int(b['reserve'][key]))}, cells hold "
                         f"{f(int(b['committed'][key]))})")
        except (KeyError, TypeError, ValueError):
            continue
    states = b.get("states")
    if isinstance(states, dict) and states:
        lines.append("  cells   " + ", ".join(f"{v} {k}" for k, v in sorted(states.items())))
    if "leases" in b:
        lines.append(f"  leases  {b['leases']}")
    return ["budget", *lines]


def format_event(ev: dict[str, Any]) -> str:
    """One event on one line: time, severity, channel, cell, kind and attributes."""
    ts = ev.get("ts", 0.0)
    try:
        when = time.strftime("%m-%d %H:%M:%S", time.localtime(float(ts)))
        when += f".{int(float(ts) * 1000) % 1000:03d}"
    except (TypeError, ValueError, OverflowError):
        when = "?"
    attrs = ev.get("attrs") or {}
    kv = " ".join(f"{text(k)}={text(v)}"
                  for k, v in (attrs.items() if isinstance(attrs, dict) else ()))
    line = (f"{when} {text(ev.get('severity', '?')):<6} {text(ev.get('channel', '?')):<9} "
            f"{text(ev.get('cell') or '-'):<10} {text(ev.get('kind', '?'))} {kv}")
    return show(line.rstrip())


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}{unit}"
    return str(n)


def format_ps(rows: list[dict[str, Any]]) -> list[str]:
    """One line per cell, 80 columns: name state vlan address cpu memory pids up restarts."""
    lines = [f"{'NAME':<13} {'STATE':<9} {'VLAN':>4} {'ADDRESS':<15} {'CPU%':>5} "
             f"{'MEM/MAX':>12} {'PIDS':>4} {'UP':>7} {'R':>2}"]
    for r in rows:
        cpu = r.get("cpu_pct")
        mem = f"{_size(r.get('memory_current'))}/{_size(r.get('memory_max'))}"
        up = r.get("uptime_s")
        pids = r.get("pids")
        lines.append(
            f"{str(r.get('name', '?'))[:13]:<13} {str(r.get('state', '?'))[:9]:<9} "
            f"{r.get('vlan') if r.get('vlan') is not None else '-':>4} "
            f"{r.get('address') or '-':<15} {'-' if cpu is None else f'{cpu:.1f}':>5} "
            f"{mem:>12} {'-' if pids is None else pids:>4} "
            f"{'-' if up is None else _duration(float(up)):>7} {r.get('restarts', 0)!s:>2}")
    return [show(x) for x in lines]


def format_inspect(d: dict[str, Any]) -> list[str]:
    """The human view of ``inspect``: record, allocation, limits, plan, seccomp, events."""
    alloc = d.get("allocation") or {}
    lines = [f"cell      {d.get('name')}  state {d.get('state')}  pid {d.get('pid') or '-'}",
             f"image     {(d.get('manifest') or {}).get('image', {}).get('root', '?')}",
             f"network   vlan {alloc.get('vlan') or '-'}  address {alloc.get('address') or '-'}"
             f"  gateway {alloc.get('gateway') or '-'}",
             f"cgroup    {d.get('cgroup')}"]
    lim = d.get("limits") or {}
    lines.append("limits    " + " ".join(f"{k}={v}" for k, v in lim.items() if v is not None))
    if d.get("error"):
        lines.append(f"error     {d['error']}")
    lines += ["", "plan:"] + [f"  {x}" for x in d.get("plan") or ["(none: adopted)"]]
    lines += ["", "seccomp:"] + [_seccomp_row(r) for r in d.get("seccomp") or []]
    lines = [show(x) for x in lines]
    return lines + ["", "events:"] + [format_event(ev) for ev in d.get("events") or []]


def _seccomp_row(r: Any) -> str:
    if isinstance(r, list) and len(r) == 4:
        return f"  {text(r[0]):<16} {text(r[1]):>4} {text(r[2]):<14} {text(r[3])}"
    return f"  {text(r)}"


def format_log_line(x: Any) -> str:
    """One line of a cell's output as shown: a stream mark (``!`` for stderr), then the
    line escaped (a tab kept): its bytes when the reply has them (a byte that is not
    UTF-8 is shown ``\\xNN``), else its text.  Never cut: a log line is shown whole."""
    if not isinstance(x, dict):
        return " " + escape(text(x))
    mark = "!" if x.get("stream") == "stderr" else " "
    raw = x.get("raw")
    if isinstance(raw, bytes):
        return mark + escape_bytes(raw, keep_tab=True)
    return mark + escape(text(x.get("line", "")), keep_tab=True)
