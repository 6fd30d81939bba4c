"""Helpers of the correlation guest tests (channel 4 in the live agentd of the box).

* :func:`last_seq` is the newest event's number (the bus's count): alerts after it are
  new; :func:`alerts` lists them (the live ring), :func:`persisted_alerts` the event
  log's; :func:`expect_alert` waits for one of a pattern, or raises
  :class:`AlertMissing` (the one failure the scenarios of channels still to come are
  expected to show: ``xfail(raises=AlertMissing, strict=True)``).
* :func:`make_bundle` compiles pattern text into a bundle signed with the repository's
  development key (pinned in the box), :func:`drop` puts a pair into the update
  directory as a fleet's updater would (a temporary name, then a rename).
* :func:`mount_in` runs a oneshot cell whose only act is a refused ``mount``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cellkit import SERVICES, call, run_until_gone, wait_for, write_manifest

__all__ = ["DEFAULT_PAT", "INCOMING", "STORE", "AlertMissing", "alerts", "bundle_events",
           "drop", "expect_alert", "last_seq", "make_bundle", "mount_in", "no_alert",
           "pattern_row", "persisted_alerts"]

DEV_KEY = Path("/mnt/src/keys/dev/patterns.key")
DEFAULT_PAT = Path("/etc/agent/patterns/default.pat")
INCOMING = Path("/var/lib/agent/patterns/incoming")
STORE = Path("/var/lib/agent/patterns/loaded")


class AlertMissing(AssertionError):
    """No correlation/alert of the pattern came."""


def last_seq() -> int:
    return int(call("status")["events"])


def alerts(since: int, pattern: str | None = None) -> list[dict[str, Any]]:
    got = call("events", n=5000, channel="correlation", kind="alert")
    return [e for e in got if e["seq"] > since
            and (pattern is None or e["attrs"]["pattern"] == pattern)]


def persisted_alerts(since: int, pattern: str) -> list[dict[str, Any]]:
    got = call("events.log", n=200, channel="correlation", kind="alert")
    return [e for e in got if e["seq"] > since and e["attrs"]["pattern"] == pattern]


def bundle_events(since: int) -> list[dict[str, Any]]:
    got = call("events", n=500, channel="correlation", kind="bundle-*")
    return [e for e in got if e["seq"] > since]


def expect_alert(pattern: str, since: int, timeout: float = 20.0,
                 steps: tuple[str, ...] = ()) -> dict[str, Any]:
    """The first alert of ``pattern`` after event ``since`` (AlertMissing if none comes;
    its message lists the events since of the ``steps`` kinds, "channel/kind")."""
    deadline = time.monotonic() + timeout
    while True:
        got = alerts(since, pattern)
        if got:
            return got[0]
        if time.monotonic() > deadline:
            seen = [e["attrs"]["pattern"] for e in alerts(since)]
            found = []
            for step in steps:
                channel, kind = step.split("/")
                found += [f"{step} {e['cell']} {e['attrs']}" for e in
                          call("events", n=500, channel=channel, kind=kind)
                          if e["seq"] > since]
            raise AlertMissing(f"no correlation/alert of {pattern} within {timeout:g} s "
                               f"(alerts since: {seen or 'none'}; step events since: "
                               + ("\n  " + "\n  ".join(found) if found else "none") + ")")
        time.sleep(0.3)


def no_alert(since: int) -> None:
    got = alerts(since)
    assert not got, f"unexpected alerts: {[(e['attrs']['pattern'], e['cell']) for e in got]}"


def pattern_row(name: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = call("patterns", name=name)["patterns"]
    return rows[0]


def make_bundle(directory: Path, text: str, version: int, name: str = "lib", *,
                min_engine: int = 1) -> Path:
    """``directory/NAME.bundle`` (and ``.sig``): ``text`` compiled, signed with the
    development key."""
    from agent.monitor.correlation import bundle as bnd
    from agent.monitor.correlation.language import parse

    secret = bnd.parse_key(DEV_KEY.read_text(), "secret")
    data = bnd.stamp(bnd.encode(parse(text, "test.pat"), version, min_engine),
                     bnd.key_id(bnd.public_key(secret)))
    path = directory / f"{name}.bundle"
    path.write_bytes(data)
    path.with_name(path.name + ".sig").write_bytes(bnd.sign(data, secret))
    return path


def drop(bundle: Path, name: str, *, sig_first: bool = True) -> None:
    """Put ``bundle`` and its signature into the update directory under ``name``, each
    written under a temporary name and renamed in (in either order)."""
    INCOMING.mkdir(parents=True, exist_ok=True)
    halves = [(bundle.with_name(bundle.name + ".sig"), f"{name}.bundle.sig"),
              (bundle, f"{name}.bundle")]
    for src, dst in halves if sig_first else halves[::-1]:
        tmp = INCOMING / f".{dst}.part"
        tmp.write_bytes(src.read_bytes())
        os.rename(tmp, INCOMING / dst)


def mount_in(cell: str) -> list[str]:
    """A oneshot cell that tries to mount a tmpfs (trapped, refused); its output."""
    write_manifest(cell, ["-c", "mount -t tmpfs none /tmp; echo mount=$?"],
                   command="/bin/sh", oneshot=True)
    try:
        lines = run_until_gone(cell)
    finally:
        (SERVICES / f"{cell}.toml").unlink(missing_ok=True)
    assert "mount=0" not in lines, lines  # refused: the control is the trap's event below
    return lines


def wait_version(version: int, timeout: float = 30) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (d := call("patterns"))["version"] == version and d, f"version {version}",
        timeout=timeout)
    return result
