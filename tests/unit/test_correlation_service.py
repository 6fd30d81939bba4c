"""agent.monitor.correlation.service: the engine on a real EventBus (fake clocks), its
bundles on files in a temporary directory, its ops.

Shown here: alerts carry the chain; what the bounded queue drops is counted and
reported once per window; a bundle swapped in while events flow keeps the partial
matches of unchanged patterns; a bad, older or too-new bundle is refused with its
reason and the old one keeps matching; rollback; the store survives a restart; the
update directory is watched through inotify (either half of a pair may come last);
installs are chunked and policy-checked; patterns tagged master call the hook.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.core.errors import AgentError, ConfigError
from agent.core.events import Event
from agent.core.policy import parse_policy
from agent.core.protocol import Peer
from agent.daemon.bus import EventBus
from agent.monitor.correlation import bundle as bnd
from agent.monitor.correlation.language import parse
from agent.monitor.correlation.service import CorrelationService, bounded
from agent.monitor.correlation.service_ops import PatternOps
from agent.monitor.correlation.settings import Settings, parse_settings

SECRET = bytes(range(32))
PUB = bnd.public_key(SECRET)
TEXT = """
pattern two-step
  severity alert
  response isolate
  tag spread
  within 1m
  step a: test/one
  step b: test/two cell != a.cell and key == a.key
end
pattern counted
  severity notice
  step c: test/hit
  count 3 distinct cell within 1m
end
pattern master-poke
  response stop
  tag master
  step p: agent/signal
end
"""
CHANGED = TEXT.replace("count 3 distinct", "count 4 distinct")
ADDED = TEXT + "pattern extra\n  step x: test/extra\nend\n"
POLICY = parse_policy("""
[[identity]]
uid = 0
role = "admin"
[[identity]]
gid = 1000
role = "vendor"
[role.admin]
services = ["*"]
may = ["*"]
[role.vendor]
services = ["v-*"]
may = ["ps", "status"]
""")
ROOT, VENDOR = Peer(0, 0, 1), Peer(1000, 1000, 2)


def signed(text: str = TEXT, version: int = 2, *, min_engine: int = 1,
           secret: bytes = SECRET) -> tuple[bytes, bytes]:
    data = bnd.stamp(bnd.encode(parse(text), version, min_engine),
                     bnd.key_id(bnd.public_key(secret)))
    return data, bnd.sign(data, secret)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "dev.pub").write_text(bnd.key_text("public", PUB))
    ship = tmp_path / "ship"
    ship.mkdir()
    data, sig = signed(version=2)
    (ship / "default.bundle").write_bytes(data)
    (ship / "default.bundle.sig").write_bytes(sig)
    settings = parse_settings({"keys_dir": str(keys), "bundle": str(ship / "default.bundle")},
                              tmp_path / "state")
    yield {"settings": settings, "tmp": tmp_path}


def make(settings: Settings, **kw: Any) -> tuple[CorrelationService, EventBus, Clock]:
    clock = Clock()
    bus = EventBus(clock=lambda: 1.7e9 + clock.t, mono=clock)
    svc = CorrelationService(bus, settings, policy=POLICY, **kw)
    return svc, bus, clock


def events(bus: EventBus, kind: str = "*", channel: str = "correlation") -> list[Event]:
    return bus.recent(None, channel=channel, kind=kind)


def drop(settings: Settings, name: str, data: bytes, sig: bytes | None) -> None:
    d = settings.update_dir
    d.mkdir(parents=True, exist_ok=True)
    if sig is not None:
        (d / f"{name}.bundle.sig").write_bytes(sig)
    (d / f"{name}.bundle").write_bytes(data)


def test_start_loads_the_shipped_bundle_and_alerts_carry_the_chain(env: dict[str, Any]) -> None:
    svc, bus, clock = make(env["settings"])
    asyncio.run(svc.start())
    (loaded,) = events(bus, "bundle-loaded")
    assert loaded.attrs["version"] == 2 and loaded.attrs["signer"] == bnd.key_id(PUB)
    assert loaded.severity == "notice"
    first = bus.emit("test", "one", cell="web", key="k1", pad="x" * 1000)
    clock.t += 5
    bus.emit("test", "two", cell="web", key="k1")  # same cell: no
    last = bus.emit("test", "two", cell="db", key="k1")
    (alert,) = events(bus, "alert")
    assert alert.severity == "alert" and alert.cell == "web"  # where the chain began
    a = alert.attrs
    assert (a["pattern"], a["response"], a["tags"], a["cells"]) == \
        ("two-step", "isolate", ["spread"], ["web", "db"])
    assert [(x["seq"], x["cell"], x["channel"], x["kind"], x["mono"], x["keys"])
            for x in a["chain"]] == [(first.seq, "web", "test", "one", first.mono, {"key": "k1"}),
                                     (last.seq, "db", "test", "two", last.mono,
                                      {"key": "k1"})]
    assert bus.is_persistent(alert)  # the event log keeps it
    st = svc.status()
    assert (st["version"], st["patterns"], st["matches"], st["dropped"]) == (2, 3, 1, 0)
    assert svc.alerts[-1]["pattern"] == "two-step" and svc.alerts[-1]["latency_s"] == 0


def test_a_counting_alert_is_bounded_for_flash() -> None:
    chain = [{"step": "c", "values": [f"cell{i}" for i in range(100)], "keys":
              {"path": "/" + "p" * 1000}}]
    out = bounded({"pattern": "x", "chain": chain})
    link = out["chain"][0]
    assert len(link["values"]) == 32 and link["values_total"] == 100
    assert len(link["keys"]["path"]) == 256


def test_drops_are_counted_and_reported_once_per_window(env: dict[str, Any]) -> None:
    settings = Settings(**{**vars(env["settings"]), "queue": 64, "batch": 16})

    async def scenario() -> None:
        svc, bus, clock = make(settings)
        await svc.start()
        await drained(svc)  # bundle-loaded went through the queue too
        for i in range(200):  # faster than the loop drains: the queue overflows
            bus.emit("test", "hit", cell=f"c{i % 2}")
        await drained(svc)
        assert [e.attrs for e in events(bus, "dropped")] == [{"count": 136, "total": 136}]
        clock.t += 1
        for _ in range(100):  # within the window (10 s): not reported yet, but a timer
            bus.emit("test", "hit", cell="c0")  # will, at its end
        await drained(svc)
        assert len(events(bus, "dropped")) == 1 and svc._drop_timer is not None
        loop = asyncio.get_running_loop()
        assert 8.9 < svc._drop_timer.when() - loop.time() <= 9.0
        clock.t += 9  # the window ends: the next batch reports (or the timer would)
        bus.emit("test", "hit", cell="c0")
        await drained(svc)
        total = svc.status()["dropped"]  # 36, and the bus's summaries of suppressed
        assert total >= 172  # events ("suppressed", published as the clock moved)
        assert [e.attrs for e in events(bus, "dropped")][1:] == [{"count": total - 136,
                                                                  "total": total}]
        assert svc.seen + total == bus.published  # every event: fed, or counted dropped
        svc._on_drop_timer()  # the timer at the end of the window: nothing new to say
        assert len(events(bus, "dropped")) == 2
        await svc.close()

    asyncio.run(scenario())


async def drained(svc: CorrelationService) -> None:
    """Let the loop feed the engine whatever the bus queued for it."""
    await asyncio.sleep(0)
    while svc.queued():
        await asyncio.sleep(0)


async def until(cond: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_a_swap_while_events_flow_keeps_partials_of_unchanged_patterns(
        env: dict[str, Any]) -> None:
    settings = env["settings"]

    async def scenario() -> None:
        svc, bus, _clock = make(settings)
        await svc.start()
        bus.emit("test", "one", cell="web", key="k")  # two-step: a partial
        bus.emit("test", "hit", cell="a")  # counted: 2 of 3, about to change
        bus.emit("test", "hit", cell="b")
        await drained(svc)
        assert svc.engine.live == 2
        bus.emit("test", "one", cell="web", key="k2")  # queued, not yet fed
        drop(settings, "fleet", *signed(CHANGED, version=3))
        svc.process(["fleet"])  # the swap, with an event still in the queue
        (ev,) = events(bus, "bundle-loaded")[1:]
        assert ev.attrs["kept"] == ["two-step", "master-poke"]
        assert ev.attrs["changed"] == ["counted"] and ev.attrs["retired"] == 1
        bus.emit("test", "two", cell="db", key="k")
        bus.emit("test", "two", cell="db", key="k2")
        bus.emit("test", "hit", cell="c")  # 'counted' began afresh: 1 of 4
        await drained(svc)
        alerts = events(bus, "alert")
        assert [a.attrs["chain"][0]["keys"]["key"] for a in alerts] == ["k", "k2"]
        assert [a.attrs["chain"][1]["keys"]["key"] for a in alerts] == ["k", "k2"]
        assert alerts[0].attrs["chain"][0]["seq"] < ev.seq < alerts[0].attrs["chain"][1]["seq"]
        assert not (settings.update_dir / "fleet.bundle").exists()  # consumed
        assert svc.store.versions() == [3]
        await svc.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("change", "reason", "severity"), [
    ("signature", "E_BUNDLE_SIGNATURE", "alert"),
    ("older", "E_BUNDLE_VERSION", "alert"),
    ("same", "E_BUNDLE_VERSION", "notice"),
    ("engine", "E_BUNDLE_ENGINE", "notice"),
    ("other-key", "E_BUNDLE_SIGNATURE", "alert"),
])
def test_a_bad_bundle_is_refused_and_the_old_one_keeps_matching(
        env: dict[str, Any], change: str, reason: str, severity: str) -> None:
    settings = env["settings"]
    svc, bus, _clock = make(settings)
    asyncio.run(svc.start())
    bus.emit("test", "one", cell="web", key="k")
    data, sig = {"signature": lambda: signed(ADDED, 3),
                 "older": lambda: signed(ADDED, 1), "same": lambda: signed(ADDED, 2),
                 "engine": lambda: signed(ADDED, 3, min_engine=99),
                 "other-key": lambda: signed(ADDED, 3, secret=bytes(32))}[change]()
    if change == "signature":
        data = data[:-1] + bytes([data[-1] ^ 1])  # one bit changed after signing
    drop(settings, "bad", data, sig)
    svc.process(["bad"])
    (ev,) = events(bus, "bundle-refused")
    assert (ev.attrs["reason"], ev.severity, ev.attrs["loaded"]) == (reason, severity, 2)
    assert ev.attrs["origin"].endswith("bad.bundle") and ev.attrs["message"]
    assert svc.status()["version"] == 2 and svc.engine.live == 1
    assert not list(settings.update_dir.iterdir()) and svc.store.versions() == []
    bus.emit("test", "two", cell="db", key="k")
    assert [a.attrs["pattern"] for a in events(bus, "alert")] == ["two-step"]


def test_rollback_and_the_store_across_restarts(env: dict[str, Any]) -> None:
    settings = env["settings"]
    svc, _bus, _ = make(settings)
    asyncio.run(svc.start())
    assert svc.rollback().attrs["reason"] == "E_BUNDLE_ROLLBACK"  # nothing before
    for v in (3, 4, 5):
        drop(settings, f"v{v}", *signed(ADDED if v % 2 else TEXT, v))
        svc.process([f"v{v}"])
    assert svc.store.versions() == [4, 5]  # current and previous only
    out = svc.rollback()
    assert out.ok and out.attrs["version"] == 4 and out.attrs["origin"] == "rollback"
    assert svc.store.versions() == [4]
    # a restart: shipped 2, then the stored 4; the rollback holds
    again, bus2, _ = make(settings)
    asyncio.run(again.start())
    assert [e.attrs["version"] for e in events(bus2, "bundle-loaded")] == [2, 4]
    assert (again.status()["version"], again.status()["previous"]) == (4, 2)
    # a newer shipped bundle (a firmware update) supersedes what is stored
    ship = settings.bundle
    data, sig = signed(TEXT, 9)
    ship.write_bytes(data)
    ship.with_name(ship.name + ".sig").write_bytes(sig)
    third, bus3, _ = make(settings)
    asyncio.run(third.start())
    assert [e.attrs["version"] for e in events(bus3, "bundle-loaded")] == [9]
    assert not events(bus3, "bundle-refused") and third.store.versions() == []


def test_the_update_directory_is_watched_either_half_last(env: dict[str, Any]) -> None:
    settings = env["settings"]

    async def loaded(bus: EventBus, n: int) -> list[Event]:
        await until(lambda: len(events(bus, "bundle-*")) >= n, f"{n} bundle events")
        return events(bus, "bundle-*")

    async def scenario() -> None:
        svc, bus, _ = make(settings)
        await svc.start()
        assert svc.status()["watching"] and not svc.status()["problems"]
        d = settings.update_dir
        assert d.stat().st_mode & 0o777 == 0o700
        data, sig = signed(ADDED, 3)
        tmp = d.parent / "t"
        tmp.write_bytes(data)
        os.rename(tmp, d / "a.bundle")  # the bundle first, renamed in
        (d / ".a.bundle.sig.part").write_bytes(sig)  # a hidden temporary: ignored
        await asyncio.sleep(0.1)
        assert len(events(bus, "bundle-*")) == 1
        os.rename(d / ".a.bundle.sig.part", d / "a.bundle.sig")
        got = await loaded(bus, 2)
        assert got[-1].kind == "bundle-loaded" and got[-1].attrs["version"] == 3
        data, sig = signed(TEXT, 4)
        (d / "b.bundle.sig").write_bytes(sig)  # the signature first, written in place
        await asyncio.sleep(0.1)
        (d / "b.bundle").write_bytes(data)
        got = await loaded(bus, 3)
        assert got[-1].attrs["version"] == 4 and sorted(os.listdir(d)) == []
        d.rmdir()  # the directory goes: made and watched again
        await until(d.is_dir, "the update directory again")
        assert svc.status()["watching"]
        drop(settings, "c", *signed(TEXT, 5))
        assert (await loaded(bus, 4))[-1].attrs["version"] == 5
        await svc.close()
        assert not svc.status()["watching"]

    asyncio.run(scenario())


def test_install_is_chunked_policy_checked_and_persisted(env: dict[str, Any]) -> None:
    settings = env["settings"]
    svc, bus, _ = make(settings)
    ops = PatternOps(svc)

    async def scenario() -> None:
        await svc.start()
        data, sig = signed(ADDED, 3)
        with pytest.raises(AgentError) as e:
            await ops.op_install(VENDOR, {"bundle": data, "sig": sig})
        assert e.value.code == "E_POLICY_OP"
        with pytest.raises(AgentError) as e:
            await ops.op_install(ROOT, {"bundle": b"x", "sig": sig, "total": 3 << 20})
        assert e.value.code == "E_BUNDLE_SIZE"
        with pytest.raises(AgentError, match="offset 0"):
            await ops.op_install(ROOT, {"bundle": data[:10], "sig": sig, "offset": 10,
                                        "total": len(data)})
        step = 100
        for off in range(0, len(data), step):
            r = await ops.op_install(ROOT, {"bundle": data[off:off + step], "sig": sig,
                                            "offset": off, "total": len(data)})
        assert r["version"] == 3 and r["added"] == ["extra"]
        assert r["origin"] == "agentctl uid 0 pid 1" and svc.store.versions() == [3]
        bad = bytearray(data)
        bad[-3] ^= 1
        with pytest.raises(AgentError) as e:
            await ops.op_install(ROOT, {"bundle": bytes(bad), "sig": sig})
        assert e.value.code == "E_BUNDLE_SIGNATURE"
        assert events(bus, "bundle-refused")[-1].attrs["origin"] == "agentctl uid 0 pid 1"
        with pytest.raises(AgentError) as e:
            await ops.op_rollback(VENDOR, {})
        assert e.value.code == "E_POLICY_OP"
        assert (await ops.op_rollback(ROOT, {}))["version"] == 2
        listing = await ops.op_patterns(VENDOR, {})
        assert listing["version"] == 2 and listing["total"] == 3 and listing["next"] is None
        assert [p["name"] for p in listing["patterns"]] == ["two-step", "counted",
                                                            "master-poke"]
        one = await ops.op_patterns(VENDOR, {"name": "counted"})
        assert one["patterns"][0]["about"] == "" and one["patterns"][0]["matches"] == 0
        await svc.close()

    asyncio.run(scenario())


def test_a_long_listing_comes_in_pages(env: dict[str, Any]) -> None:
    many = "".join(f"pattern p{i}\n  tag {' '.join(f't{j}' for j in range(16))}\n"
                   f"  step s: test/k{i}\nend\n" for i in range(600))
    drop(env["settings"], "big", *signed(many, 3))
    svc, _bus, _ = make(env["settings"])
    asyncio.run(svc.start())
    ops = PatternOps(svc)
    names: list[str] = []
    offset: int | None = 0
    pages = 0
    while offset is not None:
        page = asyncio.run(ops.op_patterns(ROOT, {"offset": offset}))
        names += [p["name"] for p in page["patterns"]]
        offset = page["next"]
        pages += 1
    assert names == [f"p{i}" for i in range(600)] and pages > 1


def test_master_patterns_call_the_hook_and_own_events_are_not_fed_back(
        env: dict[str, Any]) -> None:
    text = TEXT + "pattern loop\n  step a: correlation/alert|dropped\nend\n"
    drop(env["settings"], "x", *signed(text, 3))
    svc, bus, _ = make(env["settings"])
    asyncio.run(svc.start())
    seen: list[str] = []
    svc.on_master_attack = lambda m: seen.append(m.pattern)
    bus.emit("agent", "signal", sig=15, sender_pid=77)
    assert seen == ["master-poke"]
    (alert,) = events(bus, "alert")
    (hit,) = events(bus, "master-attack")
    assert hit.attrs == {"pattern": "master-poke", "alert": alert.seq, "hooked": True}
    svc.on_master_attack = None
    bus.emit("agent", "signal", sig=15, sender_pid=78)
    assert events(bus, "master-attack")[-1].attrs["hooked"] is False
    assert len(events(bus, "alert")) == 2  # 'loop' never fires on them


def armed(svc: CorrelationService) -> bool:
    return svc._expire_timer is not None


def test_expiry_runs_only_while_partials_live(env: dict[str, Any]) -> None:
    settings = Settings(**{**vars(env["settings"]), "expire_every_s": 0.05})

    async def scenario() -> None:
        svc, bus, clock = make(settings)
        await svc.start()
        bus.emit("test", "two", cell="a", key="k")  # begins nothing
        await asyncio.sleep(0)
        assert not armed(svc) and svc.engine.live == 0
        bus.emit("test", "hit", cell="a")  # a count's window: alive
        bus.emit("test", "one", cell="web", key="k")
        await asyncio.sleep(0)
        assert svc.engine.live == 2 and armed(svc)
        clock.t += 30  # within the span: kept
        n = svc.expiries
        await until(lambda: svc.expiries > n, "an expiry")
        assert svc.engine.live == 2 and armed(svc)
        clock.t += 61  # past both: freed, and the timer stops
        n = svc.expiries
        await until(lambda: svc.expiries > n, "an expiry")
        assert svc.engine.live == 0 and not armed(svc)
        await svc.close()

    asyncio.run(scenario())


def test_no_keys_or_no_shipped_bundle_is_a_problem_not_a_crash(env: dict[str, Any]) -> None:
    keys = env["settings"].keys_dir
    (keys / "bad.pub").write_text("ed25519-secret " + "00" * 32 + "\n")
    svc, bus, _ = make(env["settings"])
    asyncio.run(svc.start())
    (ev,) = events(bus, "bundle-refused")
    assert ev.attrs["reason"] == "E_BUNDLE_KEY" and ev.attrs["origin"].endswith("bad.pub")
    assert svc.status()["version"] == 2  # the good key still works
    for p in keys.iterdir():
        p.unlink()
    env["settings"].bundle.unlink()
    svc2, _, _ = make(env["settings"])
    asyncio.run(svc2.start())
    st = svc2.status()
    assert st["version"] is None and len(st["problems"]) == 2
    assert any("no pinned key" in p for p in st["problems"])


def test_settings() -> None:
    s = parse_settings(None, Path("/data/agent"))
    assert s.update_dir == Path("/data/agent/patterns/incoming")
    assert s.store_dir == Path("/data/agent/patterns/loaded") and s.enabled
    s = parse_settings({"update_dir": "/x/in", "queue": 100, "batch": 10}, Path("/s"))
    assert (s.update_dir, s.queue, s.batch) == (Path("/x/in"), 100, 10)
    assert s.to_wire()["update_dir"] == "/x/in"
    for table, text in [({"queu": 1}, "did you mean `queue`"), ({"queue": "1"}, "integer"),
                        ({"update_dir": "rel"}, "absolute"), ({"enabled": 1}, "true or"),
                        ({"queue": 64, "batch": 65}, "exceeds"), ([], "table")]:
        with pytest.raises(ConfigError, match=text):
            parse_settings(table)  # type: ignore[arg-type]
